"""Client keys: make one, load one, show it the way OpenSSH does."""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.ssh.keys import BadKeyError, EncryptedKeyError, Key

from txvmbot.errors import SSHError

KeyKind = Literal["ed25519", "rsa"]


def generate_key(kind: KeyKind = "ed25519") -> Key:
    """A fresh private key: ed25519 (default) or rsa-3072."""
    if kind == "ed25519":
        return Key(ed25519.Ed25519PrivateKey.generate())
    if kind == "rsa":
        return Key(rsa.generate_private_key(public_exponent=65537, key_size=3072))
    raise ValueError(f"key kind must be 'ed25519' or 'rsa', not {kind!r}")


def load_private_key(path: str, passphrase: bytes | None = None) -> Key:
    """Load a private key file (OpenSSH or PEM format).

    Raises SSHError naming ``path`` when the file is missing or unreadable,
    is not a key, is a public key, or is encrypted and no (or the wrong)
    passphrase was given.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SSHError(f"ssh key {path}: cannot read it: {e.strerror or e}") from e
    try:
        key = Key.fromString(data, passphrase=passphrase)
    except EncryptedKeyError as e:
        raise SSHError(
            f"ssh key {path}: it is encrypted and no passphrase was given; "
            "pass the passphrase or use an unencrypted key"
        ) from e
    except (BadKeyError, ValueError, TypeError) as e:
        hint = " (wrong passphrase?)" if passphrase is not None else ""
        raise SSHError(f"ssh key {path}: not a usable private key{hint}: {e}") from e
    if key.isPublic():
        raise SSHError(f"ssh key {path}: this is a public key; give the private key file")
    return key


def public_openssh(key: Key) -> str:
    """The key's authorized_keys line, e.g. ``ssh-ed25519 AAAA...``."""
    line = key.public().toString("openssh")
    assert isinstance(line, bytes)
    return line.decode("ascii").strip()


def fingerprint_sha256(key: Key) -> str:
    """OpenSSH's fingerprint of a key: ``SHA256:`` and unpadded base64."""
    digest = hashlib.sha256(key.public().blob()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_type(key: Key) -> str:
    """The ssh name of the key's type, e.g. ``ssh-ed25519``."""
    return key.sshType().decode("ascii")
