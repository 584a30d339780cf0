"""Ed25519 signatures over model manifests, with the ``cryptography`` package.

The signature covers :func:`canonical`: the manifest without its ``signature``
field, as sorted, compact, UTF-8 JSON. A device re-serialises the parsed
manifest the same way and checks the signature with the publisher's public
key, then checks the downloaded file against the manifest's sha256 and size
(:func:`verify_file`), so one trusted key vouches for every byte it runs.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> private, public = generate(d)
>>> signed = Signer.load(private).sign({"schema": 1, "labels": ["healthy", "rust"]})
>>> verify(signed, public)
>>> signed["labels"][1] = "blight"
>>> verify(signed, public)
Traceback (most recent call last):
...
daemon.signing.SignatureError: signature does not match the manifest: it was changed after signing, or signed by another key
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.atomic import fsync_dir, temporary_name, write_atomic, write_new

ALG = "ed25519"
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SigningKeyError(Exception):
    """The signing key cannot be created or used; the message names the file and the fix."""


class SignatureError(Exception):
    """A manifest or model file failed verification; the message says which check failed."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: the manifest minus ``signature``, sorted compact UTF-8 JSON."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    # allow_nan=False: NaN is not JSON, and a verifier in another language could not reproduce it.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


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
        raise SigningKeyError(f"{private_path}: created by another process just now; refusing to overwrite it") from None
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
            raise SigningKeyError(f"{path}: a {type(key).__name__}, not an Ed25519 key; create one with `sprout keygen`")
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

    def sign(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``manifest`` with ``signature`` set (any previous signature is replaced)."""
        value = self._key.sign(canonical(manifest))
        signed = {k: v for k, v in manifest.items() if k != "signature"}
        signed["signature"] = {"alg": ALG, "key_id": self.key_id, "value": base64.b64encode(value).decode("ascii")}
        return signed


def load_public_key(key: Ed25519PublicKey | bytes | str | Path) -> Ed25519PublicKey:
    """A public key from a key object, PEM bytes or text, or the path of a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
        key = key.encode("ascii")
    if isinstance(key, (str, Path)):
        try:
            key = Path(key).read_bytes()
        except OSError as err:
            raise SignatureError(f"{key}: cannot read the public key: {err.strerror}") from None
    try:
        loaded = serialization.load_pem_public_key(key)
    except ValueError as err:
        raise SignatureError(f"not a PEM public key ({err}); pass the publisher's signing.pub") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(f"the public key is a {type(loaded).__name__}, not Ed25519")
    return loaded


def verify(manifest: dict[str, Any], public_key: Ed25519PublicKey | bytes | str | Path) -> None:
    """Raise :class:`SignatureError` unless ``manifest`` carries a valid signature by ``public_key``."""
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or "value" not in sig:
        raise SignatureError("manifest has no signature: refuse it (it did not come from a Sprout registry)")
    if sig.get("alg") != ALG:
        raise SignatureError(f"unknown signature algorithm {sig.get('alg')!r}; this verifier knows {ALG!r}")
    key = load_public_key(public_key)
    expected = key_id(key)
    if sig.get("key_id") != expected:
        raise SignatureError(
            f"manifest was signed by key {sig.get('key_id')!r}, but the public key given is {expected!r}: "
            "get the publisher's current signing.pub"
        )
    try:
        value = base64.b64decode(sig["value"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise SignatureError("signature value is not valid base64: the manifest is damaged") from None
    try:
        body = canonical(manifest)
    except ValueError as err:  # NaN or a non-JSON value: nothing Sprout signs looks like that
        raise SignatureError(f"manifest is not canonical JSON ({err})") from None
    try:
        key.verify(value, body)
    except InvalidSignature:
        raise SignatureError(
            "signature does not match the manifest: it was changed after signing, or signed by another key"
        ) from None


def verify_file(manifest: dict[str, Any], model_bytes: bytes) -> None:
    """Raise :class:`SignatureError` unless ``model_bytes`` has the size and sha256 the manifest names."""
    try:
        entry = manifest["files"]["model.tflite"]
        size, digest = int(entry["size"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError):
        raise SignatureError("manifest has no files.model.tflite with sha256 and size") from None
    if len(model_bytes) != size:
        raise SignatureError(f"model.tflite is {len(model_bytes)} bytes, the manifest says {size}: download it again")
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != digest:
        raise SignatureError(f"model.tflite has sha256 {actual}, the manifest says {digest}: download it again")


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
