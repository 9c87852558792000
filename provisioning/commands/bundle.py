"""``appliance bundle create|inspect|verify``."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.bundle import Accelerator, Batching, Bundle, Tolerance, read_bundle
from agent.fsutil import file_sha256
from agent.llm.bundle import GenManifest, Walked, is_generative_bundle, verify_bundle_hashed
from provisioning.bundle import create_bundle, verify_bundle
from provisioning.genbundle import (
    DEFAULT_PROMPTS,
    DEFAULT_TEXTS,
    create_generative_bundle,
    llm_context_length,
    verify_generative_bundle,
)
from provisioning.output import emit_json, examples

__all__ = ["register"]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("bundle", **examples(
            "appliance bundle create model.onnx --name tiny --version 1.0.0 --golden golden.npz --out "
            "tiny.bundle",
            "appliance bundle verify tiny.bundle"),
        help="create, inspect and verify model bundles", parents=[common])
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION")
    bsub.required = True

    c = bsub.add_parser("create", **examples(
            "appliance bundle create model.onnx --name tiny --version 1.0.0 --golden golden.npz --out "
            "tiny.bundle",
            "appliance bundle create resnet.onnx --name resnet --version 2.1.0 --golden g.npz --out "
            "r.bundle --max-batch-size 8 --requires-gpu"),
        parents=[common],
                        help="check a model and its golden vectors, write a bundle")
    c.add_argument("model", type=Path, help="the ONNX model file")
    _identity_args(c)
    c.add_argument("--golden", type=Path, action="append", default=[], required=True,
                   help=".npz with inputs/NAME (and optional outputs/NAME) arrays; repeatable")
    c.add_argument("--max-batch-size", type=int, default=0, help="0: no dynamic batching")
    c.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="how long a request may wait for others to batch with (default: 0)")
    c.add_argument("--preferred-batch-size", type=int, action="append", default=[],
                   help="batch sizes the scheduler aims for; repeatable")
    c.add_argument("--provider", action="append", default=[],
                   help="execution provider in order of preference (default CUDA, then CPU)")
    c.add_argument("--requires-gpu", action="store_true",
                   help="refuse to serve on a node without a usable GPU provider")
    c.add_argument("--min-cuda", default="", metavar="MAJOR.MINOR",
                   help="the oldest CUDA the model's GPU path works with (e.g. 12.4)")
    c.add_argument("--tf32", action="store_true",
                   help="the outputs stay within --atol/--rtol when CUDA computes FP32 matrix "
                        "products in TF32 (faster; default: full FP32)")
    c.add_argument("--atol", type=float, default=1e-5,
                   help="absolute tolerance of the golden outputs (default: 1e-05)")
    c.add_argument("--rtol", type=float, default=1e-4,
                   help="relative tolerance of the golden outputs (default: 0.0001)")
    c.set_defaults(handler=_create)

    _register_generative(bsub, common)

    i = bsub.add_parser("inspect", **examples(
            "appliance bundle inspect tiny.bundle",
            "appliance bundle inspect tiny.bundle --json"),
        parents=[common],
                        help="show a bundle's manifest (structure and hashes checked)")
    i.add_argument("bundle", type=Path, help="the bundle file")
    i.set_defaults(handler=_inspect)

    v = bsub.add_parser("verify", **examples(
            "appliance bundle verify tiny.bundle"),
        parents=[common], help="check hashes and run the golden vectors")
    v.add_argument("bundle", type=Path, help="the bundle file")
    v.set_defaults(handler=_verify)


def _register_generative(bsub: argparse._SubParsersAction[argparse.ArgumentParser],
                         common: argparse.ArgumentParser) -> None:
    g = bsub.add_parser("create-llm", **examples(
            "appliance bundle create-llm ./phi-3-mini-int4 --name phi3 --version 1.0.0 --out phi3.bundle",
            "appliance bundle create-llm ./model --name chat --version 2.0.0 --max-tokens 512 "
            "--kv-budget 32768 --prompt 'Hello' --out chat.bundle"),
        parents=[common], help="bundle an onnxruntime-genai LLM folder, recording golden token ids")
    g.add_argument("folder", type=Path, help="the model folder (genai_config.json, graph, weights, "
                                              "tokenizer files)")
    g.add_argument("--context-length", type=int, default=0,
                   help="tokens of prompt + completion (default: genai_config.json's)")
    g.add_argument("--max-tokens", type=int, default=0,
                   help="completion tokens one request may ask for (default: min(1024, context))")
    g.add_argument("--kv-budget", type=int, default=0,
                   help="tokens all sequences hold at once (default: 4 x context)")
    g.add_argument("--prompt", action="append", default=[],
                   help="a golden prompt, decoded greedily at creation and on every node; repeatable")
    g.add_argument("--golden-tokens", type=int, default=16, help="tokens recorded per golden prompt")
    _identity_args(g)
    g.set_defaults(handler=_create_llm)

    e = bsub.add_parser("create-embedding", **examples(
            "appliance bundle create-embedding ./minilm --name minilm --version 1.0.0 --out m.bundle"),
        parents=[common], help="bundle a text-encoder folder (model.onnx + tokenizer.json)")
    e.add_argument("folder", type=Path, help="the model folder")
    e.add_argument("--context-length", type=int, default=512, help="tokens per text (default: 512)")
    e.add_argument("--graph", default="model.onnx", help="the encoder's ONNX file in the folder")
    e.add_argument("--text", action="append", default=[], help="a golden text; repeatable")
    e.add_argument("--atol", type=float, default=1e-4, help="tolerance of the golden vectors")
    _identity_args(e)
    e.set_defaults(handler=_create_embedding)


def _identity_args(p: argparse.ArgumentParser) -> None:
    """The options every ``create*`` action shares: what the bundle is called and where it goes."""
    p.add_argument("--name", required=True, help="bundle name (lowercase, [a-z0-9._-])")
    p.add_argument("--version", required=True, help="version such as 1.2.0")
    p.add_argument("--out", "-o", type=Path, required=True, help="bundle file to write")
    p.add_argument("--description", default="", help="one line shown by inspect and in the registry")


def _create_llm(args: argparse.Namespace) -> int:
    context = args.context_length or llm_context_length(args.folder)
    manifest = create_generative_bundle(
        args.folder, args.out, kind="llm", name=args.name, version=args.version,
        context_length=context, max_tokens=args.max_tokens or min(1024, context),
        kv_budget_tokens=args.kv_budget or 4 * context, prompts=tuple(args.prompt) or DEFAULT_PROMPTS,
        golden_tokens=args.golden_tokens, description=args.description)
    return _show_generative(args, args.out, manifest, "created; golden token ids recorded")


def _create_embedding(args: argparse.Namespace) -> int:
    manifest = create_generative_bundle(
        args.folder, args.out, kind="embedding", name=args.name, version=args.version,
        context_length=args.context_length, max_tokens=1, kv_budget_tokens=args.context_length,
        graph=args.graph, texts=tuple(args.text) or DEFAULT_TEXTS, atol=args.atol,
        description=args.description)
    return _show_generative(args, args.out, manifest, "created; golden vectors recorded")


def _show_generative(args: argparse.Namespace, path: Path, checked: GenManifest | Walked,
                     verdict: str) -> int:
    """A manifest alone (a bundle just created) has its file hashed here; a :class:`Walked`
    carries the file's sha256 and length from the read that checked it."""
    m = checked.manifest if isinstance(checked, Walked) else checked
    if args.json:
        sha256, length = ((checked.sha256, checked.length) if isinstance(checked, Walked)
                          else (file_sha256(path), path.stat().st_size))
        emit_json({"file": str(path), "sha256": sha256, "length": length, "manifest": m.to_json()})
        return 0
    print(f"{m.name} {m.version}  {m.kind}  ({verdict})")
    print(f"  file    {path}  {path.stat().st_size} bytes")
    print(f"  context {m.limits.context_length} tokens, max_tokens {m.limits.max_tokens}, "
          f"KV budget {m.limits.kv_budget_tokens}")
    print(f"  model   {m.graph}  {m.parameters} parameters  {m.quantisation}")
    for name in m.members:
        print(f"  file    {name}  {m.files[name].length} bytes  sha256 {m.files[name].sha256}")
    return 0


def _summary(bundle: Bundle) -> dict[str, object]:
    return {"file": str(bundle.path), "sha256": bundle.sha256, "length": bundle.length,
            "manifest": bundle.manifest.to_json()}


def _print_human(bundle: Bundle, verdict: str) -> None:
    m = bundle.manifest
    print(f"{m.name} {m.version}  ({verdict})")
    print(f"  file    {bundle.path}  {bundle.length} bytes  sha256 {bundle.sha256}")
    for kind, specs in (("input ", m.inputs), ("output", m.outputs)):
        for s in specs:
            print(f"  {kind}  {s.name}  {s.datatype}  {list(s.shape)}")
    if m.batching.max_batch_size:
        print(f"  batching max {m.batching.max_batch_size}, delay {m.batching.max_queue_delay_us} us, "
              f"preferred {list(m.batching.preferred_batch_sizes)}")
    a = m.accelerator
    print(f"  providers {', '.join(a.providers)}"
          + ("  (GPU required)" if a.requires_gpu else "")
          + (f"  (CUDA {a.min_cuda} or later)" if a.min_cuda else "")
          + ("  (TF32 allowed)" if a.tf32 else ""))
    print(f"  tolerance atol {m.tolerance.atol:g}, rtol {m.tolerance.rtol:g}")


def _create(args: argparse.Namespace) -> int:
    providers = tuple(args.provider) or Accelerator().providers
    bundle = create_bundle(
        args.model, name=args.name, version=args.version, golden=args.golden, out=args.out,
        batching=Batching(args.max_batch_size, args.max_queue_delay_us, tuple(args.preferred_batch_size)),
        accelerator=Accelerator(providers, args.requires_gpu, args.min_cuda, args.tf32),
        tolerance=Tolerance(args.atol, args.rtol), description=args.description,
    )
    if args.json:
        emit_json(_summary(bundle))
    else:
        _print_human(bundle, "created; golden vectors reproduce")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if is_generative_bundle(args.bundle):
        return _show_generative(args, args.bundle, verify_bundle_hashed(args.bundle),
                                "structure and hashes OK; golden check not run")
    bundle = read_bundle(args.bundle)
    if args.json:
        emit_json(_summary(bundle))
    else:
        _print_human(bundle, "structure and hashes OK; golden vectors not run")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if is_generative_bundle(args.bundle):
        return _show_generative(args, args.bundle, verify_generative_bundle(args.bundle),
                                "verified: hashes match, golden check reproduces")
    bundle, _ = verify_bundle(args.bundle)
    if args.json:
        emit_json(_summary(bundle) | {"verified": True})
    else:
        _print_human(bundle, "verified: hashes match, golden vectors reproduce")
    return 0
