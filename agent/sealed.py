"""Sealed mode on the node (issue #17): the data partition stayed shut at boot.

The image's initrd (provisioning.image.sealed_mode) writes :data:`SEALED_MARKER` when the TPM
would not open the data partition, and boots on a RAM /var. The agent then serves no model,
says why in its health and events (with the PCR values the TPM held), and takes the site's
recovery key from an admin (``Node/Unseal``): :class:`Unsealer` hands it to the root helper that
enrols the TPM again and reboots, and waits for the helper's answer.

The marker is root's file on a tmpfs, but it is parsed as any input is: a malformed one still
means the data stayed sealed, only with the reason unknown.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import SealSection
from agent.errors import ApplianceError

__all__ = ["RECOVERY_KEY", "SEALED_ESCROW", "SEALED_MARKER", "UNSEAL_REQUEST", "UNSEAL_RESULT",
           "RecoveryKeyError", "SealState", "UnsealError", "Unsealer", "read_escrow", "read_seal_state"]

# The paths the image's initrd, the agent and the root's helper share (the image side imports
# them): [seal]'s defaults. The request is in the agent's RuntimeDirectory; the result in the
# helper's, read-only to the agent.
SEALED_MARKER = SealSection().marker
# the recovery key's escrow (RSA-OAEP to the site's key), copied from the ESP as the agent starts
SEALED_ESCROW = SealSection().escrow
_ESCROW_MAX = 4096  # an RSA-16384 ciphertext is 2048 bytes
UNSEAL_REQUEST = SealSection().request
UNSEAL_RESULT = SealSection().result
# systemd's recovery keys: 8 groups of 8 "modhex" letters (systemd-cryptenroll --recovery-key)
RECOVERY_KEY = re.compile(r"[cbdefghijklnrtuv]{8}(?:-[cbdefghijklnrtuv]{8}){7}")
_MARKER_MAX = 64 << 10
_PCR_INDEX = re.compile(r"\d{1,2}")
_HEX = re.compile(r"[0-9a-fA-F]{1,128}")
_ONE_AT_A_TIME = threading.Lock()  # one request file, one answer file: one Node/Unseal at a time


class RecoveryKeyError(ApplianceError):
    """What was sent is not a recovery key; nothing was handed on."""

    grpc_code = "INVALID_ARGUMENT"


class UnsealError(ApplianceError):
    """The helper refused or failed; nothing changed on the volume."""

    grpc_code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class SealState:
    """Why this boot runs with its data partition shut, and what the TPM held."""

    reason: str
    device: str = ""
    pcrs_sha256: dict[str, str] = field(default_factory=dict)
    recovery_escrow: bytes = b""

    def describe(self) -> str:
        pcrs = ", ".join(f"PCR {i} {v[:16].lower()}…" for i, v in
                         sorted(self.pcrs_sha256.items(), key=lambda kv: int(kv[0])) if i in ("7", "11"))
        return f"data sealed: {self.reason}" + (f" ({pcrs})" if pcrs else "")


def read_seal_state(marker: Path = SEALED_MARKER, escrow: Path = SEALED_ESCROW) -> SealState | None:
    """The seal state this boot's initrd recorded (with the escrow at ``escrow``), or None when
    the data partition opened."""
    try:
        with marker.open("rb") as f:
            raw = f.read(_MARKER_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return SealState(reason=f"unknown ({marker}: {exc.strerror})", recovery_escrow=read_escrow(escrow))
    try:
        doc: Any = json.loads(raw) if len(raw) <= _MARKER_MAX else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return SealState(reason=f"unknown ({marker} is not the initrd's JSON)",
                         recovery_escrow=read_escrow(escrow))
    reason = doc.get("reason")
    device = doc.get("device")
    pcrs = doc.get("pcrs_sha256")
    return SealState(
        recovery_escrow=read_escrow(escrow),
        reason=reason[:500] if isinstance(reason, str) and reason else "unknown (no reason recorded)",
        device=device[:200] if isinstance(device, str) else "",
        pcrs_sha256={k: v.lower() for k, v in pcrs.items()
                     if isinstance(k, str) and _PCR_INDEX.fullmatch(k)
                     and isinstance(v, str) and _HEX.fullmatch(v)} if isinstance(pcrs, dict) else {})


def read_escrow(path: Path = SEALED_ESCROW) -> bytes:
    """The recovery key's escrow, or b"" when there is none (no sealed data, not made yet)."""
    try:
        with path.open("rb") as f:
            blob = f.read(_ESCROW_MAX + 1)
    except OSError:
        return b""
    return blob if len(blob) <= _ESCROW_MAX else b""


class Unsealer:
    """Hands a recovery key to the root helper and waits for its answer.

    One request at a time; the key is written only to the agent's runtime directory (RAM), with
    mode 0600, and the helper deletes it as it reads it.
    """

    def __init__(self, request: Path = UNSEAL_REQUEST, result: Path = UNSEAL_RESULT,
                 timeout_s: float = 120.0, poll_s: float = 0.2) -> None:
        self.request = request
        self.result = result
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def unseal(self, key: str) -> str:
        """Send ``key``; return the helper's message once the TPM is enrolled again.

        Raises:
            RecoveryKeyError: ``key`` is not shaped like a systemd recovery key.
            UnsealError: the helper refused (wrong key, no TPM) or did not answer in time.
        """
        key = key.strip()
        if not RECOVERY_KEY.fullmatch(key):
            raise RecoveryKeyError(
                "recovery_key: not a recovery key (8 groups of 8 letters of cbdefghijklnrtuv, "
                "separated by '-', as `appliance pki recovery-key` prints it)")
        with _ONE_AT_A_TIME:
            stale = self._answer_mtime()
            try:
                self._hand_over(key)
                return self._wait(stale)
            finally:
                self.request.unlink(missing_ok=True)  # taken by the helper, or nothing acts on it later

    def _hand_over(self, key: str) -> None:
        self.request.unlink(missing_ok=True)
        tmp = self.request.with_name(f".{self.request.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, key.encode())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        tmp.replace(self.request)  # the helper's path unit fires on the final name only

    def _wait(self, stale: int) -> str:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            answer = self._answer(stale)
            if answer is not None:
                ok, message = answer
                if not ok:
                    raise UnsealError(f"unseal refused: {message}")
                return message
            time.sleep(self.poll_s)
        raise UnsealError(f"the node's unseal helper did not answer within {self.timeout_s:.0f} s "
                          f"(no {self.result}); nothing was changed by this request")

    def _answer_mtime(self) -> int:
        try:
            return self.result.stat().st_mtime_ns
        except OSError:
            return -1

    def _answer(self, stale: int) -> tuple[bool, str] | None:
        """The helper's answer, if one newer than ``stale`` (an earlier request's) is there."""
        mtime = self._answer_mtime()
        if mtime < 0 or mtime == stale:
            return None
        try:
            doc = json.loads(self.result.read_bytes()[:_MARKER_MAX])
        except (OSError, ValueError):
            return None  # being replaced: read again
        if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
            return False, f"unreadable answer in {self.result}"
        message = doc.get("message")
        return doc["ok"], message if isinstance(message, str) else ""
