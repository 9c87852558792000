"""The configure plan (what pyinfra applies), stage cache keys, and TUF-verified baking."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent.config import FIRMWARE_LOG, AgentConfig, load_config
from agent.errors import VerificationError
from provisioning.image.bake import bake_bundles
from provisioning.image.mirror import LOCK, Lock, LockedFile
from provisioning.image.pipeline import plan_build, stage_packages
from provisioning.image.plan import AGENT_UNIT, TPM_UDEV_RULES, Plan, configure_plan, nftables_ruleset
from provisioning.image.profile import FIRMWARE_LOG_COPY, load_profile, package_set
from testsupport.image_helpers import make_registry

ROOT = Path(__file__).resolve().parent.parent
PIP = "/usr/share/python-wheels/pip-25.1.1-py3-none-any.whl"


def _profile(tmp_path: Path, extra: str = ""):  # type: ignore[no-untyped-def]
    path = tmp_path / "images/p.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((ROOT / "images/minimal.toml").read_text() + extra)
    return load_profile(path)


def test_agent_unit_is_sandboxed() -> None:
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    unit = plan.file(f"/etc/systemd/system/{AGENT_UNIT}").content
    for line in ("User=appliance", "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
                 "DevicePolicy=closed", "PrivateDevices=yes",
                 # an empty working directory, never '/' (a model's relative file names)
                 "RuntimeDirectory=appliance-agent", "WorkingDirectory=/run/appliance-agent"):
        assert line in unit.splitlines()
    assert AGENT_UNIT in plan.enable and "nftables.service" in plan.enable


def test_firewall_denies_inbound_by_default_and_opens_only_agent_ports() -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    rules = nftables_ruleset(p)
    assert "hook input priority filter; policy drop;" in rules
    assert "hook forward priority filter; policy drop;" in rules
    assert "tcp dport { 8000, 8001, 8002 } accept" in rules
    assert "22" not in rules.split("tcp dport")[1]


def test_agent_toml_round_trips_through_the_agents_loader(tmp_path: Path) -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    text = configure_plan(p, pip_wheel=PIP).file("/etc/appliance/agent.toml").content
    tomllib.loads(text)
    (tmp_path / "agent.toml").write_text(text)
    loaded = load_config(tmp_path / "agent.toml")
    assert loaded.to_json() == p.agent.to_json()
    assert loaded.server.listen == "127.0.0.1" and loaded.server.port == 8001


def test_the_agent_reaches_the_tpm_resource_manager_and_a_copy_of_the_firmware_log(tmp_path: Path) -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    plan = configure_plan(p, pip_wheel=PIP)
    unit = plan.file(f"/etc/systemd/system/{AGENT_UNIT}").content.splitlines()
    # the private /dev gets the resource manager only (the raw /dev/tpm0 stays out), if present
    assert {"PrivateDevices=yes", "BindPaths=-/dev/tpmrm0", "DeviceAllow=/dev/tpmrm0 rw"} <= set(unit)
    assert not any("/dev/tpm0" in line or "char-tpm" in line for line in unit)
    copy = next(x for x in unit if x.startswith("ExecStartPre=+"))
    assert f"{FIRMWARE_LOG} {FIRMWARE_LOG_COPY}" in copy and "-o appliance -g appliance" in copy
    assert "$" not in copy  # systemd would expand it
    assert p.agent.attest.firmware_log == Path(FIRMWARE_LOG_COPY)
    assert load_config_text(tmp_path, plan.file("/etc/appliance/agent.toml").content).attest.firmware_log \
        == Path(FIRMWARE_LOG_COPY)
    rules = plan.file(TPM_UDEV_RULES).content
    assert 'SUBSYSTEM=="tpmrm"' in rules and 'GROUP="appliance"' in rules and "tpm0" not in rules
    # an explicit setting is kept
    profile = tmp_path / "p.toml"
    profile.write_text((ROOT / "images/minimal.toml").read_text()
                       + '\n[agent.attest]\nfirmware_log = "/var/lib/appliance/fw.log"\n')
    assert load_profile(profile).agent.attest.firmware_log == Path("/var/lib/appliance/fw.log")


def load_config_text(tmp_path: Path, text: str) -> AgentConfig:
    (tmp_path / "agent.toml").write_text(text)
    return load_config(tmp_path / "agent.toml")


def test_profile_listening_beyond_loopback_without_mtls_is_refused(tmp_path: Path) -> None:
    from provisioning.errors import ProfileError

    text = (ROOT / "images/minimal.toml").read_text().replace('listen = "127.0.0.1"', 'listen = "0.0.0.0"')
    (tmp_path / "lan.toml").write_text(text)
    with pytest.raises(ProfileError, match=r"lan.toml: \[agent\].*beyond loopback.*mTLS"):
        load_profile(tmp_path / "lan.toml")


def test_venv_install_is_offline_and_hash_pinned() -> None:
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    pip = next(c for c in plan.commands if f"{PIP}/pip" in c)
    assert {"--no-index", "--require-hashes", "--no-deps"} <= set(pip)
    assert "/etc/apt/sources.list" in plan.remove and "/etc/resolv.conf" in plan.remove


def test_hardening_files(tmp_path: Path) -> None:
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    fstab = plan.file("/etc/fstab").content
    assert "tmpfs /tmp tmpfs mode=1777,nodev,nosuid,noexec" in fstab
    assert "tmpfs /var/tmp tmpfs mode=1777,nodev,nosuid,noexec" in fstab
    assert "proc /proc proc nosuid,nodev,noexec,hidepid=invisible 0 0" in fstab.splitlines()
    assert "kernel.kptr_restrict = 2" in plan.file("/etc/sysctl.d/90-appliance.conf").content
    assert "fs.suid_dumpable = 0" in plan.file("/etc/sysctl.d/90-appliance.conf").content
    assert "Storage=persistent" in plan.file("/etc/systemd/journald.conf.d/50-appliance.conf").content
    assert "-e 2" in plan.file("/etc/audit/rules.d/50-appliance.rules").content
    assert "apparmor=1" in plan.file("/etc/kernel/cmdline").content
    assert ("usermod", "--lock", "root") in plan.commands
    assert "ssh.service" not in plan.enable
    with pytest.raises(KeyError):
        plan.file("/etc/ssh/sshd_config.d/50-appliance.conf")


def test_boot_cmdline_joins_the_sealed_kernel_arguments(tmp_path: Path) -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    p = dataclasses.replace(p, boot=dataclasses.replace(p.boot, cmdline=("systemd.mask=x.service",)))
    args = configure_plan(p, pip_wheel=PIP).file("/etc/kernel/cmdline").content.split()
    assert args[-1] == "systemd.mask=x.service" and "apparmor=1" in args
    assert "ro" not in args  # the seal stage owns it (and would warn about it on every build)
    from provisioning.image.seal import root_cmdline

    (tmp_path / "etc/kernel").mkdir(parents=True)
    (tmp_path / "etc/kernel/cmdline").write_text(" ".join(args) + "\n")
    assert root_cmdline(tmp_path)[-1] == "systemd.mask=x.service"


@pytest.mark.parametrize("tries", [None, 1, 5])
def test_the_os_installer_gives_a_new_release_the_profiles_boot_tries(tries: int | None) -> None:
    from agent.cli import build_parser
    from provisioning.image.plan import OS_UPDATE_UNIT

    p = load_profile(ROOT / "images/minimal.toml")
    if tries is not None:
        p = dataclasses.replace(p, boot=dataclasses.replace(p.boot, tries=tries))
    unit = configure_plan(p, pip_wheel=PIP).file(f"/etc/systemd/system/{OS_UPDATE_UNIT}").content
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[1] == "os-install"
    args = build_parser().parse_args(argv[1:])  # the agent's own parser takes what the unit says
    assert args.tries == (3 if tries is None else tries)


@pytest.mark.parametrize("value", ["0", "10", "three"])
def test_the_os_installer_refuses_a_try_count_systemd_boot_cannot_use(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["os-install", "--tries", value])
    assert "--tries: " in capsys.readouterr().err


def test_ssh_when_enabled_is_key_only(tmp_path: Path) -> None:
    p = _profile(tmp_path, '\n[[users]]\nname = "ops"\nssh_keys = ["ssh-ed25519 AAAAC3 ops"]\n')
    p = dataclasses.replace(p, ssh=dataclasses.replace(p.ssh, enabled=True))
    plan = configure_plan(p, pip_wheel=PIP)
    sshd = plan.file("/etc/ssh/sshd_config.d/50-appliance.conf").content
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    assert "AuthenticationMethods publickey" in sshd and "ssh.service" in plan.enable
    assert plan.file("/home/ops/.ssh/authorized_keys").content == "ssh-ed25519 AAAAC3 ops\n"
    assert "tcp dport { 22, 8000, 8001, 8002 }" in plan.file("/etc/nftables.conf").content


def test_static_network(tmp_path: Path) -> None:
    p = _profile(tmp_path)
    p = dataclasses.replace(p, network=dataclasses.replace(
        p.network, mode="static", address="192.0.2.10/24", gateway="192.0.2.1", dns=("192.0.2.53",)))
    net = configure_plan(p, pip_wheel=PIP).file("/etc/systemd/network/50-appliance.network").content
    assert "Address=192.0.2.10/24" in net and "Gateway=192.0.2.1" in net and "DHCP" not in net


# ------------------------------------------------------------------ stage keys


def _fake_lock(mirror: Path, names: tuple[str, ...]) -> None:
    debs = tuple(LockedFile(f"debian/pool/{n}_1_amd64.deb", f"{i:064x}", 1, n, "1", "amd64")
                 for i, n in enumerate(names))
    mirror.mkdir(parents=True, exist_ok=True)
    lock = Lock("trixie", "amd64", "3.13", names, debs, (), (),
                (LockedFile("wheels/w-1-py3-none-any.whl", "ab" * 32, 1, "w", "1"),))
    (mirror / LOCK).write_bytes(lock.canonical())


def _profile_with_bundle(tmp_path: Path, bundle: Path, target: str) -> Path:
    registry = tmp_path / f"registry-{target}"
    make_registry(registry, {target: bundle})
    path = tmp_path / f"images/{target}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[bundles]\nregistry = "{registry}"\ntargets = ["{target}"]\n')
    return path


@pytest.mark.system  # the plan asks mmdebstrap for its version (system set-up)
def test_changing_a_baked_bundle_reruns_configure_but_not_rootfs(tmp_path: Path, affine_bundle: Path) -> None:
    a = _profile_with_bundle(tmp_path, affine_bundle, "a.bundle")
    b = _profile_with_bundle(tmp_path, affine_bundle, "b.bundle")
    _fake_lock(tmp_path / "mirror", package_set(load_profile(a), stage_packages()))
    plan_a = plan_build(a, tmp_path / "mirror", tmp_path / "out", 1700000000)
    plan_b = plan_build(b, tmp_path / "mirror", tmp_path / "out", 1700000000)
    keys_a = {s.name: s.key for s in plan_a.stages}
    keys_b = {s.name: s.key for s in plan_b.stages}
    assert keys_a["rootfs"] == keys_b["rootfs"]
    assert keys_a["configure"] != keys_b["configure"]
    later = plan_build(a, tmp_path / "mirror", tmp_path / "out", 1700000001)
    assert {s.name: s.key for s in later.stages}["rootfs"] != keys_a["rootfs"]  # SOURCE_DATE_EPOCH
    assert not any(s.cached for s in plan_a.stages)


def test_a_package_the_mirror_lacks_fails_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "images/p.toml"
    path.parent.mkdir()
    path.write_text('[debian]\npackages = ["htop"]\n')
    _fake_lock(tmp_path / "mirror", package_set(load_profile(ROOT / "images/minimal.toml"), stage_packages()))
    from provisioning.errors import ProfileError

    with pytest.raises(ProfileError, match=r"p.toml: \[debian\] packages = 'htop': not in the mirror"):
        plan_build(path, tmp_path / "mirror", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ baking


def test_bake_installs_verified_bundles_as_the_agent_would(tmp_path: Path, affine_bundle: Path) -> None:
    registry = make_registry(tmp_path / "registry", {"affine-1.0.0.bundle": affine_bundle})
    baked = bake_bundles(registry, ("affine-1.0.0.bundle",), tmp_path / "state", tmp_path / "trust")
    assert [(b.name, b.version) for b in baked] == [("affine", "1.0.0")]
    installed = tmp_path / "state/models/affine/1.0.0"
    assert sorted(p.name for p in installed.iterdir()) == ["golden.json", "install.json",
                                                           "manifest.json", "model.onnx"]
    assert (tmp_path / "trust/root.json").read_bytes() == (registry / "metadata/1.root.json").read_bytes()
    assert (tmp_path / "trust/metadata/targets.json").is_file()
    # what the agent itself lists and loads: a verified install record and an active version
    from agent.config import InferenceSection
    from agent.inference.repository import ModelRepository

    repo = ModelRepository.for_state_dir(tmp_path / "state", InferenceSection())
    assert [(m["name"], m["version"], m["active"]) for m in repo.installed()] == [("affine", "1.0.0", True)]
    record = json.loads((installed / "install.json").read_text())
    assert record["installed_at"] == 0.0 and record["source"] == "baked:affine-1.0.0.bundle"
    # the node's update client starts from the registry's root
    assert (tmp_path / "state/tuf/metadata/root.json").read_bytes() == (
        registry / "metadata/1.root.json").read_bytes()


def test_bake_installs_an_llm_bundle_next_to_a_model_bundle(tmp_path: Path, affine_bundle: Path) -> None:
    """A generative bundle is verified on its own runtime (golden token ids), not read as an
    ONNX model bundle, and installed where the agent serves it from."""
    from agent.config import InferenceSection
    from agent.fsutil import file_sha256
    from agent.inference.repository import ModelRepository
    from provisioning.demo.bench import tiny_llm_bundle

    llm = tiny_llm_bundle(tmp_path / "llm")
    registry = make_registry(tmp_path / "registry", {"affine-1.0.0.bundle": affine_bundle,
                                                     "tiny-llm-1.0.0.bundle": llm})
    baked = bake_bundles(registry, ("affine-1.0.0.bundle", "tiny-llm-1.0.0.bundle"), tmp_path / "state",
                         tmp_path / "trust")
    assert [(b.name, b.version) for b in baked] == [("affine", "1.0.0"), ("tiny-llm", "1.0.0")]
    assert baked[1].sha256 == file_sha256(llm)
    repo = ModelRepository.for_state_dir(tmp_path / "state", InferenceSection())
    installed = sorted((m["name"], m["active"]) for m in repo.installed())
    assert installed == [("affine", True), ("tiny-llm", True)]


def test_bake_refuses_a_target_that_does_not_match_signed_metadata(tmp_path: Path,
                                                                  affine_bundle: Path) -> None:
    registry = make_registry(tmp_path / "registry", {"affine-1.0.0.bundle": affine_bundle})
    target = registry / "targets/affine-1.0.0.bundle"
    target.write_bytes(target.read_bytes()[:-1] + b"\1")
    with pytest.raises(VerificationError, match="TUF verification failed"):
        bake_bundles(registry, ("affine-1.0.0.bundle",), tmp_path / "state", tmp_path / "trust")
    assert not (tmp_path / "state/models").exists()


def test_agent_unit_trusts_the_site_ca_for_its_own_tls(tmp_path: Path) -> None:
    """With a site CA ([agent.tls] ca), the agent's own TLS trusts it alone (the https source
    test in test_updates_agent.py shows what the environment does); without one, nothing set."""
    from provisioning.image.plan import agent_unit

    assert "SSL_CERT" not in agent_unit(load_profile(ROOT / "images/minimal.toml"))
    enrolled = _profile(tmp_path, '\n[agent.tls]\ncert = "/etc/site/node.crt"\nkey = "/etc/site/node.key"\n'
                                  'ca = "/etc/site/ca.crt"\n')
    unit = agent_unit(enrolled).splitlines()
    assert "Environment=SSL_CERT_FILE=/etc/site/ca.crt" in unit
    assert "Environment=SSL_CERT_DIR=/etc/site" in unit


def test_agent_unit_never_hides_proc_cpuinfo() -> None:
    """ONNX Runtime aborts at load without /proc/cpuinfo: ProcSubset=pid must not reach the
    agent's unit, with or without a GPU (the hil boot found the CPU image's agent dumping core)."""
    from provisioning.image.plan import agent_unit

    unit = agent_unit(load_profile(ROOT / "images/minimal.toml"))
    assert "ProcSubset=pid" not in unit
    assert "PrivateDevices=yes" in unit


def test_compliance_remediations_are_in_the_plan() -> None:
    """Each fix named after the ComplianceAsCode rule it answers (see plan.py)."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    sysctl = plan.file("/etc/sysctl.d/90-appliance.conf").content.splitlines()
    for line in ("kernel.yama.ptrace_scope = 2", "kernel.kptr_restrict = 2",  # sysctl_kernel_*
                 "kernel.dmesg_restrict = 1", "fs.suid_dumpable = 0",
                 "net.ipv4.conf.all.forwarding = 0", "net.ipv6.conf.default.forwarding = 0",
                 "net.ipv6.conf.all.accept_ra = 0", "net.ipv6.conf.default.accept_ra = 0",
                 "net.ipv4.conf.all.accept_redirects = 0", "net.ipv6.conf.all.accept_source_route = 0"):
        assert line in sysctl
    assert len({line.split(" = ")[0] for line in sysctl}) == len(sysctl)  # no key set twice
    modprobe = plan.file("/etc/modprobe.d/50-appliance.conf").content.splitlines()
    for module in ("atm", "can", "dccp", "sctp", "rds", "tipc", "cramfs", "overlay"):
        assert f"install {module} /bin/false" in modprobe and f"blacklist {module}" in modprobe
    for needed in ("virtio_net", "virtio_blk", "squashfs", "dm_verity", "ext4", "vfat", "nvidia"):
        assert not any(needed in line for line in modprobe)  # boot, root, data and GPU stay loadable
    journald = plan.file("/etc/systemd/journald.conf").content
    assert {"Storage=persistent", "Compress=yes", "ForwardToSyslog=no"} <= set(journald.splitlines())
    assert "tmpfs /dev/shm tmpfs mode=1777,nodev,nosuid,noexec 0 0" in plan.file("/etc/fstab").content
    assert "declare -xr TMOUT=600" in plan.file("/etc/profile.d/50-appliance-umask.sh").content
    assert plan.file("/etc/at.allow").mode == plan.file("/etc/cron.allow").mode == 0o640
    assert ("sed", "-i", "$a UMASK\t077", "/etc/login.defs") in plan.commands
    assert ("sed", "-i", "$a umask 077", "/etc/profile") in plan.commands
    assert ("sed", "-i", "$a umask 077", "/etc/bash.bashrc") in plan.commands
    # root's password age is waived, not set: an age counted from the build date would be a
    # fixed expiry date for every node of the release
    assert not any(c[0] == "chage" for c in plan.commands)


def test_audit_rules_cover_both_abis_and_leave_daemons_out() -> None:
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    rules = plan.file("/etc/audit/rules.d/50-appliance.rules").content.splitlines()
    syscall = [r for r in rules if r.startswith("-a always,exit -F arch=")]
    b64 = [r for r in syscall if "arch=b64" in r]
    assert len(b64) == len(syscall) - len(b64) > 10  # every b64 rule has its b32 twin
    for r in b64:
        twin = r.replace("arch=b64", "arch=b32")
        key = r.rsplit(" -k ", 1)[1]
        assert any(t.startswith(twin.split(" -S ")[0]) and t.endswith(f"-k {key}") for t in syscall)
    assert "-w /var/run/faillock -p wa -k logins" in rules
    assert ("-a always,exit -F path=/usr/bin/kmod -F perm=x -F auid>=1000 -F auid!=unset "
            "-k privileged") in rules
    assert rules.index("-c") < rules.index(syscall[0])  # a refused rule does not stop the load


def test_plan_commands_reach_the_chroot_unchanged() -> None:
    """deploys/configure.py joins each argv with shlex for the shell: $, * and tabs must arrive
    as written."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    for argv in plan.commands:
        out = subprocess.run(["sh", "-c", "printf '%s\\0' " + shlex.join(argv)], check=True,
                             capture_output=True).stdout
        assert out.split(b"\0")[:-1] == [a.encode() for a in argv]


def test_setuid_bits_nothing_uses_are_stripped_and_the_rest_audited(tmp_path: Path) -> None:
    """The plan's two last commands, run for real on a tree (paths moved under it): the
    account and mount helpers lose their bits, every setuid/setgid program left gets a rule."""
    from provisioning.image.plan import PRIVILEGED_RULES, STRIPPED_SETUID

    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    strip = next(c for c in plan.commands if "ug-s" in c)
    write = next(c for c in plan.commands if PRIVILEGED_RULES in " ".join(c))
    assert plan.commands.index(strip) < plan.commands.index(write)  # the rules see the stripped bits
    # file_permissions_etc_audit_rulesd, the package's file too
    assert plan.commands[-1] == ("find", "/etc/audit/rules.d", "-name", "*.rules", "-exec", "chmod",
                                 "0600", "{}", "+")
    root = tmp_path / "root"
    for rel, mode in (("usr/bin/passwd", 0o4755), ("usr/bin/su", 0o4755), ("usr/bin/mount", 0o4755),
                      ("usr/bin/chage", 0o2755), ("usr/sbin/unix_chkpwd", 0o2755),
                      ("usr/lib/dbus-1.0/dbus-daemon-launch-helper", 0o4754), ("usr/bin/ls", 0o755),
                      ("usr/bin/sub/passwd", 0o4755)):  # not at the top of usr/bin: kept
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        path.chmod(mode)
    (root / "etc/audit/rules.d").mkdir(parents=True)
    moved = [str(root / a.lstrip("/")) if a in ("/usr/bin", "/usr/sbin") else a for a in strip]
    subprocess.run(moved, check=True)
    assert {"passwd", "su", "mount", "chage"} <= set(STRIPPED_SETUID)
    for rel in ("usr/bin/passwd", "usr/bin/su", "usr/bin/mount", "usr/bin/chage"):
        assert (root / rel).stat().st_mode & 0o6000 == 0, rel
    assert (root / "usr/sbin/unix_chkpwd").stat().st_mode & 0o2000
    assert (root / "usr/bin/sub/passwd").stat().st_mode & 0o4000
    script = write[2].replace("find / ", f"find {root}/ ").replace(f"> {PRIVILEGED_RULES}",
                                                                   f"> {root}{PRIVILEGED_RULES}")
    script = script.replace(f"chmod 0600 {PRIVILEGED_RULES}", f"chmod 0600 {root}{PRIVILEGED_RULES}")
    subprocess.run(["sh", "-c", script], check=True)
    rules = (root / PRIVILEGED_RULES.lstrip("/")).read_text().splitlines()
    paths = [r.split(" -F path=", 1)[1].split(" ", 1)[0].removeprefix(str(root)) for r in rules]
    assert paths == ["/usr/bin/sub/passwd", "/usr/lib/dbus-1.0/dbus-daemon-launch-helper",
                     "/usr/sbin/unix_chkpwd"]
    assert all(r.endswith("-F perm=x -F auid>=1000 -F auid!=unset -k privileged") for r in rules)
    assert (root / PRIVILEGED_RULES.lstrip("/")).stat().st_mode & 0o777 == 0o600


def test_the_tailored_values_are_what_the_image_sets() -> None:
    """Each xccdf:set-value of the shipped tailoring names a sysctl of the plan, with the plan's
    value: a tailored value states the appliance's configuration, never a wish."""
    from provisioning.image.audit import DEFAULT_TAILORING
    from provisioning.image.compliance import load_tailoring
    from provisioning.image.plan import SYSCTLS

    sysctls = {f"sysctl_{k.replace('.', '_')}_value": v for k, v in SYSCTLS}
    values = load_tailoring(DEFAULT_TAILORING).values
    assert values and all(values.values())
    for profile, tailored in values.items():
        for name, value in tailored.items():
            assert sysctls.get(name) == value, (profile, name, value)


def test_audit_rules_in_anssis_forms(tmp_path: Path) -> None:
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    rules = plan.file("/etc/audit/rules.d/50-appliance.rules").content.splitlines()
    for path in ("/sbin/insmod", "/sbin/rmmod", "/sbin/modprobe"):
        assert f"-w {path} -p x -k modules" in rules  # audit_rules_privileged_commands_*
    assert "-w /var/log/faillock -p wa -k logins" in rules  # ANSSI's faillock directory
    assert "/usr/lib/sysctl.d/50-pid-max.conf" in plan.remove  # no second pid_max
    assert "-w /etc/networks -p wa -k system-locale" in rules
    assert "kernel.pid_max = 65536" in plan.file("/etc/sysctl.d/90-appliance.conf").content
    assert plan.file("/etc/securetty").content == "\n"  # no_direct_root_logins
    apt = plan.file("/etc/apt/apt.conf.d/60-appliance-no-recommends").content  # apt_disable_weak_dependencies
    assert 'APT::Install-Recommends "0";' in apt
    path = tmp_path / "images/p.toml"
    path.parent.mkdir(parents=True)
    path.write_text((ROOT / "images/minimal.toml").read_text().replace("auditd = true", "auditd = false"))
    commands = configure_plan(load_profile(path), pip_wheel=PIP).commands
    assert not any("51-privileged" in " ".join(c) for c in commands)  # no auditd, no rules file
    assert commands[-1][0] == "find"  # the bits are stripped all the same


def test_an_audited_build_needs_the_scanner_in_the_mirror(tmp_path: Path) -> None:
    path = tmp_path / "images/p.toml"
    path.parent.mkdir()
    path.write_text("[compliance]\naudit = true\n")
    _fake_lock(tmp_path / "mirror", package_set(load_profile(ROOT / "images/minimal.toml"), stage_packages()))
    from provisioning.errors import ProfileError

    with pytest.raises(ProfileError, match=r"p.toml: \[compliance\] audit = true: the mirror .* no scanner "
                                           r"packages; run `appliance mirror sync-scanner"):
        plan_build(path, tmp_path / "mirror", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_audit_is_part_of_the_configure_stages_key(tmp_path: Path) -> None:
    """The tailoring, the baseline and the scanner packages decide the audit's result, which the
    configure stage writes into the root: each is in the stage's inputs."""
    from provisioning.image.pipeline import BuildContext, _configure_inputs

    path = tmp_path / "images/p.toml"
    path.parent.mkdir()
    floor = tmp_path / "images/floor.json"
    floor.write_text('{"format": 1, "profiles": {"cis_level1_server": {"pass_ratio": 0.5}}}')
    lock = Lock("trixie", "amd64", "3.13", (), (), (), (), ())

    def inputs(text: str) -> dict[str, object]:
        path.write_text(text)
        ctx = BuildContext(load_profile(path), tmp_path / "mirror", lock, tmp_path / "out", 1, ())
        return _configure_inputs(ctx)

    assert "compliance" not in inputs("")
    audited = inputs('[compliance]\naudit = true\nbaseline = "floor.json"\n')
    assert set(audited["compliance"]) == {"scanner", "tailoring", "baseline"}  # type: ignore[arg-type]
    floor.write_text('{"format": 1, "profiles": {"cis_level1_server": {"pass_ratio": 0.6}}}')
    assert inputs('[compliance]\naudit = true\nbaseline = "floor.json"\n') != audited


def test_pam_and_account_remediations_on_debians_own_lines(tmp_path: Path) -> None:
    """The PAM and account commands, run for real on trixie's shipped lines (paths moved under
    a temporary root): no nullok, yescrypt at cost 11, su only for the empty sugroup, and no
    system account with a shell."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    pam = tmp_path / "etc/pam.d"
    pam.mkdir(parents=True)
    (pam / "common-auth").write_text("auth\t[success=1 default=ignore]\tpam_unix.so nullok\n"
                                     "auth\trequisite\t\t\tpam_deny.so\n")
    (pam / "common-password").write_text(
        "# The default is pam_unix.\npassword\t[success=1 default=ignore]\tpam_unix.so obscure yescrypt\n")
    (pam / "su").write_text("auth       sufficient pam_rootok.so\n# auth       required   pam_wheel.so\n")
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/usr/sbin/nologin\nsync:x:4:65534:sync:/bin:/bin/sync\n"
        "tss:x:100:101:TPM software stack:/var/lib/tpm:/bin/false\n"
        "appliance:x:800:800::/var/lib/appliance:/usr/sbin/nologin\nops:x:1000:1000::/home/ops:/bin/bash\n")
    wanted = ("nullok", "rounds=", "pam_wheel", "awk -F:")
    commands = [c for c in plan.commands if any(w in " ".join(c) for w in wanted)]
    assert len(commands) == 4 and ("groupadd", "--system", "sugroup") in plan.commands
    changed = []
    for argv in commands:
        if argv[0] == "sh":  # the account scan: print the accounts instead of changing them
            script = argv[2].replace("/etc/passwd", str(tmp_path / "etc/passwd"))
            script = script.replace("xargs -r -n1 usermod --shell /usr/sbin/nologin", "cat")
            changed = subprocess.run(["sh", "-c", script], check=True, capture_output=True,
                                     text=True).stdout.split()
        else:
            subprocess.run([a.replace("/etc/", f"{tmp_path}/etc/") for a in argv], check=True)
    assert "nullok" not in (pam / "common-auth").read_text()
    assert "pam_unix.so obscure yescrypt rounds=11\n" in (pam / "common-password").read_text()
    assert (pam / "su").read_text().splitlines()[:2] == [
        "auth       sufficient pam_rootok.so", "auth       required   pam_wheel.so use_uid group=sugroup"]
    assert changed == ["tss"]  # not root (locked with nologin already), sync, the agent, a person


def _run_moved(argv: tuple[str, ...], root: Path) -> None:
    subprocess.run([a.replace("/etc/", f"{root}/etc/") for a in argv], check=True)


def test_faillock_and_pwhistory_join_debians_pam_stacks_where_they_take_effect(tmp_path: Path) -> None:
    """pam_faillock and pam_pwhistory, inserted for real into trixie's pam-auth-update output
    (pam_pwquality installed): preauth before pam_unix, authfail right after it (pam_unix's
    success=1 jumps over it to authsucc), the account check last; the history check between
    the quality check and pam_unix, using the password pwquality accepted."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    pam = tmp_path / "etc/pam.d"
    pam.mkdir(parents=True)
    (pam / "common-auth").write_text(
        "# here are the per-package modules (the \"Primary\" block)\n"
        "auth\t[success=1 default=ignore]\tpam_unix.so nullok\n"
        "auth\trequisite\t\t\tpam_deny.so\nauth\trequired\t\t\tpam_permit.so\n")
    (pam / "common-account").write_text(
        "account\t[success=1 new_authtok_reqd=done default=ignore]\tpam_unix.so \n"
        "account\trequisite\t\t\tpam_deny.so\naccount\trequired\t\t\tpam_permit.so\n")
    (pam / "common-password").write_text(
        "password\trequisite\t\t\tpam_pwquality.so retry=3\n"
        "password\t[success=1 default=ignore]\tpam_unix.so obscure use_authtok try_first_pass yescrypt\n"
        "password\trequisite\t\t\tpam_deny.so\npassword\trequired\t\t\tpam_permit.so\n")
    stacks = [f"/etc/pam.d/common-{n}" for n in ("auth", "account", "password")]
    commands = [c for c in plan.commands if any(f in c for f in stacks)]
    assert len(commands) == 5  # nullok (auth and password in one), rounds, faillock auth, account, pwhistory
    for argv in commands:
        _run_moved(argv, tmp_path)

    def modules(name: str) -> list[str]:
        return [" ".join(line.split()[1:]) for line in (pam / name).read_text().splitlines()
                if line and not line.startswith("#")]

    assert modules("common-auth") == [
        "required pam_faillock.so preauth", "[success=1 default=ignore] pam_unix.so",
        "[default=die] pam_faillock.so authfail", "sufficient pam_faillock.so authsucc",
        "requisite pam_deny.so", "required pam_permit.so"]
    assert modules("common-account")[-1] == "required pam_faillock.so"
    assert modules("common-password")[:3] == [
        "requisite pam_pwquality.so retry=3",
        "requisite pam_pwhistory.so remember=24 enforce_for_root use_authtok",
        "[success=1 default=ignore] pam_unix.so obscure use_authtok try_first_pass yescrypt rounds=11"]
    files = {f.path: f.content for f in plan.files}
    assert "deny = 3\n" in files["/etc/security/faillock.conf"]
    assert "minlen = 15\n" in files["/etc/security/pwquality.conf"]


def test_auditd_conf_logrotate_and_coredump_limits_are_edited_in_place(tmp_path: Path) -> None:
    """auditd.conf keeps Debian's other lines; only the audit logs' group and the write-error
    action change, and the log directory becomes root's alone. logrotate rotates daily. Without
    core dumps, systemd's limits.d file that lifts the hard limit goes."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    conf = tmp_path / "etc/audit/auditd.conf"
    conf.parent.mkdir(parents=True)
    debian = ("local_events = yes\nlog_file = /var/log/audit/audit.log\nlog_group = adm\n"
              "disk_full_action = SUSPEND\ndisk_error_action = SUSPEND\n")
    conf.write_text(debian)
    commands = [c for c in plan.commands if "/etc/audit/auditd.conf" in c]
    assert commands
    for argv in commands:
        _run_moved(argv, tmp_path)
    assert conf.read_text() == debian.replace("log_group = adm", "log_group = root").replace(
        "disk_error_action = SUSPEND", "disk_error_action = SYSLOG")
    assert plan.commands.index(("chgrp", "root", "/var/log/audit")) < plan.commands.index(
        ("chmod", "0700", "/var/log/audit"))
    rotate = tmp_path / "etc/logrotate.conf"
    rotate.write_text("# see \"man logrotate\"\nweekly\nrotate 4\ncreate\ninclude /etc/logrotate.d\n")
    for argv in (c for c in plan.commands if "/etc/logrotate.conf" in c):
        _run_moved(argv, tmp_path)
    assert rotate.read_text().splitlines()[1:3] == ["daily", "rotate 4"]
    assert "/etc/security/limits.d/10-coredump-debian.conf" in plan.remove
    profile = ROOT / "images/minimal.toml"
    dumps = tmp_path / "dumps.toml"
    dumps.write_text(profile.read_text().replace("core_dumps = false", "core_dumps = true"))
    assert "core_dumps = true" in dumps.read_text()
    assert "/etc/security/limits.d/10-coredump-debian.conf" not in configure_plan(
        load_profile(dumps), pip_wheel=PIP).remove


def test_unused_units_are_masked_and_the_kept_services_sandboxed(tmp_path: Path) -> None:
    """Console logins, the password agents, /dev/initctl and binfmt_misc are masked in every
    image; auditd, dbus, udevd and usbguard get a [Service] drop-in each (auditd's and
    usbguard's only when the image has them), and udevd its native-only ABI back."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    assert {"getty@.service", "serial-getty@.service", "systemd-ask-password-console.path",
            "systemd-initctl.socket", "systemd-binfmt.service",
            "proc-sys-fs-binfmt_misc.automount"} <= set(plan.mask)
    dropins = {f.path: f.content for f in plan.files if f.path.endswith("/50-appliance-sandbox.conf")}
    assert set(dropins) == {f"/etc/systemd/system/{u}.d/50-appliance-sandbox.conf"
                            for u in ("auditd.service", "dbus.service", "systemd-udevd.service",
                                      "usbguard.service")}
    for text in dropins.values():
        lines = text.splitlines()
        assert lines[1] == "[Service]" and "NoNewPrivileges=yes" in lines, text
        assert all("=" in ln for ln in lines[2:]), text
    auditd = dropins["/etc/systemd/system/auditd.service.d/50-appliance-sandbox.conf"]
    assert "RestrictAddressFamilies=AF_UNIX AF_NETLINK\n" in auditd and "CAP_AUDIT_CONTROL" in auditd
    udevd = dropins["/etc/systemd/system/systemd-udevd.service.d/50-appliance-sandbox.conf"].splitlines()
    assert "SystemCallFilter=~@raw-io" in udevd and any("CAP_SYS_TTY_CONFIG" in ln for ln in udevd)
    # Debian's drop-in that lets udev run any ABI is replaced by one of the same name in /etc
    abi = plan.file("/etc/systemd/system/systemd-udevd.service.d/syscall-architecture.conf").content
    assert abi.splitlines()[1:] == ["[Service]", "SystemCallArchitectures=native"]
    profile = tmp_path / "no-auditd.toml"
    profile.write_text((ROOT / "images/minimal.toml").read_text().replace("auditd = true", "auditd = false"))
    assert "auditd = false" in profile.read_text()
    without = configure_plan(load_profile(profile), pip_wheel=PIP)
    assert not any(f.path.startswith("/etc/systemd/system/auditd.service.d/") for f in without.files)


def test_the_audit_rules_are_merged_after_the_files_that_hold_them(tmp_path: Path) -> None:
    """augenrules reads rules.d/50-appliance.rules, a file of the plan, and commands run before
    the files are written: so the merge is an after-files command, kept by the plan's JSON
    (what the deploy reads), and absent without auditd."""
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    assert "/etc/audit/rules.d/50-appliance.rules" in {f.path for f in plan.files}
    assert [argv[:2] for argv in plan.after_files] == [("sh", "-c")]
    assert "augenrules --check" in plan.after_files[0][2] and "auditctl" in plan.after_files[0][2]
    assert not any("augenrules" in " ".join(argv) for argv in plan.commands)
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    deploy = (ROOT / "provisioning/image/deploys/configure.py").read_text()
    order = [deploy.index(f'plan["{key}"]') for key in ("commands", "files", "after_files", "enable")]
    assert order == sorted(order), order
    profile = tmp_path / "no-auditd.toml"
    profile.write_text((ROOT / "images/minimal.toml").read_text().replace("auditd = true", "auditd = false"))
    assert configure_plan(load_profile(profile), pip_wheel=PIP).after_files == ()


def test_usbguard_blocks_every_usb_device_no_rule_allows(tmp_path: Path) -> None:
    """[hardening] usbguard: the package, the daemon's settings (a device plugged in is checked,
    anything unmatched blocked, IPC for root only), the USB bus there before the daemon, hubs
    then the profile's rules, the plugdev grant of the package removed, the D-Bus front end
    masked; a bad rule is refused by name."""
    from provisioning.errors import ProfileError
    from provisioning.image.plan import USB_HUB_RULE, USBGUARD_DAEMON_CONF
    from provisioning.image.profile import package_set

    text = (ROOT / "images/minimal.toml").read_text()
    stick = 'allow id 0781:5583 serial "4C530001" with-interface equals { 08:06:50 }'
    site = tmp_path / "site.toml"
    site.write_text(text.replace("[hardening]\n", f"[hardening]\nusb_allow = ['{stick}']\n", 1))
    profile = load_profile(site)
    plan = configure_plan(profile, pip_wheel=PIP)
    assert "usbguard" in package_set(profile) and "cryptsetup-bin" in package_set(profile)
    conf = plan.file("/etc/usbguard/usbguard-daemon.conf")
    assert conf.content == USBGUARD_DAEMON_CONF and conf.mode == 0o600
    settings = dict(line.split("=", 1) for line in conf.content.splitlines() if "=" in line)
    assert settings["ImplicitPolicyTarget"] == "block" and settings["IPCAllowedGroups"] == "root"
    assert settings["InsertedDevicePolicy"] == settings["PresentControllerPolicy"] == "apply-policy"
    assert settings["PresentDevicePolicy"] == "keep"  # a USB disk the initrd booted from stays
    assert plan.file("/etc/modules-load.d/50-appliance-usbguard.conf").content == "usbcore\n"
    rules = [ln for ln in plan.file("/etc/usbguard/rules.conf").content.splitlines()
             if not ln.startswith("#")]
    assert rules == [USB_HUB_RULE, stick]
    assert "usbguard.service" in plan.enable and "usbguard-dbus.service" in plan.mask
    assert "/etc/usbguard/IPCAccessControl.d" in plan.remove
    site.write_text(text.replace("[hardening]\n", "[hardening]\nusb_allow = ['allow\\nblock']\n", 1))
    with pytest.raises(ProfileError, match=r"site.toml: \[hardening\] usb_allow.*not a USBGuard rule"):
        load_profile(site)
    site.write_text(text.replace("[hardening]\n", "[hardening]\nusbguard = false\n", 1))
    off = load_profile(site)
    plan = configure_plan(off, pip_wheel=PIP)
    assert "usbguard" not in package_set(off) and "usbguard.service" not in plan.enable
    assert not any(f.path.startswith(("/etc/usbguard", "/etc/systemd/system/usbguard")) for f in plan.files)


def test_the_legal_banner_is_the_sites_and_gives_nothing_away(tmp_path: Path) -> None:
    from provisioning.errors import ProfileError
    from provisioning.image.profile import DEFAULT_BANNER

    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    assert plan.file("/etc/issue").content == plan.file("/etc/issue.net").content == DEFAULT_BANNER + "\n"
    text = (ROOT / "images/minimal.toml").read_text()
    site = tmp_path / "site.toml"
    site.write_text(text.replace("[hardening]\n", '[hardening]\nbanner = "Property of X. Keep out."\n', 1))
    assert configure_plan(load_profile(site), pip_wheel=PIP).file("/etc/issue").content == \
        "Property of X. Keep out.\n"
    site.write_text(text.replace("[hardening]\n", '[hardening]\nbanner = "Debian \\\\r on \\\\m"\n', 1))
    with pytest.raises(ProfileError, match=r"\[hardening\] banner.*without backslashes"):
        load_profile(site)
