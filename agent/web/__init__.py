"""The agent's HTTPS port (8000, Triton's HTTP port): OpenAI-compatible ``/v1`` routes and
KServe v2 REST ``/v2`` routes, with the gRPC port's mTLS, roles and CRL (:mod:`agent.web.app`)."""
