"""Generative models (LLMs and text encoders) served from signed bundles.

:mod:`agent.llm.types` is the contract between the runtime (onnxruntime-genai sessions,
the generative bundle kinds, golden token checks) and the front ends that speak to
clients (the OpenAI-compatible HTTPS routes, KServe v2 REST, Triton-style gRPC streaming).
"""
