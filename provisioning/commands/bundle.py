"""``appliance bundle create|inspect|verify``."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.bundle import Accelerator, Batching, Bundle, Tolerance, read_bundle
from provisioning.bundle import create_bundle, verify_bundle
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
    c.add_argument("--name", required=True, help="bundle name (lowercase, [a-z0-9._-])")
    c.add_argument("--version", required=True, help="version such as 1.2.0")
    c.add_argument("--golden", type=Path, action="append", default=[], required=True,
                   help=".npz with inputs/NAME (and optional outputs/NAME) arrays; repeatable")
    c.add_argument("--out", "-o", type=Path, required=True, help="bundle file to write")
    c.add_argument("--description", default="", help="one line shown by inspect and in the registry")
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
    bundle = read_bundle(args.bundle)
    if args.json:
        emit_json(_summary(bundle))
    else:
        _print_human(bundle, "structure and hashes OK; golden vectors not run")
    return 0


def _verify(args: argparse.Namespace) -> int:
    bundle, _ = verify_bundle(args.bundle)
    if args.json:
        emit_json(_summary(bundle) | {"verified": True})
    else:
        _print_human(bundle, "verified: hashes match, golden vectors reproduce")
    return 0
