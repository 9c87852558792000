"""Image profiles: one TOML file per appliance kind, parsed once into frozen dataclasses.

Every section is a table of :func:`agent.settings.setting` fields, so parsing, ``--json``
dumps and error messages come from one definition.  Errors name the file, the key and the
value (``images/edge.toml: [gpu] manifest = 'nvidia-999': no such firmware manifest ...``).

Checks that need only the profile and the files it names run in :func:`load_profile`;
the check against a synced mirror (every package present) is :func:`check_against_mirror`,
run by ``appliance build`` before any heavy work.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import SECTIONS as AGENT_SECTIONS
from agent.config import AgentConfig, SealSection
from agent.cpu import DEFAULT_LEVEL as DEFAULT_CPU_LEVEL
from agent.errors import ConfigError
from agent.settings import from_table, path_problem, read_toml, setting, to_json
from provisioning.errors import ImageError, ProfileError
from provisioning.image.gpu_manifest import GpuManifest, check_compatibility, gpu_packages, load_manifest
from provisioning.image.pcrsign import load_pcr_key
from provisioning.image.recovery import load_recovery_public_key

__all__ = [
    "APPARMOR_PACKAGES",
    "BASE_PACKAGES",
    "HARDENING_PACKAGES",
    "PYTHON_BY_SUITE",
    "BundlesSection",
    "ComplianceSection",
    "DebianSection",
    "DiagnosticsSection",
    "DiskSection",
    "GpuSection",
    "HardeningSection",
    "ImageSection",
    "NetworkSection",
    "PkiSection",
    "Profile",
    "PythonSection",
    "SshSection",
    "TimeSection",
    "TpmSection",
    "User",
    "load_profile",
    "package_set",
]

# Debian suite -> (Python version of its python3, glibc version) for choosing wheels.
PYTHON_BY_SUITE: dict[str, tuple[str, str]] = {
    "bookworm": ("3.11", "2.36"),
    "trixie": ("3.13", "2.41"),
}
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}

# What every image needs whatever the profile says: the pipeline's own stages rely on these.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "python3", "python3-venv",
    "nftables", "apparmor", "auditd", "systemd-timesyncd", "iproute2", "ca-certificates",
    "libpam-modules", "passwd", "login",
)
# What the hardening benchmarks ask every image to carry (plan.py configures them; the audit's
# rule ids): package_pam_pwquality_installed (password quality for any password ever set) and
# package_logrotate_installed (the package logs in /var/log stay bounded).
# cryptsetup-bin: veritysetup, to inspect the root's dm-verity on a node (`veritysetup status`,
# `veritysetup verify` re-reads every block against the hash tree): the image's file integrity
# tool, and how Lynis (FINT-4341) finds one.
HARDENING_PACKAGES: tuple[str, ...] = ("libpam-pwquality", "logrotate", "cryptsetup-bin")
# With AppArmor on: package_apparmor-utils_installed (aa-status, to inspect the profiles on a
# node) and package_pam_apparmor_installed (the PAM module that confines a login's hat).
APPARMOR_PACKAGES: tuple[str, ...] = ("apparmor-utils", "libpam-apparmor")

_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")
_REQ_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?(==[A-Za-z0-9.+!*-]+)?$")


# x86-64 (v1) is not offered: numpy 2.x's wheels need x86-64-v2 at least.
CPU_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")


def _one_of(*choices: str) -> Any:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return check


# usbguard-rules.conf(5): a target, then the device's attributes; one rule per line.
_USB_RULE_RE = re.compile(r"^(allow|block|reject)( [ -~]+)?$")
DEFAULT_BANNER = ("Authorized uses only. This system is the private property of its owner and access "
                  "is restricted to authorized users under the site's security policy. All activity "
                  "may be monitored, logged and reported to law enforcement; unauthorized use may "
                  "lead to criminal prosecution. Continued use constitutes consent to these terms.")


def _usb_rules(v: tuple[str, ...]) -> str | None:
    bad = [r for r in v if not _USB_RULE_RE.match(r)]
    return (f"not a USBGuard rule (allow|block|reject, then attributes, printable ASCII on one "
            f"line): {bad[0]!r}" if bad else None)


def _banner(v: str) -> str | None:
    # getty expands backslash escapes (\s \r \v \m: the OS and kernel), which the banner
    # must not give away (banner_etc_issue_cis)
    if not v.strip() or "\\" in v or not v.isprintable():
        return "must be printable text without backslashes (getty would expand \\s, \\r, \\v, \\m)"
    return None


def _packages(v: tuple[str, ...]) -> str | None:
    bad = [p for p in v if not _PKG_RE.match(p)]
    return f"not a Debian package name: {bad[0]!r}" if bad else None


def _ports(v: tuple[int, ...]) -> str | None:
    bad = [p for p in v if not 1 <= p <= 65535]
    return f"not a TCP port: {bad[0]}" if bad else None


def _mib(v: int) -> str | None:
    return None if v >= 16 else "must be at least 16 MiB"


def _hostname(v: str) -> str | None:
    return None if _HOST_RE.match(v) else "not a hostname label ([a-z0-9-], at most 63)"


def _url(v: str) -> str | None:
    return None if re.match(r"^https?://[^\s]+$", v) else "not an http(s) URL"


def _epoch(v: int) -> str | None:
    return None if v >= 0 else "must not be negative"


def _requirements(v: tuple[str, ...]) -> str | None:
    bad = [r for r in v if not _REQ_RE.match(r)]
    return f"not a requirement NAME or NAME==VERSION: {bad[0]!r}" if bad else None


@dataclass(frozen=True)
class ImageSection:
    name: str = setting("appliance", "image name (used in output file names)", check=_hostname)
    hostname: str = setting("appliance", "the node's hostname", check=_hostname)
    description: str = setting("", "what this appliance is for")
    version: str = setting("", "image version (default: YYYYMMDD.HHMMSS of SOURCE_DATE_EPOCH); "
                           "numbers and dots, so that it is also a registry version",
                           check=lambda v: None if not v or re.match(r"^\d{1,9}(\.\d{1,9}){0,3}$", v)
                           else "must be 1-4 dot-separated numbers such as 20260102.1")
    source_date_epoch: int = setting(1767225600, "timestamp for reproducible output "
                                     "(SOURCE_DATE_EPOCH in the environment wins)", check=_epoch)
    cpu_level: str = setting(DEFAULT_CPU_LEVEL, "x86-64 psABI level the node's CPU must reach: "
                             "the image's numpy 2.x and ONNX Runtime wheels are built for "
                             "x86-64-v2; the boot check names the missing CPU features and "
                             "`appliance boot` refuses a qemu CPU model below it",
                             check=_one_of(*CPU_LEVELS))


@dataclass(frozen=True)
class DebianSection:
    suite: str = setting("trixie", "Debian suite", check=_one_of(*PYTHON_BY_SUITE))
    architecture: str = setting("amd64", "Debian architecture", check=_one_of(*ARCHES))
    archive: str = setting("http://deb.debian.org/debian", "Debian archive used by mirror sync",
                           check=_url)
    components: tuple[str, ...] = setting(("main",), "archive components",
                                          check=lambda v: None if set(v) <= {
                                              "main", "contrib", "non-free", "non-free-firmware"}
                                          and "main" in v else "main plus any of contrib, "
                                          "non-free, non-free-firmware")
    variant: str = setting("minbase", "mmdebstrap variant", check=_one_of("minbase", "apt"))
    kernel: str = setting("", "kernel package (default linux-image-ARCH)", check=lambda v: None
                          if not v or _PKG_RE.match(v) else "not a Debian package name")
    packages: tuple[str, ...] = setting((), "packages on top of the base set", check=_packages)


@dataclass(frozen=True)
class PythonSection:
    onnxruntime: str = setting("onnxruntime", "the distribution that provides onnxruntime in "
                               "the agent's venv (onnxruntime-gpu for GPU images)",
                               check=_one_of("onnxruntime", "onnxruntime-gpu"))
    extra: tuple[str, ...] = setting((), "extra requirements for the agent's venv",
                                     check=_requirements)


@dataclass(frozen=True)
class HardeningSection:
    apparmor: bool = setting(True, "AppArmor enabled (kernel command line and service)")
    auditd: bool = setting(True, "auditd with the appliance's rules")
    sysctl: bool = setting(True, "kernel and network hardening sysctls")
    tmp_noexec: bool = setting(True, "/tmp and /var/tmp as tmpfs with nodev,nosuid,noexec")  # noqa: S108
    core_dumps: bool = setting(False, "allow core dumps")
    lock_root: bool = setting(True, "lock root's password (no password logins at all)")
    audit_immutable: bool = setting(True, "make the audit rules immutable until reboot (-e 2)")
    proc_hidepid: bool = setting(True, "/proc with hidepid=invisible: a process sees only its own "
                                 "user's processes (root's services, with CAP_SYS_PTRACE, all)")
    usbguard: bool = setting(True, "USBGuard: a USB device plugged in works only if a rule allows "
                             "it (hubs by default); those present at boot keep their state")
    usb_allow: tuple[str, ...] = setting((), "more USBGuard rules, one per line, after the hubs' "
                                         "(e.g. 'allow id 0781:5583 serial \"4C53...\"' for a site's "
                                         "update stick)", check=_usb_rules)
    banner: str = setting(DEFAULT_BANNER, "the legal notice in /etc/issue and /etc/issue.net",
                          check=_banner)


@dataclass(frozen=True)
class BundlesSection:
    registry: str = setting("", "local TUF registry directory (metadata/ and targets/); "
                            "relative paths are from the profile's directory", check=path_problem)
    targets: tuple[str, ...] = setting((), "target names of the bundles to bake in",
                                       check=lambda v: next((f"not a target name: {t!r}" for t in v
                                                             if not _TARGET_RE.match(t)), None))


@dataclass(frozen=True)
class GpuSection:
    manifest: str = setting("", "firmware manifest (firmware-manifests/NAME.toml or NAME)",
                            check=lambda v: path_problem(v if v.endswith(".toml") else f"{v}.toml"))
    signing_key: str = setting("", "PEM private key that signs the DKMS-built modules for Secure "
                               "Boot (the key enrolled through the image's Secure Boot settings; "
                               "relative paths are from the profile's directory)", check=path_problem)
    signing_cert: str = setting("", "its X.509 certificate (PEM or DER)", check=path_problem)


@dataclass(frozen=True)
class DiskSection:
    esp_mib: int = setting(512, "EFI system partition size", check=_mib)
    root_mib: int = setting(2048, "size of each root slot (A and B)", check=_mib)
    data_mib: int = setting(1024, "initial data partition size (grows on first boot)", check=_mib)
    data_label: str = setting("data", "GPT partition label of the data partition",
                              check=_hostname)


@dataclass(frozen=True)
class NetworkSection:
    mode: str = setting("dhcp", "dhcp or static", check=_one_of("dhcp", "static"))
    interface: str = setting("en*", "interface name match (systemd-networkd Name=)")
    address: str = setting("", "static address with prefix, e.g. 192.0.2.10/24")
    gateway: str = setting("", "static default gateway")
    dns: tuple[str, ...] = setting((), "DNS servers (static mode)")
    allow_tcp: tuple[int, ...] = setting((), "extra inbound TCP ports (agent ports are always open)",
                                         check=_ports)


def _ips(v: tuple[str, ...]) -> str | None:
    for value in v:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return f"not an IP address: {value!r}"
    return None


# Where a baked node certificate lives in the image (the agent's [tls] defaults to these).
TLS_IN_ROOT = "/etc/appliance/tls"
# Where the agent's unit copies the firmware's TPM event log (the agent's [attest] default).
FIRMWARE_LOG_COPY = "/run/appliance-agent/tpm-firmware-log"


@dataclass(frozen=True)
class PkiSection:
    """A node certificate issued from a site PKI at build time (test benches, labs).

    Production nodes are enrolled instead (provisioning/ansible/enroll.yml): their private key
    is made on the node and never sits in an image that can be copied.
    """

    dir: str = setting("", "site PKI directory (`appliance pki init`); empty: no baked "
                       "certificate; relative paths are from the profile's directory",
                       check=path_problem)
    node: str = setting("", "the node certificate's name (default: [image] hostname)")
    dns: tuple[str, ...] = setting((), "DNS subject alternative names (default: the node name)")
    ips: tuple[str, ...] = setting((), "IP subject alternative names, e.g. 127.0.0.1 for a "
                                   "qemu port forward", check=_ips)
    days: int = setting(30, "validity of the baked certificate",
                        check=lambda v: None if 1 <= v <= 3650 else "must be 1..3650 days")
    passphrase_file: str = setting("", "file holding the CA key's passphrase (if it has one)",
                                   check=path_problem)


@dataclass(frozen=True)
class DiagnosticsSection:
    console_listeners: bool = setting(False, "once the agent serves, print the node's listening "
                                      "sockets (ss -ltun) to the serial console, each line "
                                      "prefixed 'appliance-listen:' (for hil/ checks)")
    console_journal: bool = setting(False, "forward the journal (info and above) to the serial "
                                    "console, so a bench sees why a unit failed")
    console_scap: bool = setting(False, "carry OpenSCAP and the audit's content, and evaluate on the "
                                 "running node, once per image, the rules the build's offline audit "
                                 "failed; the results go to the serial console, prefixed "
                                 "'appliance-scap:' (bench images; needs [compliance] audit)")
    console_lynis: bool = setting(False, "carry Lynis and run it on the running node once per image, "
                                  "in the background once the agent serves: the report stays in "
                                  "/var/lib/appliance-lynis, the hardening index and warnings go to "
                                  "the serial console, prefixed 'appliance-lynis:' (bench images)")
    console_boot_times: bool = setting(False, "once the boot has finished, print where its time went "
                                       "(systemd-analyze time, the agent's critical chain, the "
                                       "slowest units) to the serial console, prefixed "
                                       "'appliance-boot:' (bench images)")


# Kernel arguments the seal stage owns (provisioning/image/seal.py): a profile cannot set them.
SEAL_OWNED_ARGS = ("root=", "roothash=", "rootfstype=", "rootflags=", "systemd.verity",
                   "systemd.gpt_auto", "systemd.mount-extra=", "usrhash=", "mount.usr", "init=",
                   "rd.break", "systemd.unit=")
_KARG_RE = re.compile(r"^[A-Za-z0-9_.,:=/+@-]+$")


def _kernel_args(v: tuple[str, ...]) -> str | None:
    for arg in v:
        if not _KARG_RE.match(arg):
            return f"not one kernel argument (no spaces or quotes): {arg!r}"
        if arg in {"ro", "rw"} or arg.startswith(SEAL_OWNED_ARGS):
            return f"{arg!r}: the sealed command line sets this itself"
    return None


@dataclass(frozen=True)
class BootSection:
    cmdline: tuple[str, ...] = setting((), "extra kernel arguments, sealed into the UKI after the "
                                       "hardening ones (e.g. systemd.mask=UNIT for a test image)",
                                       check=_kernel_args)
    tries: int = setting(3, "boots a new OS release gets on trial before the firmware returns to "
                         "the running slot (systemd-boot's try counter; the boot counts once the "
                         "agent serves)", check=lambda v: None if 1 <= v <= 9 else "must be 1 to 9")


@dataclass(frozen=True)
class TpmSection:
    pcr_key: str = setting("", "PEM RSA-2048 private key of the site that signs each UKI's PCR 11 "
                           "policy (ukify --pcr-private-key): data sealed to the TPM unlocks under "
                           "any image this key signs and no other (relative paths are from the "
                           "profile's directory; empty: the UKI's policy is not signed)",
                           check=path_problem)
    seal_data: bool = setting(False, "the node makes its data partition (/var: models, keys, journal) "
                              "at first boot as LUKS2, its key sealed to its TPM under PCR 7 and the "
                              "PCR 11 policy pcr_key signs: readable only on that node, booted from "
                              "an image the site signed (needs pcr_key, recovery_key and a TPM 2.0)")
    recovery_key: str = setting("", "PEM RSA (>= 2048 bits) public key of the site: a node with sealed "
                                "data escrows its recovery key to it, on its ESP, at first boot; the "
                                "private half stays with the site (relative paths are from the "
                                "profile's directory)", check=path_problem)


@dataclass(frozen=True)
class ComplianceSection:
    audit: bool = setting(False, "audit the configured root at build time, offline, as `appliance audit` "
                          "does (the mirror needs the scanner packages: `appliance mirror "
                          "sync-scanner`); the summary goes into image.json, image-manifest.json "
                          "and the node's inventory")
    baseline: str = setting("", "a baseline.json (images/compliance/baseline.json) whose pass ratios "
                            "the build must reach: a profile below it fails the build (relative "
                            "paths are from the profile's directory; empty: no floor)",
                            check=path_problem)


@dataclass(frozen=True)
class TimeSection:
    ntp: tuple[str, ...] = setting((), "site NTP servers (none: keep the hardware clock)")


@dataclass(frozen=True)
class SshSection:
    enabled: bool = setting(False, "run sshd (key-only; needs a user with ssh_keys)")
    port: int = setting(22, "sshd port", check=lambda v: None if 1 <= v <= 65535 else "not a TCP port")


@dataclass(frozen=True)
class User:
    name: str = setting("", "login name", check=lambda v: None if _NAME_RE.match(v) else
                        "not a login name ([a-z_][a-z0-9_-]*)")
    uid: int = setting(1000, "numeric uid (fixed for reproducible images)",
                       check=lambda v: None if 1000 <= v < 60000 else "must be 1000-59999")
    groups: tuple[str, ...] = setting((), "supplementary groups")
    ssh_keys: tuple[str, ...] = setting((), "authorized SSH public keys",
                                        check=lambda v: next((f"not an SSH public key: {k[:40]!r}"
                                                              for k in v if not re.match(
                                                                  r"^(ssh-|ecdsa-|sk-)\S+ \S+", k)),
                                                             None))


@dataclass(frozen=True)
class Profile:
    path: Path
    image: ImageSection = field(default_factory=ImageSection)
    debian: DebianSection = field(default_factory=DebianSection)
    python: PythonSection = field(default_factory=PythonSection)
    hardening: HardeningSection = field(default_factory=HardeningSection)
    bundles: BundlesSection = field(default_factory=BundlesSection)
    gpu: GpuSection = field(default_factory=GpuSection)
    disk: DiskSection = field(default_factory=DiskSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    time: TimeSection = field(default_factory=TimeSection)
    ssh: SshSection = field(default_factory=SshSection)
    pki: PkiSection = field(default_factory=PkiSection)
    diagnostics: DiagnosticsSection = field(default_factory=DiagnosticsSection)
    boot: BootSection = field(default_factory=BootSection)
    tpm: TpmSection = field(default_factory=TpmSection)
    compliance: ComplianceSection = field(default_factory=ComplianceSection)
    users: tuple[User, ...] = ()
    agent: AgentConfig = field(default_factory=AgentConfig)
    gpu_set: GpuManifest | None = None  # the parsed [gpu] manifest, set by load_profile

    @property
    def python_version(self) -> str:
        return PYTHON_BY_SUITE[self.debian.suite][0]

    @property
    def glibc_version(self) -> str:
        return PYTHON_BY_SUITE[self.debian.suite][1]

    @property
    def machine(self) -> str:
        return ARCHES[self.debian.architecture]

    @property
    def kernel_package(self) -> str:
        return self.debian.kernel or f"linux-image-{self.debian.architecture}"

    @property
    def registry_dir(self) -> Path | None:
        if not self.bundles.registry:
            return None
        return (self.path.parent / self.bundles.registry).resolve()

    @property
    def pki_dir(self) -> Path | None:
        return (self.path.parent / self.pki.dir).resolve() if self.pki.dir else None

    @property
    def pki_passphrase_file(self) -> Path | None:
        if not self.pki.passphrase_file:
            return None
        return (self.path.parent / self.pki.passphrase_file).resolve()

    @property
    def gpu_manifest(self) -> Path | None:
        return _resolve_manifest(self.path, self.gpu.manifest) if self.gpu.manifest else None

    @property
    def gpu_signing(self) -> tuple[Path, Path] | None:
        """(key, certificate) that sign the GPU modules, or None when they stay unsigned."""
        if not self.gpu.signing_key:
            return None
        base = self.path.parent
        return (base / self.gpu.signing_key).resolve(), (base / self.gpu.signing_cert).resolve()

    @property
    def pcr_key(self) -> Path | None:
        """The site's PCR policy signing key ([tpm] pcr_key), or None when the UKI is not signed so."""
        return (self.path.parent / self.tpm.pcr_key).resolve() if self.tpm.pcr_key else None

    @property
    def recovery_key(self) -> Path | None:
        """The site's recovery public key ([tpm] recovery_key), or None."""
        return (self.path.parent / self.tpm.recovery_key).resolve() if self.tpm.recovery_key else None

    @property
    def compliance_baseline(self) -> Path | None:
        """The pass ratios the build must reach ([compliance] baseline), or None."""
        c = self.compliance
        return (self.path.parent / c.baseline).resolve() if c.baseline else None

    @property
    def inbound_tcp(self) -> tuple[int, ...]:
        """Every TCP port the firewall opens: the agent's three, sshd's when enabled, the extras."""
        ports = {self.agent.server.port, *self.network.allow_tcp}
        if self.agent.server.metrics_port:
            ports.add(self.agent.server.metrics_port)
        if self.agent.server.http_port:  # the HTTPS port (OpenAI-compatible and KServe REST)
            ports.add(self.agent.server.http_port)
        if self.ssh.enabled:
            ports.add(self.ssh.port)
        return tuple(sorted(ports))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path)}
        for name in _SECTIONS:
            out[name] = to_json(getattr(self, name))
        out["users"] = [to_json(u) for u in self.users]
        out["agent"] = self.agent.to_json()
        return out


_SECTIONS: dict[str, type[Any]] = {
    "image": ImageSection,
    "debian": DebianSection,
    "python": PythonSection,
    "hardening": HardeningSection,
    "bundles": BundlesSection,
    "gpu": GpuSection,
    "disk": DiskSection,
    "network": NetworkSection,
    "time": TimeSection,
    "ssh": SshSection,
    "pki": PkiSection,
    "diagnostics": DiagnosticsSection,
    "boot": BootSection,
    "tpm": TpmSection,
    "compliance": ComplianceSection,
}


def package_set(profile: Profile, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The sorted Debian packages the image installs: base, hardening (AppArmor's with it), kernel,
    sshd and the scanners when on, profile, extra."""
    names = {*BASE_PACKAGES, *HARDENING_PACKAGES, profile.kernel_package, *profile.debian.packages,
             *extra}
    if profile.hardening.apparmor:
        names.update(APPARMOR_PACKAGES)
    if profile.hardening.usbguard:
        names.add("usbguard")
    if profile.gpu_set is not None:
        names.update(gpu_packages(profile))
    if profile.ssh.enabled:
        names.add("openssh-server")
    if profile.diagnostics.console_lynis:
        names.add("lynis")
    if profile.diagnostics.console_scap:
        names.add("openscap-scanner")
    return tuple(sorted(names))


def _resolve_manifest(profile_path: Path, value: str) -> Path:
    rel = value if value.endswith(".toml") else f"firmware-manifests/{value}.toml"
    for base in (profile_path.parent, profile_path.parent.parent):
        candidate = (base / rel).resolve()
        if candidate.is_file():
            return candidate
    return (profile_path.parent.parent / rel).resolve()


def load_profile(path: Path) -> Profile:
    """Read and check an image profile.

    Raises:
        NotFoundError-like ProfileError: the file, the registry, a bundle target or the GPU
            manifest it names does not exist.
        ProfileError: malformed TOML, an unknown section or key, a wrong type or a bad value;
            the message names the file, the key and the value.
    """
    data = read_toml(path, what="profile", error=ProfileError)
    known = [*_SECTIONS, "users", "agent"]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ProfileError(f"{path}: unknown section [{unknown[0]}] (known: {', '.join(known)})")
    try:
        sections = {name: from_table(cls, data.get(name, {}), f"{path}: [{name}]")
                    for name, cls in _SECTIONS.items()}
        users = _users(path, data.get("users", []))
        agent = _agent(path, data.get("agent", {}), baked_tls=bool(sections["pki"].dir))
    except ProfileError:
        raise
    except ConfigError as exc:
        raise ProfileError(str(exc)) from None
    profile = Profile(path=path, users=users, agent=agent, **sections)
    _check(profile)
    if profile.gpu.manifest:
        profile = replace(profile, gpu_set=_gpu_set(profile))
    return profile


def _gpu_set(p: Profile) -> GpuManifest:
    """Load the [gpu] manifest and refuse a driver set that cannot work on this image."""
    where = f"{p.path}: [gpu] manifest = {p.gpu.manifest!r}"
    assert p.gpu_manifest is not None
    manifest = load_manifest(p.gpu_manifest)
    if p.python.onnxruntime != manifest.runtime.onnxruntime:
        raise ProfileError(f"{p.path}: [python] onnxruntime = {p.python.onnxruntime!r}: the GPU "
                           f"manifest {manifest.path.name} needs {manifest.runtime.onnxruntime!r}")
    missing = [c for c in manifest.manifest.components if c not in p.debian.components]
    if missing:
        raise ProfileError(f"{p.path}: [debian] components = {list(p.debian.components)!r}: the "
                           f"GPU manifest {manifest.path.name} needs {', '.join(missing)} too")
    kernel = p.kernel_package.removeprefix("linux-image-")
    try:
        check_compatibility(manifest, suite=p.debian.suite, architecture=p.debian.architecture,
                            machine=p.machine, python=p.python_version, glibc=p.glibc_version,
                            kernel_release=kernel if kernel[:1].isdigit() else "")
    except ProfileError as exc:
        raise ProfileError(f"{where}: refused: {exc}") from None
    if bool(p.gpu.signing_key) != bool(p.gpu.signing_cert):
        raise ProfileError(f"{p.path}: [gpu] signing_key = {p.gpu.signing_key!r}, signing_cert = "
                           f"{p.gpu.signing_cert!r}: give both or neither")
    if p.gpu_signing is not None:
        for key, path in zip(("signing_key", "signing_cert"), p.gpu_signing, strict=True):
            if not path.is_file():
                raise ProfileError(f"{p.path}: [gpu] {key} = {getattr(p.gpu, key)!r}: no such "
                                   f"file {path}")
    return manifest


def _users(path: Path, raw: Any) -> tuple[User, ...]:
    if not isinstance(raw, list):
        raise ProfileError(f"{path}: [[users]] = {raw!r}: expected an array of tables")
    users = tuple(from_table(User, t, f"{path}: [[users]][{i}]") for i, t in enumerate(raw))
    for i, user in enumerate(users):
        if not user.name:
            raise ProfileError(f"{path}: [[users]][{i}] name: missing")
    names = [u.name for u in users]
    uids = [u.uid for u in users]
    if len(set(names)) != len(names) or len(set(uids)) != len(uids):
        raise ProfileError(f"{path}: [[users]]: duplicate names or uids in {names} / {uids}")
    return users


def _agent(path: Path, raw: Any, *, baked_tls: bool = False) -> AgentConfig:
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{path}: [agent] = {raw!r}: expected a table of agent.toml sections")
    unknown = sorted(set(raw) - set(AGENT_SECTIONS))
    if unknown:
        raise ProfileError(f"{path}: unknown section [agent.{unknown[0]}] "
                           f"(known: {', '.join(AGENT_SECTIONS)})")
    sections = {name: from_table(cls, raw.get(name, {}), f"{path}: [agent.{name}]")
                for name, cls in AGENT_SECTIONS.items()}
    if baked_tls:
        tls = sections["tls"]
        given = {k: getattr(tls, k) for k in ("cert", "key", "ca", "crl")}
        if any(given.values()):
            raise ProfileError(f"{path}: [pki] dir is set, so the agent's [tls] files are the "
                               f"baked ones under {TLS_IN_ROOT}: leave [agent.tls] cert, key, ca "
                               f"and crl unset (found {', '.join(k for k, v in given.items() if v)})")
        sections["tls"] = replace(tls, cert=Path(f"{TLS_IN_ROOT}/node.crt"),
                                  key=Path(f"{TLS_IN_ROOT}/node.key"),
                                  ca=Path(f"{TLS_IN_ROOT}/ca.crt"), crl=Path(f"{TLS_IN_ROOT}/crl.pem"))
    fixed = {k: v for k in ("marker", "request", "result", "escrow")
             if (v := getattr(sections["seal"], k)) != getattr(SealSection(), k)}
    if fixed:
        name = next(iter(fixed))
        raise ProfileError(f"{path}: [agent.seal] {name} = {str(fixed[name])!r}: the image's initrd and "
                           f"unseal helper use {getattr(SealSection(), name)}; leave it unset")
    if "firmware_log" not in raw.get("attest", {}):  # the kernel's is root's only
        sections["attest"] = replace(sections["attest"], firmware_log=Path(FIRMWARE_LOG_COPY))
    config = AgentConfig(**sections, origin=f"{path}: [agent]")
    from agent.security import check_listen

    try:
        check_listen(config)  # the agent would refuse to start: say so before building
    except ConfigError as exc:
        raise ProfileError(str(exc)) from None
    return config


def _check_tpm(p: Profile, where: str) -> None:
    """[tpm]: the keys it names load, and sealed data has both of them."""
    loaders: tuple[tuple[str, Path | None, Callable[[Path], object], str], ...] = (
        ("pcr_key", p.pcr_key, load_pcr_key,
         "the TPM unseals the data partition under the PCR 11 policy that key signs"),
        ("recovery_key", p.recovery_key, load_recovery_public_key,
         "the node escrows its recovery key to it, or a node whose TPM fails loses its data"))
    for name, path, load, why in loaders:
        if path is not None:
            try:
                load(path)
            except ImageError as exc:
                raise ProfileError(f"{where}: [tpm] {name} = {getattr(p.tpm, name)!r}: {exc}") from None
        elif p.tpm.seal_data:
            raise ProfileError(f"{where}: [tpm] seal_data = true needs [tpm] {name}: {why}")


def _check_compliance(p: Profile, where: str) -> None:
    """[compliance]: a baseline reads, and is only given with the audit that it judges; the
    node's own OpenSCAP scan needs that audit too (it scans again what the audit failed)."""
    if p.diagnostics.console_scap and not p.compliance.audit:
        raise ProfileError(f"{where}: [diagnostics] console_scap = true needs [compliance] audit = true "
                           "(the node evaluates again the rules the build's offline audit failed)")
    path = p.compliance_baseline
    if path is None:
        return
    if not p.compliance.audit:
        raise ProfileError(f"{where}: [compliance] baseline = {p.compliance.baseline!r} needs "
                           "[compliance] audit = true (the baseline judges the build's audit)")
    from provisioning.image.compliance import load_baseline

    try:
        load_baseline(path)
    except ImageError as exc:
        raise ProfileError(f"{where}: [compliance] baseline = {p.compliance.baseline!r}: {exc}") from None


def _check(p: Profile) -> None:  # noqa: PLR0912 - one flat list of checks reads best
    """Cross-field checks and the files the profile names (registry, targets, GPU manifest)."""
    where = str(p.path)
    net = p.network
    if net.mode == "static":
        if not net.address:
            raise ProfileError(f"{where}: [network] address = '': static mode needs an address")
        try:
            ipaddress.ip_interface(net.address)
        except ValueError:
            raise ProfileError(f"{where}: [network] address = {net.address!r}: "
                               "not an address with prefix such as 192.0.2.10/24") from None
        for key, values in (("gateway", (net.gateway,) if net.gateway else ()), ("dns", net.dns)):
            for value in values:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise ProfileError(f"{where}: [network] {key} = {value!r}: "
                                       "not an IP address") from None
    elif net.address or net.gateway:
        raise ProfileError(f"{where}: [network] address = {net.address!r}: "
                           "only meaningful with mode = \"static\"")
    _check_tpm(p, where)
    _check_compliance(p, where)
    if p.ssh.enabled and not any(u.ssh_keys for u in p.users):
        raise ProfileError(f"{where}: [ssh] enabled = true: no [[users]] entry has ssh_keys "
                           "(SSH is key-only)")
    if p.gpu.manifest:
        manifest = p.gpu_manifest
        assert manifest is not None
        if not manifest.is_file():
            raise ProfileError(f"{where}: [gpu] manifest = {p.gpu.manifest!r}: "
                               f"no such firmware manifest {manifest}")
    elif p.gpu.signing_key or p.gpu.signing_cert:
        raise ProfileError(f"{where}: [gpu] signing_key = {p.gpu.signing_key!r}: no manifest, so "
                           "no GPU modules to sign")
    if p.pki_dir is not None and not (p.pki_dir / "ca.crt").is_file():
        raise ProfileError(f"{where}: [pki] dir = {p.pki.dir!r}: {p.pki_dir} holds no site CA "
                           "(ca.crt; make one with `appliance pki init`)")
    passphrase = p.pki_passphrase_file
    if passphrase is not None and not passphrase.is_file():
        raise ProfileError(f"{where}: [pki] passphrase_file = {p.pki.passphrase_file!r}: "
                           f"no such file {passphrase}")
    if p.bundles.targets and not p.bundles.registry:
        raise ProfileError(f"{where}: [bundles] targets = {list(p.bundles.targets)!r}: "
                           "no registry given")
    if p.registry_dir is not None:
        from provisioning.image.bake import registry_targets

        registry = p.registry_dir
        if not (registry / "metadata").is_dir():
            raise ProfileError(f"{where}: [bundles] registry = {p.bundles.registry!r}: "
                               f"{registry} has no metadata/ directory")
        published = registry_targets(registry)
        for target in p.bundles.targets:
            if target not in published:
                raise ProfileError(f"{where}: [bundles] targets = {target!r}: not a target of "
                                   f"the registry {registry} (it has: "
                                   f"{', '.join(sorted(published)) or 'none'})")
