"""Signing model manifests with Ed25519 (the ``cryptography`` package): keys, and the signer.

The registry signs the exact bytes of each ``manifest.json`` it writes and
keeps the 64-byte signature beside it as ``manifest.json.sig`` (detached):
devices check the bytes as served with their platform's Ed25519, no
canonical JSON involved. Checking is the device's job and lives in
``edge/trust.py``; the daemon uses that same code, re-exported here.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> private, public = generate(d)
>>> document = b'{"schema": 2, "labels": ["healthy", "rust"]}'
>>> signature = Signer.load(private).sign(document)
>>> verify(document, signature, public)
>>> verify(document.replace(b"rust", b"blight"), signature, public)
Traceback (most recent call last):
...
edge.trust.SignatureError: manifest.json.sig does not match manifest.json: the manifest was changed after signing, or signed by another key
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.atomic import fsync_dir, temporary_name, write_atomic, write_new

# Verification lives in edge/trust.py, the one implementation devices and the daemon share: what a
# phone checks is byte for byte what was signed here. Re-exported so daemon code keeps one import.
from edge.trust import SIGNATURE_SUFFIX, SignatureError, key_id, load_public_key, verify_file
from edge.trust import verify_document as verify

__all__ = [
    "PRIVATE_NAME", "PUBLIC_NAME", "SIGNATURE_SUFFIX", "SignatureError", "Signer", "SigningKeyError",
    "generate", "key_id", "load_public_key", "raw_public_key", "verify", "verify_file",
]  # fmt: skip

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SigningKeyError(Exception):
    """The signing key cannot be created or used; the message names the file and the fix."""


def generate(out_dir: Path) -> tuple[Path, Path]:
    """Write a new key pair ``signing.key`` (PKCS8 PEM, 0600) and ``signing.pub`` into ``out_dir``.

    Refuses to overwrite: replacing a key makes every device that trusts the old one reject new models.
    """
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(
                f"{path}: already exists; refusing to overwrite a signing key (devices trust it). "
                "Choose another --out folder, or move the old pair away first."
            )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        _create_pair(private_path, public_path)
    except FileExistsError:
        raise SigningKeyError(
            f"{private_path}: created by another process just now; refusing to overwrite it"
        ) from None
    return private_path, public_path


class Signer:
    """Signs manifests with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None):
        self._key = private_key
        self.path = path
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Read an unencrypted PKCS8 PEM Ed25519 key that only its owner can read."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SigningKeyError(f"{path}: no such signing key; create one with `sprout keygen --out DIR`") from None
        except OSError as err:
            raise SigningKeyError(f"{path}: cannot read the signing key: {err.strerror}") from None
        # fstat on the open file, not stat on the name, so the checks are about the bytes we read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SigningKeyError(f"{path}: not a file; point signing.key_file at the PEM key file")
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise SigningKeyError(
                    f"{path}: signing key is accessible by group or others (mode {mode:04o}); "
                    f"anyone who reads it can sign models. Run: chmod 600 {path}"
                )
            try:
                data = f.read()
            except OSError as err:
                raise SigningKeyError(f"{path}: cannot read the signing key: {err.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise SigningKeyError(
                f"{path}: the key is encrypted; Sprout needs an unencrypted PKCS8 key protected by mode 0600"
            ) from None
        except ValueError as err:
            raise SigningKeyError(f"{path}: not a PEM private key ({err}); create one with `sprout keygen`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(
                f"{path}: a {type(key).__name__}, not an Ed25519 key; create one with `sprout keygen`"
            )
        return cls(key, path)

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load ``path``; when missing, create it (0600, parent folder 0700) and its ``.pub`` beside it."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                _create_pair(path, path.with_suffix(".pub"))
            except FileExistsError:
                pass  # another process created it first: use theirs
        return cls.load(path)

    def public_pem(self) -> bytes:
        return _public_pem(self.public_key)

    def sign(self, document: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``document``, the exact bytes that will be served."""
        return self._key.sign(bytes(document))


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The key's 32 raw bytes: what CryptoKit and Tink take (signing.pub is those bytes in a PEM wrapper)."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _create_pair(private_path: Path, public_path: Path) -> None:
    """Create the private key without ever overwriting one; raises FileExistsError if one appeared."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = temporary_name(private_path)
    tmp.unlink(missing_ok=True)  # O_EXCL below: a leftover from a killed run must not keep its old mode
    # Created 0600 from the start: a chmod afterwards would leave a window where others can read it.
    try:
        write_new(tmp, pem, 0o600)
        # link, not rename: it fails when the name exists, so two creators cannot overwrite each other.
        os.link(tmp, private_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(public_path, _public_pem(key.public_key()), 0o644)
    fsync_dir(private_path.parent)
