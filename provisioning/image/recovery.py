"""The recovery key of a TPM-sealed data partition: escrowed to the site, never kept on the node.

On its first boot, in its initrd (the one place the TPM policy holds), a node with a sealed data
partition enrols a recovery key with ``systemd-cryptenroll --recovery-key``, encrypts it at once
to the site's recovery public key (RSA-OAEP with SHA-256, ``openssl pkeyutl``) and writes only
the ciphertext to its ESP (:data:`ESCROW_PATH`): readable where the data is not, useless without
the site's private key. If any step after the enrolment fails, the recovery keyslot is wiped, and
the next boot tries again: there is never a recovery key the site does not hold.

This module holds the build's half (the site key is checked before it goes into the initrd) and
the site's half (decrypting an escrow read from a node's ESP).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent import sealed
from provisioning.errors import ImageError

__all__ = ["ESCROW_PATH", "MIN_BITS", "RECOVERY_KEY", "decrypt_escrow", "load_recovery_private_key",
           "load_recovery_public_key", "open_escrow"]

ESCROW_PATH = "appliance/recovery-key.enc"  # on the node's ESP
MIN_BITS = 2048
# systemd's recovery keys: 8 groups of 8 "modhex" characters
RECOVERY_KEY = sealed.RECOVERY_KEY


def load_recovery_public_key(path: Path) -> bytes:
    """The site's recovery public key at ``path`` as a PEM SubjectPublicKeyInfo (what the initrd gets).

    Raises:
        ImageError: unreadable, not a PEM public key, not RSA, or shorter than MIN_BITS (names the
            file and what it holds). A private key is refused too: it must never reach an image.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"recovery public key {path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        raise ImageError(f"recovery public key {path}: holds a private key; give the public half only "
                         "(openssl pkey -in KEY -pubout), the private half stays with the site")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ImageError(f"recovery public key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ImageError(f"recovery public key {path}: a {type(key).__name__}; expected RSA "
                         "(the initrd encrypts with RSA-OAEP)")
    if key.key_size < MIN_BITS:
        raise ImageError(f"recovery public key {path}: RSA-{key.key_size}; expected at least RSA-{MIN_BITS}")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_recovery_private_key(path: Path, passphrase: bytes | None = None) -> rsa.RSAPrivateKey:
    """The site's recovery private key (PEM, encrypted when ``passphrase`` is given).

    Raises:
        ImageError: unreadable, not a PEM private key (or the passphrase is wrong), or not RSA.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except OSError as exc:
        raise ImageError(f"recovery private key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise ImageError(f"recovery private key {path}: cannot load it ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ImageError(f"recovery private key {path}: a {type(key).__name__}; expected RSA")
    return key


def decrypt_escrow(private_key: rsa.RSAPrivateKey, blob: bytes) -> str:
    """The recovery key inside an escrow file from a node's ESP.

    Raises:
        ImageError: the blob is not for this key, or does not hold a recovery key.
    """
    try:
        plain = private_key.decrypt(blob, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                       algorithm=hashes.SHA256(), label=None))
    except ValueError:
        raise ImageError("recovery key escrow: does not decrypt with this key "
                         "(another site key, or a damaged file)") from None
    text = plain.decode("ascii", errors="replace").strip()
    if not RECOVERY_KEY.fullmatch(text):
        raise ImageError("recovery key escrow: decrypts, but holds no recovery key")
    return text


def open_escrow(private_key: rsa.RSAPrivateKey, blob: bytes, where: str) -> str:
    """:func:`decrypt_escrow` after checking the size: an escrow for this key is exactly the
    modulus long (RSA-OAEP). ``where`` names the blob's origin in errors.

    Raises:
        ImageError: the wrong size, not for this key, or no recovery key inside.
    """
    size = private_key.key_size // 8
    if len(blob) != size:
        raise ImageError(f"recovery key escrow {where}: "
                         f"{'more than' if len(blob) > size else 'only'} {min(len(blob), size)} bytes; "
                         f"an escrow for this {private_key.key_size}-bit key is exactly {size}")
    try:
        return decrypt_escrow(private_key, blob)
    except ImageError as exc:
        raise ImageError(f"{where}: {exc}") from None
