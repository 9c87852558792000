"""Sealed mode (issue #17): a node whose TPM will not open its data partition still boots.

The data partition opens in the initrd with the TPM alone (provisioning.image.seal). When it
does not (the UKI another key signed, Secure Boot changed, a new TPM or none), the node must not
reformat anything and must not sit in an emergency shell at a remote site. So:

- **In the initrd**, after the attempt to open it, ``appliance-sealed-mode.service`` notes why
  and the PCR values the TPM held in /run/appliance/sealed.json (which survives the switch to
  the root), then makes /dev/mapper/data a RAM disk (brd, under a dm-linear mapping of that
  name) holding a copy of the image's /var. The root's /var mount, the growfs and every unit
  after them run as on any boot; the sealed volume is never opened, written or formatted.
- **The agent** reads that file, serves no model, and says "data sealed" in its health, its
  events and Node/GetHealth (agent.sealed); ``Node/Unseal`` (admin, mTLS) takes the site's
  recovery key and leaves it where only this root's helper reads it.
- **The helper** (``appliance-unseal.service``, root, started by a path unit when the key
  arrives) checks the key against the volume (``cryptsetup open --test-passphrase``), then
  enrols the TPM again with ``systemd-cryptenroll``: PCR 7 as it is now, and the same signed
  PCR 11 policy key the volume's TPM token named (read from the token, not from the running UKI,
  so a UKI another key signed gains nothing), wipes the old TPM slot, answers and reboots. A
  wrong key changes nothing. The key is never written anywhere but /run (RAM).

  systemd-cryptenroll does nothing ("This PCR set is already enrolled, executing no operation",
  exit 0) when a systemd-tpm2 token with the same policy hash is in the header: the hash covers
  the PCR values and the policy key, not the TPM, so the old board's token blocks the new board's
  enrolment, and a ``--wipe-slot=tpm2`` in the same call spares the slot it found. So the helper
  first retires the old token (a copy under another type, then the original removed: at every
  step a token names the site's key), enrols, and only then wipes the retired token's key slot.
  If the enrolment fails, the old token goes back under its own id: nothing changed.
"""

from __future__ import annotations

from agent import sealed
from provisioning.image.partuuid import data_uuid
from provisioning.image.recovery import ESCROW_PATH

__all__ = [
    "RAM_VAR_MIB",
    "RETIRED_TPM2_TOKEN",
    "SEALED_MARKER",
    "SEALED_MODE_DRIVERS",
    "SEALED_MODE_UNIT",
    "UNSEAL_PATH_UNIT",
    "UNSEAL_REQUEST",
    "UNSEAL_RESULT",
    "UNSEAL_UNIT",
    "escrow_copy_pre",
    "sealed_mode_script",
    "unseal_files",
    "unseal_script",
]

# The paths the initrd, the agent and the helper share are the agent's (agent.sealed): /run survives
# the switch to the root; the request is in the agent's RuntimeDirectory (0700, the agent's); the
# answer in root's directory, read-only to the agent (nothing it can redirect with a symlink).
SEALED_MARKER = str(sealed.SEALED_MARKER)
UNSEAL_REQUEST = str(sealed.UNSEAL_REQUEST)
UNSEAL_RESULT = str(sealed.UNSEAL_RESULT)
SEALED_MODE_UNIT = "appliance-sealed-mode.service"
UNSEAL_UNIT = "appliance-unseal.service"
UNSEAL_PATH_UNIT = "appliance-unseal.path"
# the RAM disk's size; brd takes memory only for blocks written (the image's /var is ~11 MiB)
RAM_VAR_MIB = 1024
SEALED_MODE_DRIVERS = ("brd",)
# the type the helper gives the old TPM's token while it enrols the new one (see above)
RETIRED_TPM2_TOKEN = "appliance-retired-tpm2"  # noqa: S105 (a LUKS2 token type, no secret)

_SEALED_MODE_UNIT = """[Unit]
Description=Keep a sealed data partition shut and boot on a RAM /var
DefaultDependencies=no
After=systemd-cryptsetup@data.service systemd-repart.service sysroot.mount
RequiresMountsFor=/sysroot
Before=initrd.target
ConditionPathExists=!/dev/mapper/data

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/appliance/sealed-mode
StandardOutput=journal+console
"""

# POSIX sh with what dracut puts in the initrd (its base, dm and the install list of seal.py).
_SEALED_MODE_SCRIPT = r"""#!/bin/sh
# The data partition did not open (see provisioning/image/sealed_mode.py): say why, with the
# PCR values the TPM holds, and boot on a RAM /var. The sealed volume is not touched.
set -u
data=/dev/disk/by-partuuid/@DATA@
for name in /sys/block/dm-*/dm/name; do
    [ "$(cat "$name" 2>/dev/null)" = data ] && exit 0  # it did open
done
fail() {
    echo "appliance: sealed mode: $1" >&2
    exit 1
}
if [ ! -e "$data" ]; then
    reason="no data partition: it was never made (the first boot could not seal it)"
elif [ ! -e /dev/tpmrm0 ] && [ ! -e /dev/tpm0 ]; then
    reason="no TPM: the data partition is sealed to a TPM this machine does not show"
else
    reason="measurements changed: the TPM refused the key (PCR 7, the signed PCR 11 policy, or not this TPM)"
fi
pcrs=""
for i in 0 1 2 3 4 5 6 7 11; do
    value=$(cat "/sys/class/tpm/tpm0/pcr-sha256/$i" 2>/dev/null) || continue
    case "$value" in
        ""|*[!0-9A-Fa-f]*) continue ;;
    esac
    pcrs="$pcrs${pcrs:+, }\"$i\": \"$value\""
done
marker=@MARKER@
mkdir -p "${marker%/*}" || fail "cannot create ${marker%/*}"
printf '{"reason": "%s", "device": "%s", "pcrs_sha256": {%s}}\n' "$reason" "$data" "$pcrs" \
    > "$marker.new" && mv "$marker.new" "$marker" || fail "cannot write $marker"
echo "appliance: data partition sealed: $reason; this boot keeps it shut and runs on a RAM /var"
modprobe brd rd_nr=1 rd_size=@KIB@ max_part=0 || fail "cannot load brd"
sectors=$(cat /sys/block/ram0/size) || fail "no /dev/ram0"
dmsetup create data --table "0 $sectors linear /dev/ram0 0" || fail "cannot map /dev/ram0 as data"
udevadm settle -t 30 2>/dev/null
mkfs.ext4 -q -F -L sealed-ram-var /dev/mapper/data || fail "cannot format the RAM disk"
mkdir -p /run/appliance-ram-var && mount -t ext4 /dev/mapper/data /run/appliance-ram-var \
    || fail "cannot mount the RAM disk"
cp -a /sysroot/var/. /run/appliance-ram-var/ || fail "cannot copy the image's /var"
umount /run/appliance-ram-var || fail "cannot unmount the RAM disk"
"""

_UNSEAL_PATH_UNIT = f"""[Unit]
Description=Watch for the recovery key an admin sent to a sealed node
ConditionPathExists={SEALED_MARKER}

[Path]
PathExists={UNSEAL_REQUEST}
Unit={UNSEAL_UNIT}

[Install]
WantedBy=multi-user.target
"""

_UNSEAL_UNIT = f"""[Unit]
Description=Enrol this node's TPM again with the site's recovery key, then reboot
ConditionPathExists={SEALED_MARKER}

[Service]
Type=oneshot
ExecStart=/usr/lib/appliance/unseal-data
RuntimeDirectory={UNSEAL_RESULT.split("/")[2]}
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
UMask=0077
"""

_UNSEAL_SCRIPT = r"""#!/bin/sh
# Enrol the sealed data partition to this node's TPM again, with the site's recovery key that the
# agent's Node/Unseal received (see provisioning/image/sealed_mode.py). The request is the agent's
# file and is read as hostile: a plain file, the shape of a systemd recovery key, nothing else.
set -u
request=@REQUEST@
result=@RESULT@
out=${result%/*}
data=@DEVICE@
retired=@RETIRED@
work=""
answer() {
    tmp=$(mktemp "$out/.result.XXXXXX") || exit 1
    printf '{"ok": %s, "message": "%s"}\n' "$1" "$2" > "$tmp" && chmod 0644 "$tmp" && mv "$tmp" @RESULT@
}
finish() {
    [ -n "$work" ] && rm -rf "$work"
    answer "$1" "$2"
    exit 0
}
tokens() {  # the ids of the volume's tokens of type $1
    cryptsetup luksDump "$data" | sed -n "s/^ *\([0-9][0-9]*\): $1\$/\1/p"
}
keyslots() {  # the key slots token $1 opens, one per line
    cryptsetup token export --token-id "$1" "$data" \
        | sed -n 's/.*"keyslots": *\[\([^]]*\)\].*/\1/p' | tr -d '" ' | tr ',' '\n'
}
restore() {  # this run's retired tokens back under their own ids and type
    [ -s "$work/retired" ] || return 0
    while read -r id copy; do
        cryptsetup token import --token-id "$id" --json-file "$work/tpm2-$id.json" "$data" \
            && cryptsetup token remove --token-id "$copy" "$data"
    done < "$work/retired"
}
[ -e "$request" ] || [ -L "$request" ] || exit 0
if [ -L "$request" ] || [ ! -f "$request" ]; then
    rm -f "$request"
    finish false "the request is not a plain file"
fi
key=$(head -c 100 "$request")
rm -f "$request"
case "$key" in
    *[!cbdefghijklnrtuv-]*) finish false "not a recovery key (8 groups of 8 letters of cbdefghijklnrtuv)" ;;
esac
[ "${#key}" -eq 71 ] || finish false "not a recovery key (8 groups of 8 letters of cbdefghijklnrtuv)"
work=$(mktemp -d "$out/.unseal.XXXXXX") || finish false "no room in $out"
printf '%s' "$key" > "$work/key"
if ! opened=$(cryptsetup open --test-passphrase --verbose --key-file "$work/key" "$data" 2>/dev/null); then
    finish false "the recovery key does not open the data partition; nothing changed"
fi
own=$(printf '%s\n' "$opened" | sed -n 's/^Key slot \([0-9][0-9]*\) unlocked.*/\1/p')
# the site's PCR 11 policy key, as the volume's TPM token names it (or the token an interrupted
# run of this helper retired)
for id in $(tokens systemd-tpm2) $(tokens "$retired"); do
    cryptsetup token export --token-id "$id" "$data" \
        | sed -n 's/.*"tpm2_pubkey": *"\([A-Za-z0-9+\/=]*\)".*/\1/p' | base64 -d > "$work/pcr.pem" 2>/dev/null
    [ -s "$work/pcr.pem" ] && break
done
[ -s "$work/pcr.pem" ] \
    || finish false "the volume names no signed PCR policy key (no systemd-tpm2 token)"
if [ ! -e @TPM@ ]; then
    finish false "no TPM on this node; open the volume at the console with the recovery key"
fi
# retire the old TPM's tokens: systemd-cryptenroll would take one for this enrolment and do nothing
: > "$work/retired"
for id in $(tokens systemd-tpm2); do
    cryptsetup token export --token-id "$id" "$data" > "$work/tpm2-$id.json" \
        || { restore; finish false "cannot read the volume's TPM token $id; nothing changed"; }
    sed "s/\"type\": *\"systemd-tpm2\"/\"type\":\"$retired\"/" "$work/tpm2-$id.json" > "$work/copy.json"
    before=$(tokens "$retired")
    cryptsetup token import --json-file "$work/copy.json" "$data" \
        || { restore; finish false "cannot retire the volume's TPM token $id; nothing changed"; }
    copy=$(tokens "$retired" | grep -vxF "$before" | head -n 1)
    [ -n "$copy" ] || { restore; finish false "cannot retire the volume's TPM token $id; nothing changed"; }
    echo "$id $copy" >> "$work/retired"
    cryptsetup token remove --token-id "$id" "$data" \
        || { restore; finish false "cannot retire the volume's TPM token $id; nothing changed"; }
done
if ! systemd-cryptenroll --unlock-key-file="$work/key" --tpm2-device=auto --tpm2-pcrs=7 \
        --tpm2-public-key="$work/pcr.pem" --tpm2-public-key-pcrs=11 "$data" >&2 \
        || [ -z "$(tokens systemd-tpm2)" ]; then
    restore
    finish false "systemd-cryptenroll could not enrol this node's TPM; nothing changed"
fi
# the retired tokens' key slots (this run's and an interrupted run's), unless a live token or the
# recovery key opens one
live=$(echo "$own"; for id in $(tokens systemd-tpm2) $(tokens systemd-recovery); do keyslots "$id"; done)
old=$(for id in $(tokens "$retired"); do keyslots "$id"; done | grep -vxF "$live" | sort -un | paste -sd, -)
note=""
if [ -n "$old" ] && ! systemd-cryptenroll --unlock-key-file="$work/key" --wipe-slot="$old" "$data" >&2; then
    note=" (the old TPM's key slot $old could not be wiped: its token is gone, so nothing can use it)"
fi
for id in $(tokens "$retired" | sort -rn); do
    cryptsetup token remove --token-id "$id" "$data"
done
rm -rf "$work"
work=""
answer true "the data partition is sealed to this node's TPM again; rebooting$note"
echo "appliance: unseal: the data partition is sealed to this node's TPM again; rebooting$note"
sleep 5  # the agent reads the answer and replies to its caller first
systemctl --no-block reboot
"""


def sealed_mode_script(name: str) -> str:
    """The initrd's script that notes why image ``name``'s data stayed sealed and boots on RAM."""
    return (_SEALED_MODE_SCRIPT.replace("@DATA@", data_uuid(name)).replace("@MARKER@", SEALED_MARKER)
            .replace("@KIB@", str(RAM_VAR_MIB * 1024)))


def sealed_mode_initrd_files(name: str) -> dict[str, tuple[str, int]]:
    """What sealed mode adds to image ``name``'s initrd: {path: (text, mode)}."""
    return {"usr/lib/appliance/sealed-mode": (sealed_mode_script(name), 0o755),
            f"etc/systemd/system/{SEALED_MODE_UNIT}": (_SEALED_MODE_UNIT, 0o644)}


def unseal_script(name: str, *, device: str = "", request: str = UNSEAL_REQUEST,
                  result: str = UNSEAL_RESULT, tpm: str = "/dev/tpmrm0") -> str:
    """The root's helper that enrols image ``name``'s sealed data to the TPM again; the keywords
    are for tests (the volume, the agent's request, the answer, the TPM device)."""
    return (_UNSEAL_SCRIPT.replace("@DEVICE@", device or f"/dev/disk/by-partuuid/{data_uuid(name)}")
            .replace("@REQUEST@", request).replace("@RESULT@", result).replace("@TPM@", tpm)
            .replace("@RETIRED@", RETIRED_TPM2_TOKEN))


def escrow_copy_pre(user: str, group: str) -> str:
    """The agent unit's line that copies the recovery key's escrow off the ESP (mounted at /efi by
    the sealed command line, root's only) for the agent, as root before the sandbox: the fleet
    collects it with the inventory, and unseals with it."""
    return (f"ExecStartPre=+/bin/sh -c '[ -r /efi/{ESCROW_PATH} ] || exit 0; exec install -m 0400 "
            f"-o {user} -g {group} /efi/{ESCROW_PATH} {sealed.SEALED_ESCROW}'")


def unseal_files(name: str) -> dict[str, tuple[str, int]]:
    """What a root with sealed data carries for Node/Unseal: {absolute path: (text, mode)}; the
    path unit is enabled (wanted by multi-user.target) and acts only in sealed mode."""
    return {"/usr/lib/appliance/unseal-data": (unseal_script(name), 0o755),
            f"/etc/systemd/system/{UNSEAL_UNIT}": (_UNSEAL_UNIT, 0o644),
            f"/etc/systemd/system/{UNSEAL_PATH_UNIT}": (_UNSEAL_PATH_UNIT, 0o644)}
