"""Image build benchmark: full build from a warm mirror, bundle-only rebuild, image size.

Baseline measured in the same run: a bare mmdebstrap of the same package set from the same
mirror, to a tarball as the rootfs stage writes one, without the stage's hooks and environment
(so the packages build their own initrd, as they do for anyone who runs mmdebstrap).
Usage (root, mirror already synced for the profile):

    python bench/image_build.py --mirror MIRROR [--profile images/minimal.toml] [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from provisioning.bundle import create_bundle  # noqa: E402
from provisioning.demo.models import affine_model, save_golden  # noqa: E402
from provisioning.image.pipeline import build, plan_build, stage_packages  # noqa: E402
from provisioning.image.profile import Profile, load_profile, package_set  # noqa: E402
from provisioning.image.rootfs import mmdebstrap_argv  # noqa: E402
from provisioning.tools import run  # noqa: E402
from testsupport.image_helpers import make_registry  # noqa: E402


def _bundle(tmp: Path, version: str) -> Path:
    model = affine_model(tmp / f"m{version}.onnx")
    golden = save_golden(tmp / f"g{version}.npz", {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    return create_bundle(model, name="affine", version=version, golden=[golden],
                         out=tmp / f"affine-{version}.bundle").path


def _profile(tmp: Path, base: Path, registry: Path, target: str) -> Path:
    path = tmp / f"images/{target}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(base.read_text().replace('registry = ""', f'registry = "{registry}"')
                    .replace("targets = []", f'targets = ["{target}"]'))
    return path


def bare_mmdebstrap(profile: Profile, mirror: Path, out: Path, sde: int) -> None:
    """mmdebstrap of the image's package set, nothing of the rootfs stage's own added."""
    argv = [a for a in mmdebstrap_argv(profile, package_set(profile, stage_packages(profile)), mirror, out)
            if not a.startswith("--customize-hook=")]
    run(argv, env={"SOURCE_DATE_EPOCH": str(sde)}, timeout=3600)


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror", type=Path, required=True)
    ap.add_argument("--profile", type=Path, default=ROOT / "images/minimal.toml")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    base, full, rebuild, configure_only = [], [], [], []
    stages: dict[str, list[float]] = {}  # the full build's time per stage
    rebuilt: dict[str, list[float]] = {}
    size_tar = size_root = 0
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-image-") as t:
            tmp = Path(t)
            reg1 = make_registry(tmp / "reg1", {"affine-1.0.0.bundle": _bundle(tmp, "1.0.0")})
            reg2 = make_registry(tmp / "reg2", {"affine-1.0.1.bundle": _bundle(tmp, "1.0.1")})
            p1 = _profile(tmp, args.profile, reg1, "affine-1.0.0.bundle")
            p2 = _profile(tmp, args.profile, reg2, "affine-1.0.1.bundle")
            profile = load_profile(p1)
            sde = profile.image.source_date_epoch
            started = time.monotonic()
            bare_mmdebstrap(profile, args.mirror.resolve(), tmp / "baseline.tar", sde)
            base.append(time.monotonic() - started)
            (tmp / "baseline.tar").unlink()
            started = time.monotonic()
            first = build(plan_build(p1, args.mirror, tmp / "out", sde))
            full.append(time.monotonic() - started)
            for s in first["stages"]:
                stages.setdefault(s["name"], []).append(s["seconds"])
            started = time.monotonic()
            result = build(plan_build(p2, args.mirror, tmp / "out", sde))
            rebuild.append(time.monotonic() - started)
            rerun = [s["name"] for s in result["stages"] if not s["cached"]]
            for s in result["stages"]:
                rebuilt.setdefault(s["name"], []).append(s["seconds"])
            configure_only.append(rerun)
            size_tar = (tmp / "out/stages/rootfs/rootfs.tar").stat().st_size
            size_root = _du(tmp / "out/stages/configure/root")
            shutil.rmtree(tmp / "out")
    b, f, r = statistics.median(base), statistics.median(full), statistics.median(rebuild)
    print(f"baseline: bare mmdebstrap      median {b:7.1f} s  (n={len(base)})")
    print(f"full build (warm mirror)       median {f:7.1f} s  ratio {f / b:.2f}x baseline")
    print(f"rebuild, only bundle changed   median {r:7.1f} s  ratio {r / b:.2f}x baseline; "
          f"stages rerun: {configure_only[-1]}")
    print("  per stage (median s)     " + "  ".join(f"{name:>9}" for name in stages))
    print("  full build               " + "  ".join(f"{statistics.median(v):9.1f}" for v in stages.values()))
    print("  rebuild                  " + "  ".join(f"{statistics.median(rebuilt[n]):9.1f}" for n in stages))
    print(f"image size: rootfs.tar {size_tar / 1e6:.0f} MB, configured root {size_root / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
