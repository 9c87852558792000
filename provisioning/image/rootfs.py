"""The rootfs stage: mmdebstrap from the local mirror, no network, reproducible.

The result is a tarball (mmdebstrap's own tar output, byte-identical for the same mirror,
package set and SOURCE_DATE_EPOCH).  Copies of the build host's /etc/resolv.conf and
/etc/hostname and every apt source are removed before it is packed.  The packages' own
initrd is never built: the seal stage makes the node's (see ``ROOTFS_ENV``).
"""

from __future__ import annotations

from pathlib import Path

from provisioning.image.aptlog import follow
from provisioning.image.mirror import debian_source
from provisioning.image.profile import Profile
from provisioning.output import progress
from provisioning.tools import require_tool, run_lines

__all__ = ["CUSTOMIZE_HOOKS", "ROOTFS_ENV", "build_rootfs_tar", "mmdebstrap_argv"]

CUSTOMIZE_HOOKS = (
    'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
    'rm -rf "$1/etc/apt/sources.list" "$1/etc/apt/sources.list.d"',
    'mkdir -p "$1/etc/apt/sources.list.d"',
    # The packages' own initrd is never built (ROOTFS_ENV); should a generator that ignores
    # INITRD=No make one, its bytes differ from run to run and the node never boots it (the
    # seal stage builds the UKI's initrd reproducibly): left in place, two builds would differ.
    'rm -f "$1"/boot/initrd.img-*',
)
# INITRD=No: the switch Debian's kernel hooks read (dracut's /etc/kernel/postinst.d/dracut
# exits at once). Without it dracut built an initrd twice in every rootfs stage, in the kernel's
# postinst and again in dracut's own trigger: 34 of the stage's 74 s on 2 cores (issue #14),
# for a file the stage then deleted.
ROOTFS_ENV = {"INITRD": "No"}


def mmdebstrap_argv(profile: Profile, packages: tuple[str, ...], mirror: Path,
                    out: Path) -> list[str]:
    """The mmdebstrap command line for ``packages`` from ``mirror`` into tarball ``out``."""
    d = profile.debian
    argv = [require_tool("mmdebstrap"), f"--variant={d.variant}",
            f"--architectures={d.architecture}", f"--include={','.join(packages)}",
            # --verbose: apt's and dpkg's lines, read as progress (and kept in the build log)
            "--mode=root", "--format=tar", "--verbose",
            "--aptopt=Acquire::Languages \"none\""]
    argv += [f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS]
    return [*argv, d.suite, str(out), debian_source(mirror)]


def build_rootfs_tar(profile: Profile, packages: tuple[str, ...], mirror: Path, out: Path,
                     source_date_epoch: int, *, closure: int | None = None) -> None:
    """Run mmdebstrap from the local mirror into ``out`` (a tarball).

    Progress (on stderr) is mmdebstrap's phase and the packages dpkg has unpacked, out of
    ``closure`` (the number of packages the image installs; the mirror lock's count).

    Raises:
        ToolError: mmdebstrap fails (its output's tail names the package or the problem).
    """
    with progress("rootfs", closure, unit="packages") as bar:
        run_lines(mmdebstrap_argv(profile, packages, mirror, out),
                  follow(bar, lambda state: (len(state.unpacked), closure)),
                  env={"SOURCE_DATE_EPOCH": str(source_date_epoch), **ROOTFS_ENV})
