"""``appliance audit``'s checks before any scanner runs (target, tailoring, baseline, mirror)
and on the root's services: which run, their exposure, the goal's gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import NotFoundError
from provisioning.errors import ImageError
from provisioning.image.audit import (
    DEFAULT_TAILORING,
    audit,
    enabled_services,
    exposure_failures,
    root_of,
    scanner_root,
    services_exposure,
    tree_digest,
    unit_exposure,
)
from testsupport.image_helpers import make_signed_mirror


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "out/stages/configure/root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    return root


def test_root_of_a_build_dir_or_a_root(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert root_of(tmp_path / "out") == root.resolve() == root_of(root)
    with pytest.raises(NotFoundError, match="not a root filesystem"):
        root_of(tmp_path)
    (tmp_path / "disk.raw").write_bytes(b"")
    with pytest.raises(ImageError, match="auditing a disk image needs its root mounted"):
        root_of(tmp_path / "disk.raw")


def test_a_mirror_without_scanner_packages_says_how_to_add_them(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    keyring = make_signed_mirror(mirror, tmp_path / "work", {"hello-appliance": "1.0-1"})
    with pytest.raises(ImageError, match=r"holds no scanner packages; run `appliance mirror "
                                         r"sync-scanner --mirror .*mirror` \(network\) first"):
        scanner_root(mirror, tmp_path / "cache", keyring=keyring)
    assert not (tmp_path / "cache").exists()


def test_profile_and_baseline_are_checked_before_the_mirror(tmp_path: Path) -> None:
    """A typo in --profile or a broken baseline fails at once, not after the first scan."""
    root = _root(tmp_path)
    missing_mirror = tmp_path / "no-mirror"
    with pytest.raises(ImageError, match=r"no tailored profile extends .*_profile_standard"):
        audit(root, mirror=missing_mirror, out=tmp_path / "a", profiles=("standard",))
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(ImageError, match=r"b\.json: format = None"):
        audit(root, mirror=missing_mirror, out=tmp_path / "a", baseline=tmp_path / "b.json")
    with pytest.raises(NotFoundError, match="no lock"):
        audit(root, mirror=missing_mirror, out=tmp_path / "a", tailoring=DEFAULT_TAILORING)
    assert not (tmp_path / "a").exists()


def test_the_scanner_root_digest_sees_every_change_but_its_mount_points(tmp_path: Path) -> None:
    root = tmp_path / "scanner"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/oscap").write_bytes(b"\x7fELF scanner")
    (root / "usr/bin/oscap").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    for sub in ("target", "out"):
        (root / sub).mkdir()
    first = tree_digest(root)
    (root / "out/report.html").write_text("results")  # the mount points are not the root
    (root / "target/etc").mkdir()
    assert tree_digest(root) == first
    changes = [
        lambda: (root / "usr/bin/oscap").write_bytes(b"\x7fELF scanned"),
        lambda: (root / "usr/bin/oscap").chmod(0o4755),
        lambda: ((root / "bin").unlink(), (root / "bin").symlink_to("/tmp")),
        lambda: (root / "usr/bin/extra").write_text(""),
        (root / "usr/lib").mkdir,
    ]
    seen = {first}
    for change in changes:
        change()
        now = tree_digest(root)
        assert now not in seen
        seen.add(now)


def _unit(root: Path, name: str, body: str = "[Service]\nExecStart=/usr/bin/true\n") -> None:
    path = root / "usr/lib/systemd/system" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[Unit]\nDescription={name}\n{body}")


def _want(root: Path, where: str, target: str, name: str) -> None:
    wants = root / where / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / name).symlink_to(f"/usr/lib/systemd/system/{name}")


def test_enabled_services_are_what_the_booted_image_runs(tmp_path: Path) -> None:
    root = tmp_path
    for name in ("agent.service", "journald.service", "dbus.service", "getty@.service", "debug.service",
                 "setup.service", "dracut-mount.service", "stray.service"):
        _unit(root, name, "[Service]\nType=oneshot\nExecStart=/usr/bin/true\n" if name == "setup.service"
              else "[Service]\nExecStart=/usr/bin/true\n")
    _unit(root, "dbus.socket", "[Socket]\nListenStream=/run/dbus/system_bus_socket\n")
    etc, lib = "etc/systemd/system", "usr/lib/systemd/system"
    _want(root, etc, "multi-user.target", "agent.service")  # enabled by the image
    _want(root, etc, "multi-user.target", "setup.service")  # runs once and exits
    _want(root, etc, "multi-user.target", "debug.service")
    (root / etc / "debug.service").symlink_to("/dev/null")  # masked
    (root / etc / "getty.target.wants").mkdir()
    (root / etc / "getty.target.wants/getty@tty1.service").symlink_to(f"/{lib}/getty@.service")
    _want(root, lib, "sysinit.target", "journald.service")  # the package's own, static
    _want(root, lib, "sockets.target", "dbus.socket")  # socket-activated: dbus.service runs
    _want(root, lib, "initrd.target", "dracut-mount.service")  # the initrd's, not the system's
    assert enabled_services(root) == ["agent.service", "dbus.service", "getty@tty1.service",
                                      "journald.service"]
    exposure = services_exposure(root)  # real systemd-analyze, offline, on this root
    assert [e["unit"] for e in exposure] == enabled_services(root)
    assert all(0 <= e["exposure"] <= 10 and e["verdict"] for e in exposure)
    (root / etc / "getty@.service").symlink_to("/dev/null")  # the template masked: no instance runs
    assert "getty@tty1.service" not in enabled_services(root)
    (root / etc / "getty@.service").unlink()
    (root / etc / "getty.target").symlink_to("/dev/null")  # a masked target wants nothing
    assert enabled_services(root) == ["agent.service", "dbus.service", "journald.service"]


# the settings systemd-analyze scores, as a confined daemon would have them
_CONFINED = ("DynamicUser=yes", "CapabilityBoundingSet=", "PrivateDevices=yes", "PrivateNetwork=yes",
             "PrivateUsers=yes", "ProtectSystem=strict", "ProtectHome=yes", "ProtectKernelTunables=yes",
             "ProtectKernelModules=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes",
             "ProtectClock=yes", "ProtectHostname=yes", "RestrictNamespaces=yes",
             "RestrictAddressFamilies=AF_UNIX", "SystemCallArchitectures=native",
             "SystemCallFilter=@system-service", "LockPersonality=yes", "MemoryDenyWriteExecute=yes")


def test_a_service_above_the_exposure_goal_fails_the_gate(tmp_path: Path) -> None:
    """With a baseline the audit also fails on each enabled service whose exposure (real
    systemd-analyze, offline) is above the goal, naming it; a confined one passes."""
    root = tmp_path
    _unit(root, "bare.service")
    _unit(root, "confined.service",
          "[Service]\nExecStart=/usr/bin/true\n" + "".join(f"{line}\n" for line in _CONFINED))
    for name in ("bare.service", "confined.service"):
        _want(root, "etc/systemd/system", "multi-user.target", name)
    exposure = {e["unit"]: e["exposure"] for e in services_exposure(root)}
    assert exposure["bare.service"] > 5.0 >= exposure["confined.service"], exposure
    failures = exposure_failures(services_exposure(root))
    assert failures == [f"bare.service: systemd-analyze security exposure {exposure['bare.service']} "
                        "is above the goal 5.0"]
    assert exposure_failures(services_exposure(root), goal=10.0) == []


def test_the_sysctl_reapply_unit_is_enabled_with_the_sysctls_and_within_the_exposure_goal(
        tmp_path: Path) -> None:
    """sysctl_reapply_after_network: the unit the content checks by name, enabled when the image
    sets sysctls, and confined below the goal (real systemd-analyze, offline) although, as a
    one-shot job, the audit does not score it among the services that run."""
    import dataclasses

    from provisioning.image.audit import SERVICE_EXPOSURE_GOAL
    from provisioning.image.plan import SYSCTL_REAPPLY_UNIT, configure_plan
    from provisioning.image.profile import load_profile

    profile = load_profile(Path(__file__).resolve().parent.parent / "images/minimal.toml")
    plan = configure_plan(profile, pip_wheel="/usr/share/python-wheels")
    text = plan.file(f"/etc/systemd/system/{SYSCTL_REAPPLY_UNIT}").content
    assert SYSCTL_REAPPLY_UNIT in plan.enable and "ExecStart=/usr/lib/systemd/systemd-sysctl" in text
    assert "ProtectKernelTunables" not in text  # it writes /proc/sys
    _unit(tmp_path, SYSCTL_REAPPLY_UNIT, text)
    _want(tmp_path, "etc/systemd/system", "multi-user.target", SYSCTL_REAPPLY_UNIT)
    assert enabled_services(tmp_path) == []  # it runs once and exits
    scored = unit_exposure(tmp_path, SYSCTL_REAPPLY_UNIT)
    assert float(scored["exposure"]) <= SERVICE_EXPOSURE_GOAL, scored
    off = dataclasses.replace(profile, hardening=dataclasses.replace(profile.hardening, sysctl=False))
    plan = configure_plan(off, pip_wheel="/usr/share/python-wheels")
    assert SYSCTL_REAPPLY_UNIT not in plan.enable
    with pytest.raises(KeyError):
        plan.file(f"/etc/systemd/system/{SYSCTL_REAPPLY_UNIT}")
