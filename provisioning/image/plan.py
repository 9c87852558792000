"""What the configure stage does to the root filesystem, computed before anything is touched.

:func:`configure_plan` is pure: from a profile (and a few facts read from the rootfs) it gives
the files to write, the paths to remove, the commands to run in the chroot and the units to
enable or mask.  The pyinfra deploy (``deploys/configure.py``) applies a plan; the fast tier
tests the plan itself.  Hardening lives here as data so it can be read in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.config import FIRMWARE_LOG
from agent.config import SECTIONS as AGENT_SECTIONS
from agent.cpu import EXIT_CPU_BELOW_LEVEL
from agent.settings import to_json
from provisioning.image.egress import nft_output_rules
from provisioning.image.gpu_manifest import gpu_stack, headers_package
from provisioning.image.gpu_stage import DEBS_IN_ROOT, DKMS_CONF, KEYS_IN_ROOT, dkms_conf
from provisioning.image.profile import FIRMWARE_LOG_COPY, Profile
from provisioning.image.rootfs import ROOTFS_ENV
from provisioning.image.sealed_mode import UNSEAL_PATH_UNIT, escrow_copy_pre, unseal_files

__all__ = [
    "AGENT_BIN",
    "AGENT_DEVICE_ALLOW",
    "AGENT_EXEC",
    "AGENT_GROUP",
    "AGENT_UID",
    "AGENT_UNIT",
    "AGENT_USER",
    "BOOT_CHECK_UNIT",
    "BOOT_TIMES_PREFIX",
    "BOOT_TIMES_SCRIPT",
    "BOOT_TIMES_UNIT",
    "CPU_CHECK_UNIT",
    "DEVICES_UNIT",
    "GPU_RECORD",
    "IDLE_TIMERS",
    "IMAGE_METADATA",
    "LISTEN_PREFIX",
    "LISTEN_REPORT_UNIT",
    "LYNIS_PREFIX",
    "LYNIS_TIMER",
    "LYNIS_UNIT",
    "OS_UPDATE_PATH",
    "OS_UPDATE_UNIT",
    "PRIVILEGED_RULES",
    "REPORTED_UNITS",
    "SCAP_PREFIX",
    "SCAP_TIMER",
    "SCAP_UNIT",
    "STATE_PREFIX",
    "STRIPPED_SETUID",
    "SYSCTL_REAPPLY_UNIT",
    "USBGUARD_DAEMON_CONF",
    "USB_HUB_RULE",
    "VENV",
    "FileSpec",
    "Plan",
    "agent_toml",
    "agent_unit",
    "boot_check_unit",
    "boot_times_script",
    "boot_times_unit",
    "configure_plan",
    "cpu_check_unit",
    "gpu_devices_unit",
    "gpu_plan",
    "listen_report_script",
    "listen_report_unit",
    "lynis_profile",
    "lynis_script",
    "lynis_units",
    "nftables_ruleset",
    "os_update_units",
    "render_toml",
    "scap_script",
    "scap_units",
    "sysctl_reapply_unit",
    "usbguard_rules",
]

VENV = "/opt/appliance/venv"
AGENT_USER = AGENT_GROUP = "appliance"
AGENT_UID = 800  # fixed: the same uid in every build (and below Debian's dynamic range users)
AGENT_UNIT = "appliance-agent.service"
# The node's own entry point (agent/cli.py): the console script that pip installs into the venv
# from the agent wheel's [project.scripts].
AGENT_BIN = f"{VENV}/bin/appliance-agent"
AGENT_EXEC = (AGENT_BIN, "serve", "--config", "/etc/appliance/agent.toml")
# The TPM: the agent quotes and enrols through the kernel's resource manager, /dev/tpmrm0, which
# udev gives to the agent's group (tpm-udev gives it to "tss", a group the agent's user namespace
# cannot map); the firmware's event log is root's only, so the unit copies it for the agent.
TPM_UDEV_RULES = "/etc/udev/rules.d/70-appliance-tpm.rules"
# By node: the raw TPM and its resource manager share one major ("tpm" in /proc/devices), so a
# class would let the raw device (one user at a time, no isolation between sessions) in as well.
TPM_DEVICE_ALLOW = "/dev/tpmrm0 rw"
WHEELS_IN_ROOT = "/var/tmp/appliance-wheels"  # noqa: S108 - inside the image's root; removed again by the plan's last commands


@dataclass(frozen=True)
class FileSpec:
    path: str
    content: str
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"


@dataclass(frozen=True)
class Plan:
    files: tuple[FileSpec, ...]
    remove: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...]
    enable: tuple[str, ...]
    mask: tuple[str, ...]
    # run once the files are written (commands run before them): what reads the plan's files
    after_files: tuple[tuple[str, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(tuple(FileSpec(**f) for f in data["files"]), tuple(data["remove"]),
                   tuple(tuple(c) for c in data["commands"]), tuple(data["enable"]),
                   tuple(data["mask"]), tuple(tuple(c) for c in data.get("after_files", ())))

    def file(self, path: str) -> FileSpec:
        """The file the plan writes at ``path`` (KeyError if none)."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


# ------------------------------------------------------------------ TOML rendering


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def render_toml(tables: dict[str, dict[str, Any]], header: str = "") -> str:
    """A TOML document of flat tables (what agent.toml needs), keys in a stable order."""
    out = [header] if header else []
    for name, table in tables.items():
        out.append(f"[{name}]")
        # TOML has no null: an unset optional setting (e.g. [tls] cert) is left out.
        out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items()
                   if value is not None)
        out.append("")
    return "\n".join(out)


def agent_toml(profile: Profile) -> str:
    """/etc/appliance/agent.toml: every agent setting, explicit, from the profile's [agent.*]."""
    tables = {name: to_json(getattr(profile.agent, name)) for name in _agent_sections()}
    return render_toml(tables, f"# Written by `appliance build` from {profile.path.name}.\n")


def _agent_sections() -> tuple[str, ...]:
    return tuple(AGENT_SECTIONS)


# ------------------------------------------------------------------ hardening content


def nftables_ruleset(profile: Profile) -> str:
    """Default-deny both ways.

    Inbound: loopback, replies, needed ICMP and the profile's TCP ports.  Outbound: replies,
    loopback, needed ICMP and the profile's allowlist (:mod:`provisioning.image.egress`);
    anything else is dropped and logged (rate-limited), so a compromised process cannot send
    data anywhere the profile does not name.
    """
    ports = ", ".join(str(p) for p in profile.inbound_tcp)
    output = "".join(f"\t\t{rule}\n" for rule in nft_output_rules(profile))
    dhcp = ("\t\tudp sport 67 udp dport 68 accept\n\t\tudp sport 547 udp dport 546 accept\n"
            if profile.network.mode == "dhcp" else "")
    return (
        "#!/usr/sbin/nft -f\n"
        "# Written by `appliance build`: inbound and outbound are denied unless listed here.\n"
        "flush ruleset\n\n"
        "table inet filter {\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy drop;\n"
        "\t\tct state invalid drop\n"
        "\t\tct state established,related accept\n"
        "\t\tiif \"lo\" accept\n"
        "\t\tip protocol icmp icmp type { echo-request, destination-unreachable, time-exceeded }"
        " limit rate 10/second accept\n"
        "\t\tip6 nexthdr icmpv6 icmpv6 type { echo-request, destination-unreachable, packet-too-big,"
        " time-exceeded, parameter-problem, nd-router-advert, nd-neighbor-solicit,"
        " nd-neighbor-advert } accept\n"
        f"{dhcp}"
        f"\t\ttcp dport {{ {ports} }} accept\n"
        "\t}\n"
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n"
        "\tchain output {\n\t\ttype filter hook output priority filter; policy drop;\n"
        f"{output}"
        "\t}\n"
        "}\n"
    )


# Kernel parameters.  Each is checked by the ComplianceAsCode rule named after it
# (``sysctl_`` + the key with ``.`` as ``_``, e.g. kernel.yama.ptrace_scope ->
# sysctl_kernel_yama_ptrace_scope).  The rules check this file and the running kernel; the
# offline audit can only see the file.
SYSCTLS: tuple[tuple[str, str], ...] = (
    ("kernel.kptr_restrict", "2"),
    ("kernel.dmesg_restrict", "1"),
    ("kernel.perf_event_paranoid", "3"),
    ("kernel.unprivileged_bpf_disabled", "1"),
    ("net.core.bpf_jit_harden", "2"),
    ("kernel.kexec_load_disabled", "1"),
    ("kernel.sysrq", "0"),
    ("kernel.yama.ptrace_scope", "2"),
    ("kernel.randomize_va_space", "2"),
    ("dev.tty.ldisc_autoload", "0"),
    ("fs.protected_hardlinks", "1"),
    ("fs.protected_symlinks", "1"),
    ("fs.protected_fifos", "2"),
    ("fs.protected_regular", "2"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv4.conf.all.secure_redirects", "0"),
    ("net.ipv4.conf.default.secure_redirects", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_source_route", "0"),
    ("net.ipv4.conf.default.accept_source_route", "0"),
    ("net.ipv4.conf.all.log_martians", "1"),
    ("net.ipv4.conf.default.log_martians", "1"),
    ("net.ipv4.icmp_echo_ignore_broadcasts", "1"),
    ("net.ipv4.icmp_ignore_bogus_error_responses", "1"),
    ("net.ipv4.tcp_syncookies", "1"),
    ("net.ipv4.tcp_rfc1337", "1"),
    ("net.ipv4.ip_forward", "0"),
    ("net.ipv6.conf.all.accept_redirects", "0"),
    ("net.ipv6.conf.default.accept_redirects", "0"),
    ("net.ipv6.conf.all.accept_source_route", "0"),
    ("net.ipv6.conf.default.accept_source_route", "0"),
    ("net.ipv6.conf.all.forwarding", "0"),
    # ANSSI-BP-028 / CIS: the appliance is an end host, never a router; it takes its address
    # from networkd (DHCPv4 or static), which handles IPv6 router advertisements in user space
    # itself, so the kernel's own RA processing, autoconf and forwarding stay off.
    ("net.ipv6.conf.default.forwarding", "0"),
    ("net.ipv4.conf.all.forwarding", "0"),
    ("net.ipv4.conf.default.forwarding", "0"),
    ("net.ipv6.conf.all.accept_ra", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
    ("net.ipv6.conf.all.accept_ra_defrtr", "0"),
    ("net.ipv6.conf.default.accept_ra_defrtr", "0"),
    ("net.ipv6.conf.all.accept_ra_pinfo", "0"),
    ("net.ipv6.conf.default.accept_ra_pinfo", "0"),
    ("net.ipv6.conf.all.accept_ra_rtr_pref", "0"),
    ("net.ipv6.conf.default.accept_ra_rtr_pref", "0"),
    ("net.ipv6.conf.all.autoconf", "0"),
    ("net.ipv6.conf.default.autoconf", "0"),
    ("net.ipv6.conf.all.router_solicitations", "0"),
    ("net.ipv6.conf.default.router_solicitations", "0"),
    ("net.ipv6.conf.all.max_addresses", "1"),
    ("net.ipv6.conf.default.max_addresses", "1"),
    ("net.ipv4.conf.all.accept_local", "0"),
    ("net.ipv4.conf.all.arp_filter", "1"),
    ("net.ipv4.conf.all.arp_ignore", "2"),
    ("net.ipv4.conf.all.drop_gratuitous_arp", "1"),
    ("net.ipv4.conf.all.route_localnet", "0"),
    ("net.ipv4.conf.all.shared_media", "0"),
    ("net.ipv4.conf.default.shared_media", "0"),
    ("net.ipv4.ip_local_port_range", "32768 65535"),
    ("kernel.panic_on_oops", "1"),  # the same as oops=panic on the kernel command line
    ("kernel.perf_cpu_time_max_percent", "1"),
    ("kernel.perf_event_max_sample_rate", "1"),
    ("vm.mmap_min_addr", "65536"),
    # sysctl_kernel_pid_max: ANSSI's 65536 instead of systemd's 4194304 (its vendor file is
    # removed, see configure_plan); an appliance runs a few dozen processes.
    ("kernel.pid_max", "65536"),
)
NO_CORE_SYSCTLS = (("fs.suid_dumpable", "0"), ("kernel.core_pattern", "|/bin/false"))

# Kernel modules the appliance never loads: `install M /bin/false` stops modprobe (also
# when a device or socket asks for it), `blacklist M` stops alias autoloading.  Rule ids:
# kernel_module_<name>_disabled (overlay: kernel_module_overlayfs_disabled).  Kept loadable:
# virtio*, nvidia*, dm-verity and the filesystems the image mounts (squashfs, ext4, vfat, tmpfs).
DISABLED_MODULES = ("dccp", "sctp", "rds", "tipc", "atm", "can", "cramfs", "freevxfs", "jffs2",
                    "hfs", "hfsplus", "udf", "overlay", "usb-storage",
                    "firewire-core", "bluetooth")

# Shell and account defaults (ComplianceAsCode rule ids):
# accounts_umask_etc_login_defs, accounts_umask_etc_profile, accounts_umask_etc_bashrc: 077
# (ANSSI-BP-028's value, stricter than CIS's 027); accounts_maximum_age_login_defs,
# accounts_minimum_age_login_defs, account_disable_post_pw_expiration.  The appliance has no
# password logins; these only govern accounts an operator might add on a bench variant.
UMASK = "077"
SU_GROUP = "sugroup"  # pam_wheel's group for su: exists, never has a member
LOGIN_DEFS = (("UMASK", UMASK), ("PASS_MAX_DAYS", "365"), ("PASS_MIN_DAYS", "1"))
# pam_faillock: accounts_passwords_pam_faillock_{deny,deny_root,interval,unlock_time,
# root_unlock_time}.  Three failures in 15 minutes lock an account (root too) for 15 minutes
# (ANSSI's deny 3 is within CIS's 4).  The content reads the values from here, not from PAM.
FAILLOCK_CONF = """# Written by `appliance build` (provisioning/image/plan.py).
deny = 3
fail_interval = 900
unlock_time = 900
even_deny_root
root_unlock_time = 900
"""
# pam_pwquality (accounts_password_pam_{minlen,minclass,dcredit,ucredit,lcredit,ocredit,difok,
# maxrepeat,maxsequence,dictcheck,enforcing,enforce_root,retry}): ANSSI's 15 characters of the
# four classes, CIS's limits on repeats and sequences, enforced for root as well.
PWQUALITY_CONF = """# Written by `appliance build` (provisioning/image/plan.py).
minlen = 15
minclass = 4
dcredit = -1
ucredit = -1
lcredit = -1
ocredit = -1
difok = 8
maxrepeat = 3
maxsequence = 3
dictcheck = 1
enforcing = 1
enforce_for_root
retry = 3
"""
# accounts_password_pam_pwhistory_{enabled,remember,enforce_root,use_authtok}: none of the last
# 24 passwords again (CIS; ANSSI asks 2), checked on the password pam_pwquality accepted.
PWHISTORY_LINE = "password\trequisite\tpam_pwhistory.so remember=24 enforce_for_root use_authtok"

# Audit rules in the form ComplianceAsCode checks (rule ids in the comments): syscall rules for
# both ABIs (a 32-bit process bypasses b64-only rules) and the auid filters that leave daemons
# out.  -c: a rule the running kernel refuses (a path that does not exist on a variant) is
# skipped instead of stopping the load of every rule after it.
_AUDIT_IDENTITY = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow",
                   "/etc/security/opasswd",  # audit_rules_usergroup_modification_opasswd
                   # audit_rules_usergroup_modification_{nsswitch_conf,pam_conf,pamd}
                   "/etc/nsswitch.conf", "/etc/pam.conf", "/etc/pam.d/")
_AUDIT_WATCHES = (
    *((f, "identity") for f in _AUDIT_IDENTITY),
    ("/etc/appliance/", "appliance-config"),
    ("/etc/sudoers", "scope"), ("/etc/sudoers.d/", "scope"),
    ("/etc/ssh/sshd_config", "sshd"), ("/etc/nftables.conf", "firewall"),
    ("/etc/sysctl.conf", "sysctl"), ("/etc/sysctl.d/", "sysctl"),
    ("/var/log/audit/", "audit-log"),
    ("/var/log/lastlog", "logins"), ("/var/log/faillog", "logins"),
    # audit_rules_login_events_faillock: CIS names pam_faillock's default directory, ANSSI
    # the persistent one; the content matches the names without a trailing slash
    ("/var/run/faillock", "logins"), ("/var/log/faillock", "logins"),
    ("/var/run/utmp", "session"), ("/var/log/wtmp", "session"),  # audit_rules_session_events_{utmp,wtmp,btmp}
    ("/var/log/btmp", "session"),
    ("/etc/localtime", "time-change"),  # audit_rules_time_watch_localtime
    # audit_rules_networkconfig_modification_{etc_issue,etc_issue_net,etc_hosts,hostname_file}
    ("/etc/issue", "system-locale"), ("/etc/issue.net", "system-locale"),
    # audit_rules_networkconfig_modification: also ifupdown's files, absent under networkd
    # (-c skips them) but watched should a variant add them
    ("/etc/networks", "system-locale"), ("/etc/network/", "system-locale"),
    ("/etc/hosts", "system-locale"), ("/etc/hostname", "system-locale"),
    ("/etc/systemd/network/", "system-locale"),
    # audit_rules_mac_modification_{etc_apparmor,etc_apparmor_d}: the names without a trailing
    # slash, as the content matches them (ANSSI's /etc/network/ above wants its slash)
    ("/etc/apparmor", "MAC-policy"), ("/etc/apparmor.d", "MAC-policy"),
    # audit_rules_networkconfig_modification_networkmanager (CIS): absent under networkd
    ("/etc/NetworkManager", "system-locale"),
    ("/var/log/sudo.log", "actions"),  # audit_sudo_log_events
)
_AUDIT_SYSCALLS = (  # (syscalls for b64, for b32, extra filters, key)
    # audit_rules_time_*: adjtimex, settimeofday, clock_settime (the realtime clock only)
    ("adjtimex,settimeofday", "adjtimex,settimeofday,stime", "", "time-change"),
    ("clock_settime", "clock_settime", "-F a0=0x0", "time-change"),
    # audit_rules_networkconfig_modification, _setdomainname, _sethostname
    ("sethostname,setdomainname", "sethostname,setdomainname", "", "system-locale"),
    # CIS's form of the same (users' calls only): audit_rules_networkconfig_modification_sethostname
    ("sethostname,setdomainname", "sethostname,setdomainname", "-F auid>=1000 -F auid!=unset",
     "system-locale"),
    # audit_rules_kernel_module_loading_{init,finit,delete,create,query}
    ("init_module,finit_module,delete_module", "init_module,finit_module,delete_module", "", "modules"),
    ("create_module,query_module", "create_module,query_module", "", "modules"),
    # audit_rules_media_export, audit_rules_dac_modification_umount2
    ("mount", "mount", "-F auid>=1000 -F auid!=unset", "export"),
    ("umount2", "umount,umount2", "-F auid>=1000 -F auid!=unset", "delete"),
    # audit_rules_dac_modification_*
    ("chmod,fchmod,fchmodat,fchmodat2", "chmod,fchmod,fchmodat,fchmodat2",
     "-F auid>=1000 -F auid!=unset", "perm_mod"),
    ("chown,fchown,fchownat,lchown", "chown,fchown,fchownat,lchown,chown32,fchown32,lchown32",
     "-F auid>=1000 -F auid!=unset", "perm_mod"),
    ("setxattr,lsetxattr,fsetxattr,removexattr,lremovexattr,fremovexattr",
     "setxattr,lsetxattr,fsetxattr,removexattr,lremovexattr,fremovexattr",
     "-F auid>=1000 -F auid!=unset", "perm_mod"),
    # audit_rules_file_deletion_events_*
    ("rename,renameat,renameat2,unlink,unlinkat,rmdir", "rename,renameat,renameat2,unlink,unlinkat,rmdir",
     "-F auid>=1000 -F auid!=unset", "delete"),
    # audit_rules_unsuccessful_file_modification_*
    ("creat,open,openat,open_by_handle_at,truncate,ftruncate",
     "creat,open,openat,open_by_handle_at,truncate,ftruncate",
     "-F exit=-EACCES -F auid>=1000 -F auid!=unset", "access"),
    ("creat,open,openat,open_by_handle_at,truncate,ftruncate",
     "creat,open,openat,open_by_handle_at,truncate,ftruncate",
     "-F exit=-EPERM -F auid>=1000 -F auid!=unset", "access"),
    # audit_rules_suid_auid_privilege_function
    ("execve", "execve", "-C uid!=euid -F euid=0", "setuid"),
    ("execve", "execve", "-C gid!=egid -F egid=0", "setgid"),
    ("execve", "execve", "-F euid=0 -F auid>=1000 -F auid!=unset", "root-commands"),
    # CIS's form: a user's program running with another effective uid (sudo, su)
    ("execve", "execve", "-C euid!=uid -F auid!=unset", "user_emulation"),
)
# audit_rules_privileged_commands_{kmod,insmod,rmmod,modprobe,usermod,sudo} and
# audit_rules_execution_{chacl,setfacl,chcon}
_AUDIT_PRIVILEGED = ("/usr/bin/kmod", "/usr/sbin/insmod", "/usr/sbin/rmmod", "/usr/sbin/modprobe",
                     "/usr/sbin/usermod", "/usr/bin/sudo", "/usr/bin/chacl", "/usr/bin/setfacl",
                     "/usr/bin/chcon")


# audit_rules_privileged_commands_{insmod,rmmod,modprobe}, ANSSI's form: watches for execution
# of the names.  They are symlinks to kmod, so the path=/usr/bin/kmod rule above is the one that
# fires; these are what the content looks for.
_AUDIT_EXEC_WATCHES = ("/sbin/insmod", "/sbin/rmmod", "/sbin/modprobe")
# audit_rules_privileged_commands: every setuid or setgid program of the root has a rule.  The
# set depends on the packages (a GPU variant adds nvidia-modprobe), so the configure stage
# writes this file from the root itself, after stripping the bits nothing on an appliance uses.
PRIVILEGED_RULES = "/etc/audit/rules.d/51-privileged.rules"
# setuid/setgid programs for users changing their own account or mounting, or becoming root with
# a password: the appliance has no such user (root and every account are locked, no password
# logins), so the bits only widen what a compromised service could try.  Kept: unix_chkpwd
# (pam_unix) and dbus-daemon-launch-helper (D-Bus activation of system services).
STRIPPED_SETUID = ("chage", "chfn", "chsh", "expiry", "gpasswd", "mount", "newgrp", "passwd",
                   "su", "umount")


def _audit_rules() -> str:
    lines = ["## Written by `appliance build`.  Loaded by augenrules; immutable until reboot when -e 2.",
             "-D", "-b 8192", "-f 1", "--backlog_wait_time 60000", "-c"]
    lines += [f"-w {path} -p wa -k {key}" for path, key in _AUDIT_WATCHES]
    lines += [f"-w {path} -p x -k modules" for path in _AUDIT_EXEC_WATCHES]
    for b64, b32, extra, key in _AUDIT_SYSCALLS:
        for arch, calls in (("b64", b64), ("b32", b32)):
            lines.append(" ".join(filter(None, (f"-a always,exit -F arch={arch} -S {calls}", extra,
                                                f"-k {key}"))))
    lines += [f"-a always,exit -F path={p} -F perm=x -F auid>=1000 -F auid!=unset -k privileged"
              for p in _AUDIT_PRIVILEGED]
    return "\n".join(lines) + "\n"


AUDIT_RULES = _audit_rules()


# ------------------------------------------------------------------ GPU

GPU_RECORD = "/usr/lib/appliance/gpu.json"
IMAGE_METADATA = "/usr/lib/appliance/image.json"  # read by agent/health/inventory.py
DEVICES_UNIT = "appliance-nvidia-devices.service"
# What the agent's unit may open: the control device, every GPU (major 195, whose group is
# "nvidia" in /proc/devices, "nvidia-frontend" in older drivers) and the unified memory device.
# Not nvidia-uvm-tools, nvidia-caps, nvidia-nvswitch or nvidia-modeset.
AGENT_DEVICE_ALLOW = ("/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia rw",
                      "char-nvidia-frontend rw")


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _agent_device_lines(profile: Profile) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Device-related lines of the agent's unit, ([Unit] lines, [Service] lines).

    Without a GPU: no physical devices at all.  With one: exactly the NVIDIA nodes.
    """
    if profile.gpu_set is None:
        # No ProcSubset=pid: ONNX Runtime reads /proc/cpuinfo at load and aborts without it
        # (seen as a core dump of the agent in a booted image).  Of the physical devices, the
        # TPM's resource manager only, bound into the private /dev when the node has one.
        return (), ("PrivateDevices=yes", "DevicePolicy=closed", "BindPaths=-/dev/tpmrm0",
                    f"DeviceAllow={TPM_DEVICE_ALLOW}")
    # PrivateDevices would hide /dev/nvidia*: the device cgroup (DevicePolicy=closed plus the
    # list) is what limits the agent instead.  CUDA and NVML read /proc/driver/nvidia, which
    # ProcSubset=pid would hide.
    return ((f"After={DEVICES_UNIT} nvidia-persistenced.service",
             f"Wants={DEVICES_UNIT} nvidia-persistenced.service"),
            ("PrivateDevices=no", "DevicePolicy=closed",
             *(f"DeviceAllow={d}" for d in (*AGENT_DEVICE_ALLOW, TPM_DEVICE_ALLOW)),
             "ProcSubset=all"))


def gpu_devices_unit() -> str:
    """The oneshot unit that loads the NVIDIA modules and creates /dev/nvidia* before the agent."""
    return "\n".join((
        "[Unit]",
        "Description=Load the NVIDIA modules and create /dev/nvidia* for the agent",
        "ConditionPathExists=/usr/bin/nvidia-modprobe",
        "Before=nvidia-persistenced.service appliance-agent.service",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        # One node per GPU the driver found, the control node, and the UVM node CUDA needs.
        "ExecStart=/bin/sh -c 'i=0; for g in /proc/driver/nvidia/gpus/*; do "
        "[ -e \"$g\" ] || continue; /usr/bin/nvidia-modprobe -c \"$i\"; i=$((i+1)); done; "
        "exec /usr/bin/nvidia-modprobe -u -c 0'",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ))


def gpu_plan(profile: Profile, kernel_release: str,
             record: dict[str, Any]) -> tuple[list[FileSpec], list[tuple[str, ...]], list[str]]:
    """The GPU part of the configure plan: (files, commands, units to enable).

    The GPU stage (:func:`~provisioning.image.gpu_stage.stage_gpu`) has put the packages under
    :data:`DEBS_IN_ROOT` (the set and the part of the mirror's closure the root lacks);
    ``kernel_release`` is the image's (``/lib/modules``).  Commands: install the pinned
    packages offline from the staged flat repository (their DKMS postinst builds for every
    kernel with headers in the root, i.e. the image's), build again explicitly for
    ``kernel_release`` so a build failure stops the stage, then remove the staged packages and
    keys.
    """
    m = profile.gpu_set
    assert m is not None
    # apt reads only the staged packages (a flat repository made by stage_gpu), with its lists
    # kept beside them so nothing of it stays in the image.
    opts = ("-o", f"Dir::Etc::SourceList={DEBS_IN_ROOT}/sources.list",
            "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", f"Dir::State::Lists={DEBS_IN_ROOT}/lists",
            "-o", "Acquire::Languages=none", "-o", "Dpkg::Options::=--force-confold")
    wanted = sorted(f"{d.name}={d.version}" for d in m.debs)
    wanted.append(headers_package(profile.kernel_package))
    update = ("apt-get", *opts, "update")
    # the rootfs stage's environment: no initrd from the kernel hooks the driver packages trigger
    no_initrd = tuple(f"{key}={value}" for key, value in ROOTFS_ENV.items())
    apt = ("env", "DEBIAN_FRONTEND=noninteractive", *no_initrd, "apt-get", *opts, "install", "--yes",
           "--no-install-recommends", *wanted)
    dkms = ("dkms", "autoinstall", "-k", kernel_release)
    status = ("dkms", "status", "-k", kernel_release, f"{m.driver.dkms_module}/{m.driver.version}")
    commands: list[tuple[str, ...]] = [
        ("mkdir", "-p", f"{DEBS_IN_ROOT}/lists/partial"), update, apt, dkms, status,
        ("rm", "-rf", DEBS_IN_ROOT, KEYS_IN_ROOT, "/var/lib/dkms/mok.key", "/var/lib/dkms/mok.pub"),
        # Should a trigger still build the kernel's initrd, its bytes differ from run to run;
        # the node boots the seal stage's own initrd (as the rootfs stage, see rootfs.py).
        ("sh", "-c", "rm -f /boot/initrd.img-*"),
        ("apt-get", "clean"),
    ]
    files = [
        FileSpec(DKMS_CONF, dkms_conf(signing=False)),
        FileSpec(f"/etc/systemd/system/{DEVICES_UNIT}", gpu_devices_unit()),
        FileSpec(GPU_RECORD, _json_text(record)),
        FileSpec(IMAGE_METADATA, _json_text({"image": profile.image.name,
                                            "firmware_manifest": m.manifest.id,
                                            "gpu": gpu_stack(m, record, kernel_release)})),
    ]
    return files, commands, ["nvidia-persistenced.service", DEVICES_UNIT]


def tpm_udev_rules() -> str:
    """After tpm-udev's 60-tpm-udev.rules: the resource manager to the agent's group, the raw
    TPM (no resource manager: one user at a time) left to root and tss."""
    return ("# Written by `appliance build`: the agent quotes and enrols through the TPM resource manager.\n"
            f'SUBSYSTEM=="tpmrm", KERNEL=="tpmrm[0-9]*", GROUP="{AGENT_GROUP}", MODE="0660"\n')


def agent_unit(profile: Profile) -> str:
    """The agent's sandboxed systemd unit (no capabilities, strict FS; devices: none, or the GPU's)."""
    state = str(profile.agent.server.state_dir)
    if not state.startswith("/var/lib/"):
        raise ValueError(f"state_dir {state} must be under /var/lib (systemd StateDirectory=)")
    state_name = state.removeprefix("/var/lib/")
    unit_devices, service_devices = _agent_device_lines(profile)
    return "\n".join((
        "[Unit]",
        "Description=Sovereign Appliance agent (inference, health, updates over gRPC)",
        "Documentation=file:///etc/appliance/agent.toml",
        "After=network-online.target nftables.service local-fs.target",
        "Wants=network-online.target",
        f"RequiresMountsFor={state}",
        *unit_devices,
        *_cpu_check_lines(profile),
        "",
        "[Service]",
        "Type=notify",  # the agent sends READY=1 once it serves, then watchdog pings
        "WatchdogSec=30s",
        # READY=1 comes once it serves: seconds on hardware, a minute or more under emulation
        "TimeoutStartSec=5min",
        # '+': as root, outside the sandbox; the log does not change after the firmware's hand-over
        f"ExecStartPre=+/bin/sh -c '[ -r {FIRMWARE_LOG} ] || exit 0; exec install -m 0400 "
        f"-o {AGENT_USER} -g {AGENT_GROUP} {FIRMWARE_LOG} {FIRMWARE_LOG_COPY}'",
        *((escrow_copy_pre(AGENT_USER, AGENT_GROUP),) if profile.tpm.seal_data else ()),
        f"ExecStart={_agent_exec(profile)}",
        "Restart=on-failure",
        *((f"RestartPreventExitStatus={EXIT_CPU_BELOW_LEVEL}",) if _checks_cpu(profile) else ()),
        "RestartSec=2s",
        f"User={AGENT_USER}",
        f"Group={AGENT_GROUP}",
        f"StateDirectory={state_name}",
        "StateDirectoryMode=0700",
        # An empty working directory of its own: nothing the agent reads resolves against '/'
        # (ONNX Runtime once resolved a model's relative external-data names there).
        "RuntimeDirectory=appliance-agent",
        "RuntimeDirectoryMode=0700",
        "WorkingDirectory=/run/appliance-agent",
        "ConfigurationDirectory=appliance",
        "UMask=0077",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        *_site_trust_lines(profile),
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        *service_devices,
        "PrivateUsers=yes",
        "PrivateIPC=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        # no ProcSubset=pid: ONNX Runtime reads /proc/cpuinfo at load and aborts without it
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "RemoveIPC=yes",
        "KeyringMode=private",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources @mount @swap @reboot @raw-io @module @obsolete",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ))


def _network(profile: Profile) -> str:
    net = profile.network
    lines = ["[Match]", f"Name={net.interface}", "", "[Network]"]
    if net.mode == "dhcp":
        lines.append("DHCP=yes")
    else:
        lines.append(f"Address={net.address}")
        if net.gateway:
            lines.append(f"Gateway={net.gateway}")
        lines.extend(f"DNS={d}" for d in net.dns)
    lines += ["LLMNR=no", "MulticastDNS=no", "IPv6PrivacyExtensions=yes", ""]
    return "\n".join(lines)


def _fstab(profile: Profile) -> str:
    tmp = "nodev,nosuid,noexec" if profile.hardening.tmp_noexec else "nodev,nosuid"
    # The data partition is /var, mounted from the sealed kernel command line (seal.py) and
    # populated at build time from this root's /var (disk.py): the agent's state directory
    # (/var/lib/appliance) and the persistent journal live there and survive root switches.
    return (
        "# Written by `appliance build`.  The root is mounted read-only by the initrd (verity);\n"
        "# the data partition is /var (kernel command line: systemd.mount-extra).\n"
        f"tmpfs /tmp tmpfs mode=1777,{tmp},size=25% 0 0\n"
        f"tmpfs /var/tmp tmpfs mode=1777,{tmp},size=10% 0 0\n"
        # mount_option_dev_shm_{nodev,nosuid,noexec}: systemd mounts /dev/shm before fstab;
        # this line makes it remount with the options (nothing on the appliance runs from shm).
        "tmpfs /dev/shm tmpfs mode=1777,nodev,nosuid,noexec 0 0\n"
        # [hardening] proc_hidepid (Lynis FILE-6344): systemd-remount-fs remounts /proc, which
        # PID 1 mounted, with these options.  The image's own users (the agent, messagebus,
        # systemd-network, systemd-timesync) then see only their own processes; none of them
        # reads another user's /proc (the agent's unit has ProtectProc=invisible already).
        + ("proc /proc proc nosuid,nodev,noexec,hidepid=invisible 0 0\n"
           if profile.hardening.proc_hidepid else "")
    )


def _ssh_files(profile: Profile) -> list[FileSpec]:
    if not profile.ssh.enabled:
        return []
    conf = "\n".join((
        f"Port {profile.ssh.port}", "PermitRootLogin no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "AuthenticationMethods publickey",
        "PubkeyAuthentication yes", "PermitEmptyPasswords no", "X11Forwarding no",
        "AllowTcpForwarding no", "AllowAgentForwarding no", "MaxAuthTries 3",
        "ClientAliveInterval 300", "ClientAliveCountMax 0", "LoginGraceTime 30",
        f"AllowUsers {' '.join(u.name for u in profile.users if u.ssh_keys)}", ""))
    files = [FileSpec("/etc/ssh/sshd_config.d/50-appliance.conf", conf, 0o600)]
    for u in profile.users:
        if u.ssh_keys:
            files.append(FileSpec(f"/home/{u.name}/.ssh/authorized_keys",
                                  "\n".join(u.ssh_keys) + "\n", 0o600, u.name, u.name))
    return files


def _hardening_files(profile: Profile) -> list[FileSpec]:
    h = profile.hardening
    files = [
        FileSpec("/etc/nftables.conf", nftables_ruleset(profile), 0o755),
        FileSpec("/etc/systemd/journald.conf.d/50-appliance.conf",
                 "[Journal]\nStorage=persistent\nCompress=yes\nSystemMaxUse=512M\n"
                 "ForwardToSyslog=no\n"),
        # journald_storage, journald_compress, journald_disable_forward_to_syslog: the
        # content reads journald.conf itself, not its drop-ins; the same values as above.
        FileSpec("/etc/systemd/journald.conf",
                 "# Written by `appliance build`; drop-ins in journald.conf.d/ add to it.\n"
                 "[Journal]\nStorage=persistent\nCompress=yes\nForwardToSyslog=no\n"),
        FileSpec("/etc/fstab", _fstab(profile)),
        FileSpec("/etc/modprobe.d/50-appliance.conf", "".join(
            f"install {m} /bin/false\nblacklist {m}\n" for m in DISABLED_MODULES)),
        # banner_etc_issue_cis, banner_etc_issue_net_cis; Lynis BANN-7126/7130 want a legal notice
        FileSpec("/etc/issue", h.banner + "\n"),
        FileSpec("/etc/issue.net", h.banner + "\n"),
        # apt_disable_weak_dependencies ("0", the form the content matches): should apt ever
        # run on a bench variant, it installs what a package needs and nothing it recommends
        FileSpec("/etc/apt/apt.conf.d/60-appliance-no-recommends",
                 'APT::Install-Recommends "0";\nAPT::Install-Suggests "0";\n'),
        # no_direct_root_logins: no terminal where root may log in directly
        FileSpec("/etc/securetty", "\n", 0o600),
        # accounts_tmout: an idle shell ends after 10 minutes, and cannot lift the limit.
        FileSpec("/etc/profile.d/50-appliance-umask.sh", f"umask {UMASK}\ndeclare -xr TMOUT=600\n"),
        # file_at_allow_exists, file_cron_allow_exists: neither at nor cron is installed; the
        # allow files (root only) keep a later install closed to other users.
        FileSpec("/etc/at.allow", "root\n", 0o640),
        FileSpec("/etc/cron.allow", "root\n", 0o640),
        FileSpec("/etc/security/faillock.conf", FAILLOCK_CONF),
        FileSpec("/etc/security/pwquality.conf", PWQUALITY_CONF),
    ]
    sysctls = list(SYSCTLS) if h.sysctl else []
    if not h.core_dumps:
        sysctls += NO_CORE_SYSCTLS
        files += [
            FileSpec("/etc/security/limits.d/50-no-core.conf", "* hard core 0\n* soft core 0\n"),
            FileSpec("/etc/systemd/coredump.conf.d/50-appliance.conf",
                     "[Coredump]\nStorage=none\nProcessSizeMax=0\n"),
            FileSpec("/etc/systemd/system.conf.d/50-no-core.conf", "[Manager]\nDefaultLimitCORE=0\n"),
        ]
    if sysctls:
        files.append(FileSpec("/etc/sysctl.d/90-appliance.conf",
                              "".join(f"{k} = {v}\n" for k, v in sysctls)))
    if h.auditd:
        rules = AUDIT_RULES + ("-e 2\n" if h.audit_immutable else "")
        files.append(FileSpec("/etc/audit/rules.d/50-appliance.rules", rules, 0o600))
    cmdline = ["quiet", "lockdown=integrity", "slab_nomerge", "init_on_alloc=1",
               "init_on_free=1", "page_alloc.shuffle=1", "pti=on", "vsyscall=none",
               "debugfs=off", "oops=panic"]
    if h.apparmor:
        cmdline += ["apparmor=1", "security=apparmor"]
    if h.auditd:
        cmdline += ["audit=1", "audit_backlog_limit=8192"]
    cmdline += profile.boot.cmdline
    # The seal stage puts this (plus the verity root hash) on the UKI's command line.
    files.append(FileSpec("/etc/kernel/cmdline", " ".join(cmdline) + "\n"))
    return files


# USBGuard ([hardening] usbguard): USB is the way into an air-gapped node, so a device plugged
# in while the node runs is authorised only when a rule allows it; without a matching rule it is
# blocked (ImplicitPolicyTarget).  Controllers and hubs are allowed (without them no port works),
# and the profile's usb_allow rules after them.  Devices present when the daemon starts keep
# the state the kernel gave them (PresentDevicePolicy=keep): the initrd can boot from a USB
# disk (seal.py's drivers), and applying the rules to it would take the root away.  The daemon
# exits when the USB bus is missing (a machine or VM with no controller), so usbcore (a module
# in Debian's kernel) is loaded early by systemd-modules-load, before the daemon starts.  The
# package's postinst writes a policy of the devices it sees (in the build's chroot: the build
# host's) and gives the plugdev group control over the IPC; both are replaced here, and only
# root may talk to the daemon.  Its audit records go to the kernel's audit log.  Lynis USB-3000
# scores these settings.
USBGUARD_DIR = "/etc/usbguard"
USBGUARD_DAEMON_CONF = "\n".join((
    "# Written by `appliance build` (provisioning/image/plan.py).",
    f"RuleFile={USBGUARD_DIR}/rules.conf",
    "ImplicitPolicyTarget=block",
    "PresentDevicePolicy=keep",
    "PresentControllerPolicy=apply-policy",
    "InsertedDevicePolicy=apply-policy",
    "AuthorizedDefault=none",
    "RestoreControllerDeviceState=false",
    "DeviceManagerBackend=uevent",
    "IPCAllowedUsers=root",
    "IPCAllowedGroups=root",
    "DeviceRulesWithPort=false",
    "AuditBackend=LinuxAudit",
    "HidePII=false",
    "",
))
USB_MODULES_LOAD = "/etc/modules-load.d/50-appliance-usbguard.conf"
USB_HUB_RULE = "allow with-interface equals { 09:00:* }"  # hubs, the controllers' root hubs too


def usbguard_rules(profile: Profile) -> str:
    """The daemon's rule file: hubs, then the profile's ``usb_allow``; anything else blocked."""
    return "".join(f"{line}\n" for line in (
        "# Written by `appliance build` (provisioning/image/plan.py): a USB device that no rule",
        "# allows is blocked. More rules: [hardening] usb_allow in the image profile.",
        USB_HUB_RULE, *profile.hardening.usb_allow))


# sysctl_reapply_after_network (CIS Debian 13 3.3.1.16/17): the kernel gives an interface the
# `default` values of its per-interface sysctls when it appears, and a network manager may set
# some of them again when it configures the link; the hardening values are applied once more
# after systemd-networkd has started.  The content checks this unit name, enabled.
SYSCTL_REAPPLY_UNIT = "sysctl-reapply-network.service"


def sysctl_reapply_unit() -> str:
    """systemd-sysctl again, after the network, sandboxed (exposure 2.4): it needs /proc/sys
    writable and the capabilities that its keys ask for, and nothing else."""
    return "\n".join((
        "[Unit]",
        "Description=Apply the kernel hardening sysctls again once the network is up",
        "DefaultDependencies=no",
        "After=systemd-sysctl.service systemd-networkd.service network.target",
        "Conflicts=shutdown.target",
        "Before=shutdown.target",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStart=/usr/lib/systemd/systemd-sysctl",
        # net.* CAP_NET_ADMIN, kernel.* CAP_SYS_ADMIN, vm.mmap_min_addr CAP_SYS_RAWIO,
        # kernel.yama.ptrace_scope CAP_SYS_PTRACE
        "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_NET_ADMIN CAP_SYS_RAWIO CAP_SYS_PTRACE CAP_SYS_RESOURCE",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "DevicePolicy=closed",
        "ProtectHome=yes",
        "ProtectSystem=strict",  # /proc/sys stays writable: no ProtectKernelTunables
        "ProtectClock=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictAddressFamilies=AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "SystemCallErrorNumber=EPERM",
        "IPAddressDeny=any",
        "KeyringMode=private",
        "NotifyAccess=none",
        "RemoveIPC=yes",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ))


def _time_files(profile: Profile) -> list[FileSpec]:
    servers = " ".join(profile.time.ntp)
    return [FileSpec("/etc/systemd/timesyncd.conf.d/50-appliance.conf",
                     f"[Time]\nNTP={servers}\nFallbackNTP=\n")]


def _user_commands(profile: Profile) -> list[tuple[str, ...]]:
    cmds: list[tuple[str, ...]] = [
        ("groupadd", "--system", "--gid", str(AGENT_UID), AGENT_GROUP),
        ("useradd", "--system", "--uid", str(AGENT_UID), "--gid", AGENT_GROUP, "--no-create-home",
         "--home-dir", str(profile.agent.server.state_dir), "--shell", "/usr/sbin/nologin",
         AGENT_USER),
    ]
    for u in profile.users:
        cmds.append(("groupadd", "--gid", str(u.uid), u.name))
        argv = ["useradd", "--uid", str(u.uid), "--gid", u.name, "--create-home",
                "--shell", "/bin/bash"]
        if u.groups:
            argv += ["--groups", ",".join(u.groups)]
        cmds += [(*argv, u.name), ("usermod", "--lock", u.name)]
    if profile.hardening.lock_root:
        cmds += [("usermod", "--lock", "root"), ("usermod", "--shell", "/usr/sbin/nologin", "root")]
    return cmds


def _account_commands() -> list[tuple[str, ...]]:
    """Edits of Debian's own files (login.defs, profile, bash.bashrc, useradd defaults) in place,
    so their other settings stay Debian's; rule ids at LOGIN_DEFS and UMASK."""
    cmds: list[tuple[str, ...]] = []
    for key, value in LOGIN_DEFS:  # trixie's login.defs has no UMASK line: drop, then append
        cmds += [("sed", "-i", "-E", f"/^[[:space:]]*{key}[[:space:]]/d", "/etc/login.defs"),
                 ("sed", "-i", f"$a {key}\t{value}", "/etc/login.defs")]
    cmds += [
        ("sed", "-i", "-E", "s/^#?[[:space:]]*INACTIVE=.*/INACTIVE=45/", "/etc/default/useradd"),
        # accounts_password_set_max_life_root is waived (images/compliance/tailoring.xml): root
        # has no password, and an age counted from the build date would expire root on one
        # fixed date on every node of a release
        # file_permissions_systemmap: the kernel's symbol map is for root only
        ("find", "/boot", "-maxdepth", "1", "-name", "System.map-*", "-exec", "chmod", "0600",
         "{}", "+"),
    ]
    for path in ("/etc/profile", "/etc/bash.bashrc"):
        cmds.append(("sed", "-i", f"$a umask {UMASK}", path))
    cmds += [
        # no_empty_passwords_unix: pam_unix accepts no empty password
        ("sed", "-i", "-E", r"s/[[:space:]]nullok([[:space:]]|$)/\1/g", "/etc/pam.d/common-auth",
         "/etc/pam.d/common-password"),
        # accounts_password_pam_unix_rounds_password_auth: yescrypt's cost at its highest
        ("sed", "-i", "-E", r"/^password[[:space:]].*pam_unix\.so/{/rounds=/!s/$/ rounds=11/}",
         "/etc/pam.d/common-password"),
        # use_pam_wheel_group_for_su, ensure_pam_wheel_group_empty: su only for members of an
        # empty group (root is locked besides; su has lost its setuid bit, see STRIPPED_SETUID)
        ("groupadd", "--system", SU_GROUP),
        ("sed", "-i", "-E", f"/^auth[[:space:]]+sufficient[[:space:]]+pam_rootok\\.so/a auth       "
         f"required   pam_wheel.so use_uid group={SU_GROUP}", "/etc/pam.d/su"),
        # accounts_passwords_pam_faillock_enabled (values in FAILLOCK_CONF): preauth refuses a
        # locked account; pam_unix's success=1 jumps over authfail (which counts a failure and
        # ends) to authsucc (which clears the count)
        ("sed", "-i", "-E", r"/^auth[[:space:]].*pam_unix\.so/{i auth\trequired\tpam_faillock.so preauth"
         "\n" r"a auth\t[default=die]\tpam_faillock.so authfail\nauth\tsufficient\tpam_faillock.so authsucc"
         "\n}", "/etc/pam.d/common-auth"),
        ("sed", "-i", "$a account\trequired\tpam_faillock.so", "/etc/pam.d/common-account"),
        ("sed", "-i", "-E", f"/^password[[:space:]].*pam_unix\\.so/i {PWHISTORY_LINE}",
         "/etc/pam.d/common-password"),
        # no_shelllogin_for_systemaccounts: packages' system users (tss: /bin/false) get nologin
        ("sh", "-c", "awk -F: '$3 < 1000 && $1 != \"root\" && $7 !~ /nologin$/ && $7 != \"/bin/sync\" "
         "{print $1}' /etc/passwd | xargs -r -n1 usermod --shell /usr/sbin/nologin"),
    ]
    return cmds


# auditd.conf, edited in place so that Debian's other settings stay (rule ids):
# file_group_ownership_var_log_audit: the audit logs' group is root, not adm (nobody is in adm
# on the appliance, and root alone reads them); auditd_data_disk_error_action: on a write error
# auditd keeps running and says so in the journal, where Debian's default suspends it silently.
AUDITD_CONF = (("log_group", "root"), ("disk_error_action", "SYSLOG"))


def _auditd_commands() -> list[tuple[str, ...]]:
    return [*(("sed", "-i", "-E", f"s/^[[:space:]]*{key}[[:space:]]*=.*/{key} = {value}/",
               "/etc/audit/auditd.conf") for key, value in AUDITD_CONF),
            # directory_permissions_var_log_audit: with log_group root, the directory is root's
            ("chgrp", "root", "/var/log/audit"), ("chmod", "0700", "/var/log/audit")]


def _logrotate_commands() -> list[tuple[str, ...]]:
    # ensure_logrotate_activated: rotate daily (logrotate.timer runs daily); the content checks
    # for a cron job the image does not have, see images/compliance/tailoring.xml
    return [("sed", "-i", "-E", r"s/^[[:space:]]*(weekly|monthly|yearly)[[:space:]]*$/daily/",
             "/etc/logrotate.conf")]


def _setuid_commands(profile: Profile) -> list[tuple[str, ...]]:
    """Strip :data:`STRIPPED_SETUID`'s bits, then (with auditd) write :data:`PRIVILEGED_RULES`
    from the setuid/setgid programs left.  Last of the commands: after every package."""
    names: list[str] = []
    for name in STRIPPED_SETUID:
        names += ["-o", "-name", name] if names else ["-name", name]
    cmds: list[tuple[str, ...]] = [("find", "/usr/bin", "/usr/sbin", "-maxdepth", "1", "-type", "f", "(",
                                    *names, ")", "-perm", "/6000", "-exec", "chmod", "ug-s", "{}", "+")]
    if profile.hardening.auditd:
        rule = "-a always,exit -F path=& -F perm=x -F auid>=1000 -F auid!=unset -k privileged"
        cmds.append(("sh", "-c", f"find / -xdev -type f -perm /6000 | LC_ALL=C sort | sed 's|.*|{rule}|' "
                     f"> {PRIVILEGED_RULES} && chmod 0600 {PRIVILEGED_RULES}"))
        # file_permissions_etc_audit_rulesd: 0600 or stricter, the package's audit.rules too
        cmds.append(("find", "/etc/audit/rules.d", "-name", "*.rules", "-exec", "chmod", "0600", "{}", "+"))
    return cmds


# The root is read-only once sealed, and at boot audit-rules.service's `augenrules --load` can
# only load /etc/audit/audit.rules when it is already what rules.d/ merges to ("No change");
# otherwise it fails to write it and loads the package's stale file: no rule at all.  So the
# build merges them, with augenrules itself.  Its immutable check runs `auditctl -s`, which
# would ask the build host's kernel: a stand-in that answers nothing keeps the host out of it.
AUGENRULES_AT_BUILD = (
    "set -e; shim=$(mktemp -d); printf '#!/bin/sh\\n' > \"$shim/auditctl\"; chmod 0755 \"$shim/auditctl\"; "
    "PATH=\"$shim:$PATH\" augenrules; PATH=\"$shim:$PATH\" augenrules --check | grep -q 'No change'; "
    "rm -rf \"$shim\" /etc/audit/audit.rules.prev")


CPU_CHECK_UNIT = "appliance-cpu-check.service"


def _cpu_check_argv(profile: Profile) -> str:
    return f"{VENV}/bin/python -m agent.cpu --level {profile.image.cpu_level}"


def _checks_cpu(profile: Profile) -> bool:
    return profile.debian.architecture == "amd64"  # the psABI levels are x86-64's


def site_trust_env(ca: Path) -> dict[str, str]:
    """The environment that makes the TLS a process opens itself (OpenSSL's default verify
    paths) trust ``ca`` alone: the file, and its directory in place of the hashed public one."""
    return {"SSL_CERT_FILE": str(ca), "SSL_CERT_DIR": str(ca.parent)}


def _site_trust_lines(profile: Profile) -> tuple[str, ...]:
    # The TLS the agent opens itself (an https:// update source) trusts the site's CA, not the
    # public bundle of ca-certificates, which nothing on an offline node can reach.  It also
    # spares every start the parse of that bundle (~150 certificates), which aiohttp's import
    # does for a client context the agent never uses: 40-70 ms here, seconds under TCG.
    ca = profile.agent.tls.ca
    return () if ca is None else tuple(f"Environment={k}={v}" for k, v in site_trust_env(ca).items())


def _agent_exec(profile: Profile) -> str:
    # The agent checks the CPU first thing, in its own interpreter, before numpy is imported:
    # a separate check before it cost a second Python start on every boot's critical path
    # (6-8 s under TCG, measured by the boot-times report).
    level = ("--cpu-level", profile.image.cpu_level) if _checks_cpu(profile) else ()
    return " ".join((*AGENT_EXEC, *level))


def _cpu_check_lines(profile: Profile) -> tuple[str, ...]:
    # Below the level the agent exits EXIT_CPU_BELOW_LEVEL: no Restart= loop for it, and the
    # console hears why from the root oneshot (the agent's sandbox has no console).
    if not _checks_cpu(profile):
        return ()
    return (f"OnFailure={CPU_CHECK_UNIT}",)


def cpu_check_unit(profile: Profile) -> str:
    """A root oneshot run when the agent fails (its OnFailure=): when the CPU lacks features
    of ``[image] cpu_level``, it writes them to /dev/console, which the agent's sandbox lacks.
    On a good boot it never runs.
    """
    return "\n".join((
        "[Unit]",
        f"Description=Check the CPU reaches {profile.image.cpu_level} (the agent's libraries need it)",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart={_cpu_check_argv(profile)} --console",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        "NoNewPrivileges=yes",
        "PrivateNetwork=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "",
    ))


BOOT_CHECK_UNIT = "appliance-boot-check.service"
# systemd-boot sets this EFI variable only when it booted an entry with a try counter (+N).
BOOT_COUNT_EFIVAR = "/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def boot_check_unit() -> str:
    """Gate boot-complete.target (and so systemd-bless-boot) on the agent serving.

    Only on a counted boot (a new root slot on trial): once the agent's Type=notify start job
    has finished it is either active (READY=1 sent: it serves) or not; if not, the boot fails
    and reboots, the try counter runs down, and systemd-boot falls back to the blessed slot.
    """
    return "\n".join((
        "[Unit]",
        "Description=Bless this boot only when the agent serves (A/B root fallback otherwise)",
        "Before=boot-complete.target",
        f"After={AGENT_UNIT}",
        f"Wants={AGENT_UNIT}",
        f"ConditionPathExists={BOOT_COUNT_EFIVAR}",
        "FailureAction=reboot",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart=/bin/systemctl is-active --quiet {AGENT_UNIT}",
        "ExecStart=/bin/sh -c \"echo 'appliance-boot: agent serving, this boot is good' > /dev/console\"",
        "ExecStopPost=/bin/sh -c \"[ $$SERVICE_RESULT = success ] || echo 'appliance-boot: agent not "
        "serving, rebooting unblessed' > /dev/console\"",
        "",
        "[Install]",
        "RequiredBy=boot-complete.target",
        "",
    ))


OS_UPDATE_UNIT = "appliance-os-update.service"
OS_UPDATE_PATH = "appliance-os-update.path"


def os_update_units(profile: Profile) -> dict[str, str]:
    """The root-owned OS installer, started when the agent stages an OS release.

    It re-verifies the release through TUF with its own metadata (agent.osupdate), writes the
    inactive root slot and the UKI (on trial), then reboots into it.
    """
    state = str(profile.agent.server.state_dir)
    path = "\n".join((
        "[Unit]",
        "Description=Install an OS release the agent staged",
        "",
        "[Path]",
        f"PathExists={state}/os/pending.json",
        f"Unit={OS_UPDATE_UNIT}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ))
    service = "\n".join((
        "[Unit]",
        "Description=Write a verified OS release to the inactive root slot and boot it on trial",
        f"RequiresMountsFor={state} /efi",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={AGENT_BIN} os-install --state-dir {state} --tries {profile.boot.tries}",
        "ExecStartPost=/bin/systemctl reboot",
        "StateDirectory=appliance-os",
        "StateDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        "",
    ))
    return {OS_UPDATE_PATH: path, OS_UPDATE_UNIT: service}


LISTEN_REPORT_UNIT = "appliance-listen-report.service"
LISTEN_PREFIX = "appliance-listen:"


STATE_PREFIX = "appliance-state:"
LISTEN_REPORT_SCRIPT = "/usr/lib/appliance/listen-report"
# The services the bench checks are up after a boot: those SERVICE_SANDBOXES confines (a
# sandbox too tight shows here first) and logind, which needs dbus.
REPORTED_UNITS = ("dbus.service", "systemd-udevd.service", "systemd-logind.service")


def listen_report_script(profile: Profile) -> str:
    """The report: failed units, the state of REPORTED_UNITS (and auditd's, with the kernel's
    audit status: ``enabled 2`` once the rules are locked), then the listening sockets."""
    units = [*REPORTED_UNITS, *(("auditd.service",) if profile.hardening.auditd else ())]
    lines = ["#!/bin/sh", "# Written by `appliance build` (provisioning/image/plan.py): the bench's "
             "view of the booted node.",
             f"systemctl --failed --plain --no-legend --no-pager | sed 's/^/{STATE_PREFIX} failed /'",
             f"for unit in {' '.join(units)}; do",
             f'    echo "{STATE_PREFIX} active $unit $(systemctl is-active "$unit")"',
             "done"]
    if profile.hardening.auditd:
        lines.append(f'echo "{STATE_PREFIX} audit $(auditctl -s | grep "^enabled")"')
    lines += [f"ss -Hltun | sed 's/^/{LISTEN_PREFIX} /'", f"echo '{LISTEN_PREFIX} end'", ""]
    return "\n".join(lines)


def listen_report_unit() -> str:
    """A oneshot that prints :func:`listen_report_script`'s report to the console once the
    agent serves.

    The agent is Type=notify (READY=1 once it serves), so ``After=`` the agent means after it
    listens.  Lines go to /dev/console (the serial port on a bench) with fixed prefixes.
    """
    return "\n".join((
        "[Unit]",
        "Description=Print unit states and listening sockets to the console (hardware-in-the-loop checks)",
        f"After={AGENT_UNIT} network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={LISTEN_REPORT_SCRIPT}",
        "StandardOutput=tty",
        "TTYPath=/dev/console",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ))


BOOT_TIMES_UNIT = "appliance-boot-times.service"
BOOT_TIMES_PREFIX = "appliance-boot:"
BOOT_TIMES_SCRIPT = "/usr/lib/appliance/boot-times"
BOOT_TIMES_BLAME = 25  # the slowest units listed (devices left out)
BOOT_TIMES_INITRD = 200  # lines of the initrd's own log (systemd's, up to the switch to the real root)
BOOT_TIMES_GAPS = 120  # lines around the journal's silent gaps (two per gap)
BOOT_TIMES_WAIT_S = 1800  # a boot that has not finished by then is reported as such


def boot_times_script(unit: str = AGENT_UNIT) -> str:
    """Where the boot's time went, once it has finished: ``systemd-analyze time`` (firmware,
    loader, kernel, initrd, userspace), ``unit``'s critical chain, the slowest units, the
    initrd's systemd log and the journal's silent gaps, each line prefixed ``appliance-boot:
    time|chain|blame|initrd|gap``, then an end line.  A boot that never
    finishes (a unit still starting after BOOT_TIMES_WAIT_S) gets a ``failed:`` line instead."""
    p = BOOT_TIMES_PREFIX
    return "\n".join((
        "#!/bin/sh",
        "# Written by `appliance build` (provisioning/image/plan.py): where the boot's time went.",
        f"if ! timeout {BOOT_TIMES_WAIT_S} systemctl is-system-running --wait >/dev/null 2>&1 \\",
        '        && [ "$(systemctl is-system-running)" != degraded ]; then',
        f'    echo "{p} failed: the boot had not finished after {BOOT_TIMES_WAIT_S} s '
        '($(systemctl is-system-running))"',
        "    exit 1",
        "fi",
        f"systemd-analyze time --no-pager | sed 's/^/{p} time /'",
        f"systemd-analyze critical-chain --no-pager {unit} | sed 's/^/{p} chain /'",
        # devices left out: a device unit's time is how long its job waited for the kernel to
        # announce it, which says when the device came, not what it cost
        f"systemd-analyze blame --no-pager | grep -v '\\.device$' | head -n {BOOT_TIMES_BLAME} "
        f"| sed 's/^/{p} blame /'",
        # the initrd's units are gone from the running manager (blame and the chain start at the
        # switch to the real root); its journal keeps them, with their times since the kernel began
        "journalctl -b 0 -o short-monotonic --no-pager _PID=1 | sed -n '1,/Switching root/p' "
        f"| head -n {BOOT_TIMES_INITRD} | sed 's/^/{p} initrd /'",
        # where the boot was silent: the two journal lines around each gap of 2 s or more
        "journalctl -b 0 -o short-monotonic --no-pager | awk "
        "'match($0, /^\\[ *[0-9]+\\.[0-9]+\\]/) { t = substr($0, 2, RLENGTH - 2) + 0; "
        "if (seen && t - last >= 2) { print before; print $0 } seen = 1; last = t; before = $0 }' "
        f"| head -n {BOOT_TIMES_GAPS} | sed 's/^/{p} gap /'",
        f"echo '{p} end'",
        "",
    ))


def boot_times_unit(after: str = AGENT_UNIT) -> str:
    """The unit that runs :func:`boot_times_script`.  ``Type=exec``: its job is done once the
    script runs, so it does not hold the boot it waits for (a oneshot would: the boot finishes
    only when no job is left).  So it counts as a running service in the audit, and gets a
    sandbox to match: it only asks systemd, over its private socket, and writes to the console
    (opened in the host's /dev before the private one is mounted, but under the unit's device
    policy)."""
    return "\n".join((
        "[Unit]",
        "Description=Print where the boot's time went to the console (bench images)",
        f"After={after}",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={BOOT_TIMES_SCRIPT}",
        "StandardOutput=tty",
        "TTYPath=/dev/console",
        *_SANDBOX_COMMON, "ProtectSystem=strict", "PrivateDevices=yes", "PrivateNetwork=yes",
        "ProtectClock=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "ProtectHostname=yes",
        "RestrictNamespaces=yes", "RestrictRealtime=yes", "RestrictSUIDSGID=yes",
        "RestrictAddressFamilies=AF_UNIX", "IPAddressDeny=any", "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes", "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged @resources",
        "CapabilityBoundingSet=", "ProtectProc=invisible",
        # PrivateDevices' device policy applies before the console is opened as its output
        "DeviceAllow=/dev/console w",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ))


LYNIS_UNIT = "appliance-lynis.service"
LYNIS_TIMER = "appliance-lynis.timer"
LYNIS_PREFIX = "appliance-lynis:"
LYNIS_SCRIPT = "/usr/lib/appliance/lynis-report"
LYNIS_DIR = "/var/lib/appliance-lynis"
LYNIS_PROFILE = "/usr/share/appliance/lynis.prf"
# The lynis package's own timer: a daily full audit, enabled when the package is installed.
DEBIAN_LYNIS_TIMER = "lynis.timer"


def _per_image(directory: str, name: str, ext: str) -> tuple[str, ...]:
    """The node scripts' common start: ``$dir`` (root's only) and ``$NAME``, the result file of
    this image, named by the root hash of the kernel command line."""
    return ("set -u",
            f"dir={directory}",
            "root=$(sed -n 's/.*roothash=\\([0-9a-f]*\\).*/\\1/p' /proc/cmdline)",
            f'{name}="$dir/{name}-${{root:-unsealed}}.{ext}"',
            'mkdir -p "$dir" && chmod 0700 "$dir"')


def lynis_profile() -> str:
    """What the node's Lynis run sets on top of Lynis's own default.prf (``--profile``).

    BOOT-5264 is skipped: it runs ``systemd-analyze security`` on every unit, assigns no
    hardening points (its only output is a suggestion to harden services), and took 11 of
    Lynis's 21 minutes under TCG.  The build's audit already reports the exposure of every
    enabled service of the image (audit.py), so the node's hardening index is the same without it.
    """
    return "\n".join((
        "# Written by `appliance build` (provisioning/image/plan.py): the node's Lynis run.",
        "# systemd-analyze security of every unit: no hardening points; the build's audit reports it",
        "skip-test=BOOT-5264",
        "",
    ))


def lynis_script() -> str:
    """Lynis on the running node (issue #16: the audit of the booted system, not of a directory).

    Once per image: the report is named by the root hash of the kernel command line, so a power
    cycle prints the same report again and an OS update audits its new root.  A run cut short
    (the node went down) leaves only ``.part`` and runs again at the next boot.  The console
    gets the figures and the warnings; the report and log stay on the data partition.
    """
    p = LYNIS_PREFIX
    return "\n".join((
        "#!/bin/sh",
        "# Written by `appliance build` (provisioning/image/plan.py): Lynis on the running node.",
        *_per_image(LYNIS_DIR, "report", "dat"),
        'if [ ! -s "$report" ]; then',
        '    rm -f "$report.part"',
        f'    lynis audit system --quick --no-colors --profile {LYNIS_PROFILE} --logfile "$dir/lynis.log" '
        '--report-file "$report.part" >/dev/null 2>&1',
        "    rc=$?",
        "    if ! grep -q '^hardening_index=' \"$report.part\" 2>/dev/null; then",
        f'        echo "{p} failed: lynis exited $rc without a hardening index (see $dir/lynis.log)"',
        "        exit 1",
        "    fi",
        '    mv "$report.part" "$report"',
        "fi",
        "field() { sed -n \"s/^$1=//p\" \"$report\" | head -n 1; }",
        f'echo "{p} hardening_index=$(field hardening_index) tests=$(field lynis_tests_done)'
        " warnings=$(grep -c '^warning\\[\\]=' \"$report\")"
        " suggestions=$(grep -c '^suggestion\\[\\]=' \"$report\") version=$(field lynis_version)\"",
        f"sed -n 's/^warning\\[\\]=/{p} warning /p' \"$report\"",
        f'echo "{p} end"',
        "",
    ))


def _scanner_units(unit: str, timer: str, script: str, what: str,
                   after: tuple[str, ...] = ()) -> dict[str, str]:
    """A scanner's service, and the timer that starts it after the boot.

    A timer, not ``WantedBy=multi-user.target``: a oneshot the target wants holds the target
    (and the boot's "startup finished") until it exits, minutes under emulation.  The service
    runs at idle CPU and I/O priority, after the agent, so the node serves first; ``after``:
    units it waits for besides.
    """
    service = "\n".join((
        "[Unit]",
        f"Description={what} on the running node, its results on the console (bench images)",
        "After=" + " ".join((AGENT_UNIT, LISTEN_REPORT_UNIT, *after)),
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={script}",
        "StandardOutput=tty",
        "TTYPath=/dev/console",
        "CPUSchedulingPolicy=idle",
        "IOSchedulingClass=idle",
        "Nice=19",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "",
    ))
    timer_text = "\n".join((
        "[Unit]",
        f"Description=Run {what} on the running node once the boot is done",
        "",
        "[Timer]",
        "OnActiveSec=5s",
        f"Unit={unit}",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ))
    return {unit: service, timer: timer_text}


def lynis_units() -> dict[str, str]:
    """The service that runs :func:`lynis_script`, and its timer (see :func:`_scanner_units`).

    After OpenSCAP's (both timers fire together, so the ordering runs them one after the
    other): run side by side on one emulated CPU, OpenSCAP's systemd probes got no answer over
    D-Bus in time, and OpenSCAP reads a probe without an answer as "no such unit", so every
    rule about an enabled or running unit read "fail" (2026-12-03: the same image scanned
    without Lynis passed all of them)."""
    return _scanner_units(LYNIS_UNIT, LYNIS_TIMER, LYNIS_SCRIPT, "Lynis", after=(SCAP_UNIT,))


SCAP_UNIT = "appliance-scap.service"
SCAP_TIMER = "appliance-scap.timer"
SCAP_PREFIX = "appliance-scap:"
SCAP_SCRIPT = "/usr/lib/appliance/scap-report"
SCAP_DIR = "/var/lib/appliance-scap"


def scap_script() -> str:
    """OpenSCAP on the running node: per profile, the rules the build's offline audit failed
    or could not decide (``/usr/share/appliance/scap/profiles``, written by
    audit.stage_booted_scan), evaluated natively against the live system (kernel parameters,
    mounts, modules, services); a rule
    that takes no value is evaluated once, and its result given to the other profiles that
    failed it (``same``).

    Once per image, as the Lynis script: the results are named by the root hash, a run cut
    short leaves only ``.part``.  The console gets ``PROFILE RULE RESULT`` lines, then ``end``;
    oscap's output stays on the data partition (no XCCDF results file: 8 MB per profile to
    write, minutes under emulation, for what the output already says).
    """
    p = SCAP_PREFIX
    return "\n".join((
        "#!/bin/sh",
        "# Written by `appliance build` (provisioning/image/plan.py): OpenSCAP on the running node.",
        *_per_image(SCAP_DIR, "results", "txt"),
        "content=/usr/share/appliance/scap",
        'if [ ! -s "$results" ]; then',
        '    : > "$results.part"',
        "    while read -r profile tailored rules; do",
        "        set --",
        '        for rule in $rules; do set -- "$@" --rule "xccdf_org.ssgproject.content_rule_$rule"; done',
        '        oscap xccdf eval --profile "$tailored" --tailoring-file "$content/tailoring.xml" "$@" \\',
        '            "$content/ssg-debian13-ds.xml" </dev/null >"$dir/$profile.log" 2>&1',
        "        rc=$?",
        '        if [ "$rc" != 0 ] && [ "$rc" != 2 ]; then  # 2: a rule failed',
        f'            echo "{p} failed: oscap exited $rc on $profile (see $dir/$profile.log)"',
        "            exit 1",
        "        fi",
        # oscap prints each rule as "Rule\\r\\tID" then "Result\\r\\tRESULT"
        "        awk -v p=\"$profile\" '$1 ~ /^Rule/ { r = $2; "
        "sub(/^xccdf_org\\.ssgproject\\.content_rule_/, \"\", r) }"
        " $1 ~ /^Result/ { print p, r, $2 }' \"$dir/$profile.log\" >>\"$results.part\"",
        '    done < "$content/profiles"',
        # a rule that takes no value has one result in every profile: evaluated in the first
        # that failed it offline, given to the others as `same` lists them
        "    if ! awk 'NR == FNR { r[$1 \" \" $2] = $3; next }"
        " { k = $3 \" \" $2; print $1, $2, (k in r ? r[k] : \"error\") }'"
        ' "$results.part" "$content/same" > "$dir/same.txt"; then',
        f'        echo "{p} failed: cannot read $content/same"',
        "        exit 1",
        "    fi",
        '    cat "$dir/same.txt" >> "$results.part"',
        '    mv "$results.part" "$results"',
        "fi",
        f"sed 's/^/{p} /' \"$results\"",
        f'echo "{p} end"',
        "",
    ))


def scap_units() -> dict[str, str]:
    """The service that runs :func:`scap_script`, and its timer (see :func:`_scanner_units`)."""
    return _scanner_units(SCAP_UNIT, SCAP_TIMER, SCAP_SCRIPT, "OpenSCAP")


# Timers Debian enables that have nothing to do on a sealed image with no package sources:
# apt's (they would try the network for sources that were removed), man-db's cache rebuild
# (the root is read-only), dpkg's database backup (the database never changes after the
# build) and e2scrub (it checks ext4 on LVM snapshots; the image has no LVM).  fstrim.timer
# stays: the data partition (/var) is writable flash that trimming keeps healthy.
IDLE_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer",
               "dpkg-db-backup.timer", "e2scrub_all.timer")

# Units with nothing to do on an appliance, masked (issue #16: every enabled service at exposure
# 5.0 or less, and less attack surface besides).  Console logins: root and every account are
# locked in every profile, so a getty only parses input that can never log anyone in.  The
# console and wall password agents: the sealed data partition opens headless in the initrd, and
# nothing in the running system asks for a passphrase.  /dev/initctl: nothing speaks SysV
# telinit's protocol to systemd.  binfmt_misc: the node runs its own native binaries only, and
# an interpreter registered there would run any file by its magic bytes; systemd-binfmt also
# sat at 8.5 s in the TCG boot's blame, beside the agent's start.
UNUSED_UNITS = ("getty.target", "getty@.service", "serial-getty@.service", "autovt@.service",
                "systemd-ask-password-console.path", "systemd-ask-password-console.service",
                "systemd-ask-password-wall.path", "systemd-ask-password-wall.service",
                "systemd-initctl.socket", "systemd-initctl.service",
                "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
                "proc-sys-fs-binfmt_misc.mount")

# Sandboxes added to the system services the image keeps (systemd-analyze security's exposure,
# offline; the audit reports each).  The root is a read-only verity image already, so
# ProtectSystem costs nothing; each unit keeps what its daemon needs:
_SANDBOX_COMMON = ("NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes", "UMask=0077")
SERVICE_SANDBOXES: dict[str, tuple[str, ...]] = {
    # auditd (9.0 as Debian ships it): the audit netlink socket and its log directory; the
    # capabilities to set the rules, boost its priority and size its queue; nothing else
    "auditd.service": (
        *_SANDBOX_COMMON, "ProtectSystem=full", "PrivateDevices=yes", "ProtectClock=yes",
        "ProtectKernelTunables=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes",
        "ProtectHostname=yes", "RestrictNamespaces=yes", "RestrictSUIDSGID=yes",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK", "IPAddressDeny=any",
        "SystemCallArchitectures=native", "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=CAP_AUDIT_CONTROL CAP_AUDIT_READ CAP_AUDIT_WRITE CAP_SYS_NICE "
        "CAP_SYS_RESOURCE CAP_CHOWN CAP_FOWNER CAP_DAC_READ_SEARCH"),
    # dbus-daemon (9.3): already an unprivileged user; it reads its configuration, talks over
    # the socket systemd hands it, and writes audit records of denials (CAP_AUDIT_WRITE)
    "dbus.service": (
        *_SANDBOX_COMMON, "ProtectSystem=strict", "PrivateDevices=yes", "ProtectClock=yes",
        "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes", "ProtectHostname=yes", "RestrictNamespaces=yes",
        "RestrictRealtime=yes", "RestrictSUIDSGID=yes", "RestrictAddressFamilies=AF_UNIX AF_NETLINK",
        "IPAddressDeny=any", "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native", "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=CAP_AUDIT_WRITE"),
    # systemd-udevd (7.1): it must reach every device, load modules, rename links and manage
    # its delegated cgroup, so on top of systemd's own sandbox only what none of that needs.
    # Not PrivateTmp (it would order udevd after /var/tmp's mount, whose device udevd makes)
    # nor UMask (the directories it makes under /dev and /run/udev are for every user to read).
    # No port I/O (@raw-io: ioperm, iopl, pciconfig_*) and no vhangup: none of the image's rule
    # helpers (ata_id, scsi_id, cdrom_id, dmi_memory_id, dmsetup, ...) does either; the clock
    # calls are denied upstream already.  With UDEV_NATIVE_ABI: 5.2 -> 4.9.
    "systemd-udevd.service": (
        "NoNewPrivileges=yes", "ProtectHome=yes", "ProtectSystem=full", "RestrictNamespaces=yes",
        "CapabilityBoundingSet=~CAP_SYSLOG CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_NET_RAW "
        "CAP_AUDIT_CONTROL CAP_AUDIT_READ CAP_AUDIT_WRITE CAP_SYS_BOOT CAP_SYS_PACCT CAP_LEASE "
        "CAP_LINUX_IMMUTABLE CAP_IPC_LOCK CAP_SYS_PTRACE CAP_SETUID CAP_SETGID CAP_SETPCAP "
        "CAP_SYS_CHROOT CAP_BLOCK_SUSPEND CAP_MAC_ADMIN CAP_MAC_OVERRIDE CAP_SYS_TTY_CONFIG",
        "SystemCallFilter=~@raw-io"),
    # usbguard (2.9 as Debian ships it): it writes the devices' `authorized` files in /sys and
    # hears uevents over netlink; on top of Debian's sandbox, what that does not need
    "usbguard.service": (
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectClock=yes", "ProtectKernelLogs=yes",
        "ProtectHostname=yes", "RestrictSUIDSGID=yes", "PrivateMounts=yes"),
}
# Debian's udev resets upstream's SystemCallArchitectures=native in a drop-in of this name, so
# that rules may run foreign-architecture helpers (Debian #869719).  A sealed image has none
# (one architecture, no multiarch), so a file of the same name in /etc puts native back.
UDEV_NATIVE_ABI = "/etc/systemd/system/systemd-udevd.service.d/syscall-architecture.conf"


# The sandboxed services that only some images have: unit -> its [hardening] switch.
_OPTIONAL_SERVICES = {"auditd.service": "auditd", "usbguard.service": "usbguard"}


def _sandbox_files(profile: Profile) -> list[FileSpec]:
    """SERVICE_SANDBOXES' drop-ins, for the services the profile has."""
    header = "# Written by `appliance build` (provisioning/image/plan.py SERVICE_SANDBOXES).\n[Service]\n"
    return [*(FileSpec(f"/etc/systemd/system/{unit}.d/50-appliance-sandbox.conf",
                       header + "".join(f"{line}\n" for line in settings))
              for unit, settings in SERVICE_SANDBOXES.items()
              if unit not in _OPTIONAL_SERVICES or getattr(profile.hardening, _OPTIONAL_SERVICES[unit])),
            FileSpec(UDEV_NATIVE_ABI, "# Written by `appliance build`: replaces udev's drop-in of this name "
                     "(see plan.py UDEV_NATIVE_ABI).\n[Service]\nSystemCallArchitectures=native\n")]


def _hardening_services(profile: Profile) -> tuple[list[FileSpec], list[str], list[str], tuple[str, ...]]:
    """The hardening's services: their files, the units to enable and to mask, the paths to
    remove (auditd's rules and AppArmor's profiles are files of _hardening_files)."""
    h = profile.hardening
    files: list[FileSpec] = []
    enable: list[str] = []
    mask: list[str] = []
    remove: tuple[str, ...] = ()
    if h.auditd:
        enable.append("auditd.service")
    if h.sysctl:
        files.append(FileSpec(f"/etc/systemd/system/{SYSCTL_REAPPLY_UNIT}", sysctl_reapply_unit()))
        enable.append(SYSCTL_REAPPLY_UNIT)
    if h.usbguard:
        files += [FileSpec(f"{USBGUARD_DIR}/usbguard-daemon.conf", USBGUARD_DAEMON_CONF, 0o600),
                  FileSpec(f"{USBGUARD_DIR}/rules.conf", usbguard_rules(profile), 0o600),
                  FileSpec(USB_MODULES_LOAD, "usbcore\n")]
        enable.append("usbguard.service")
        mask.append("usbguard-dbus.service")  # a D-Bus front end to the daemon: nothing uses it
        remove += (f"{USBGUARD_DIR}/IPCAccessControl.d",)  # the postinst's grant to plugdev
    if h.apparmor:
        enable.append("apparmor.service")
    return files, enable, mask, remove


def _diagnostics(profile: Profile) -> tuple[list[FileSpec], list[str], list[str]]:
    """The bench's console reports ([diagnostics]): their files, the units to enable, the units
    to mask."""
    files: list[FileSpec] = []
    enable: list[str] = []
    mask: list[str] = []
    if profile.diagnostics.console_listeners:
        files += [FileSpec(f"/etc/systemd/system/{LISTEN_REPORT_UNIT}", listen_report_unit()),
                  FileSpec(LISTEN_REPORT_SCRIPT, listen_report_script(profile), 0o755)]
        enable.append(LISTEN_REPORT_UNIT)
    if profile.diagnostics.console_boot_times:
        files += [FileSpec(f"/etc/systemd/system/{BOOT_TIMES_UNIT}", boot_times_unit()),
                  FileSpec(BOOT_TIMES_SCRIPT, boot_times_script(), 0o755)]
        enable.append(BOOT_TIMES_UNIT)
    if profile.diagnostics.console_lynis:
        files += [*(FileSpec(f"/etc/systemd/system/{name}", text) for name, text in lynis_units().items()),
                  FileSpec(LYNIS_SCRIPT, lynis_script(), 0o755),
                  FileSpec(LYNIS_PROFILE, lynis_profile())]
        enable.append(LYNIS_TIMER)
        mask.append(DEBIAN_LYNIS_TIMER)  # Debian's daily run: ours runs once per image
    if profile.diagnostics.console_scap:
        files += [*(FileSpec(f"/etc/systemd/system/{name}", text) for name, text in scap_units().items()),
                  FileSpec(SCAP_SCRIPT, scap_script(), 0o755)]
        enable.append(SCAP_TIMER)
    return files, enable, mask


def configure_plan(profile: Profile, *, pip_wheel: str, wheels_dir: str = WHEELS_IN_ROOT,
                   kernel_release: str = "", gpu_record: dict[str, Any] | None = None) -> Plan:
    """The configure stage's plan for ``profile``.

    ``pip_wheel`` is the path (inside the root) of the pip wheel that Debian's python3-venv
    ships; it installs the agent without leaving pip in the venv.  For a GPU profile,
    ``kernel_release`` (the root's kernel) and ``gpu_record`` (the driver set baked into the
    image) come from the GPU stage (:mod:`provisioning.image.gpu_stage`).
    """
    files = [
        FileSpec("/etc/hostname", profile.image.hostname + "\n"),
        FileSpec("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{profile.image.hostname}\n"
                 "::1\tlocalhost ip6-localhost ip6-loopback\n"),
        FileSpec("/etc/machine-id", ""),
        FileSpec("/etc/appliance/agent.toml", agent_toml(profile), 0o640, "root", AGENT_GROUP),
        FileSpec(f"/etc/systemd/system/{AGENT_UNIT}", agent_unit(profile)),
        FileSpec(TPM_UDEV_RULES, tpm_udev_rules()),
        FileSpec("/etc/systemd/network/50-appliance.network", _network(profile)),
        *_hardening_files(profile),
        *_sandbox_files(profile),
        *_time_files(profile),
        *_ssh_files(profile),
        FileSpec(f"/etc/systemd/system/{BOOT_CHECK_UNIT}", boot_check_unit()),
        *(FileSpec(f"/etc/systemd/system/{name}", text) for name, text in os_update_units(profile).items()),
    ]
    diagnostics, diagnostic_units, diagnostic_masks = _diagnostics(profile)
    files += diagnostics
    hardening_unit_files, hardening_units, hardening_masks, hardening_removed = _hardening_services(profile)
    files += hardening_unit_files
    if profile.tpm.seal_data:  # Node/Unseal's helper (provisioning.image.sealed_mode)
        files += [FileSpec(path, text, mode)
                  for path, (text, mode) in unseal_files(profile.image.name).items()]
    if _checks_cpu(profile):
        files.append(FileSpec(f"/etc/systemd/system/{CPU_CHECK_UNIT}", cpu_check_unit(profile)))
    if profile.diagnostics.console_journal:
        files.append(FileSpec("/etc/systemd/journald.conf.d/60-console.conf",
                              "[Journal]\nForwardToConsole=yes\nTTYPath=/dev/console\n"
                              "MaxLevelConsole=info\n"))
    py = f"{VENV}/bin/python"
    commands: list[tuple[str, ...]] = [
        *_user_commands(profile),
        *_account_commands(),
        *(_auditd_commands() if profile.hardening.auditd else ()),
        *_logrotate_commands(),
        ("python3", "-m", "venv", "--without-pip", VENV),
        (py, f"{pip_wheel}/pip", "install", "--no-index", "--no-deps", "--require-hashes",
         "--no-compile", "--disable-pip-version-check", "--no-cache-dir", "--root-user-action=ignore",
         "--find-links", wheels_dir, "-r", f"{wheels_dir}/requirements.txt"),
        ("rm", "-rf", wheels_dir),
        *_setuid_commands(profile),
    ]
    enable = ["nftables.service", "systemd-networkd.service", "systemd-timesyncd.service",
              AGENT_UNIT, BOOT_CHECK_UNIT, OS_UPDATE_PATH]
    enable += hardening_units
    if profile.ssh.enabled:
        enable.append("ssh.service")
    enable += diagnostic_units
    if profile.tpm.seal_data:
        enable.append(UNSEAL_PATH_UNIT)
    mask = ["debug-shell.service", "ctrl-alt-del.target", "systemd-networkd-wait-online.service",
            *IDLE_TIMERS, *UNUSED_UNITS, *diagnostic_masks, *hardening_masks]
    if not profile.hardening.core_dumps:
        mask.append("systemd-coredump.socket")
    # sysctl_kernel_pid_max: systemd's vendor file sets 4194304; the content checks every
    # sysctl file, so overriding it in 90-appliance.conf is not enough
    remove: tuple[str, ...] = ("/etc/apt/sources.list", "/etc/apt/sources.list.d", "/etc/resolv.conf",
                               "/var/lib/dbus/machine-id", "/usr/lib/sysctl.d/50-pid-max.conf")
    remove += hardening_removed
    if not profile.hardening.core_dumps:
        # disable_users_coredumps: Debian's systemd raises the hard core limit to infinity for
        # systemd-coredump, which the image turns off; the content checks every limits.d file
        remove += ("/etc/security/limits.d/10-coredump-debian.conf",)
    if profile.gpu_set is not None:
        gpu_files, gpu_commands, gpu_enable = gpu_plan(profile, kernel_release, gpu_record or {})
        files += gpu_files
        commands = gpu_commands + commands  # the driver first: the agent's venv does not need it
        enable += gpu_enable
    # after the files: the merge reads rules.d/50-appliance.rules, which is one of them
    after_files = (("sh", "-c", AUGENRULES_AT_BUILD),) if profile.hardening.auditd else ()
    return Plan(tuple(files), remove, tuple(commands), tuple(enable), tuple(mask), after_files)
