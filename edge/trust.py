"""Deciding whether to trust a model: the manifest's Ed25519 signature, then the file's size and sha256.

The signature is detached: ``manifest.json.sig`` holds the 64 bytes of an
Ed25519 signature over the exact bytes of ``manifest.json`` as served. A
device checks those bytes as they arrived, before it parses them, with any
Ed25519 library (java.security or Tink on Android, CryptoKit on iOS): there
is no canonical form to rebuild. It then checks the downloaded file against
the manifest's sha256 and size (:func:`verify_file`), so one trusted key
vouches for every byte it runs. The daemon signs with ``daemon/registry/signing.py``
and checks with this very module.

>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> private = Ed25519PrivateKey.generate()
>>> document = b'{"schema": 2, "labels": ["healthy", "rust"]}'
>>> verify_document(document, private.sign(document), private.public_key())
>>> verify_document(document.replace(b"rust", b"blight"), private.sign(document), private.public_key())
Traceback (most recent call last):
...
edge.trust.SignatureError: manifest.json.sig does not match manifest.json: the manifest was changed after signing, or signed by another key
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_BYTES = 64
SIGNATURE_SUFFIX = ".sig"  # manifest.json.sig beside manifest.json, latest.sig beside latest
MODEL_FILE = "model.tflite"


class SignatureError(Exception):
    """A manifest or model file failed verification; the message says which check failed."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(key: Ed25519PublicKey | bytes | str | Path) -> Ed25519PublicKey:
    """A public key from a key object, PEM bytes or text, or the path of a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
        key = key.encode("ascii")
    if isinstance(key, (str, Path)):
        path = Path(key)
        try:
            key = path.read_bytes()
        except OSError as err:
            raise SignatureError(f"{path}: cannot read the public key: {err.strerror}") from None
    try:
        loaded = serialization.load_pem_public_key(key)
    except ValueError as err:
        raise SignatureError(f"not a PEM public key ({err}); pass the publisher's signing.pub") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(f"the public key is a {type(loaded).__name__}, not Ed25519")
    return loaded


def verify_document(document: bytes, signature: bytes, public_key: Ed25519PublicKey | bytes | str | Path) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``public_key``'s Ed25519 signature of ``document``.

    ``document`` is manifest.json exactly as served, ``signature`` manifest.json.sig's 64 bytes.
    """
    key = load_public_key(public_key)
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
        size = len(signature) if isinstance(signature, (bytes, bytearray)) else type(signature).__name__
        raise SignatureError(
            f"manifest.json.sig is {size} bytes, an Ed25519 signature is {SIGNATURE_BYTES}: "
            "the server sent something else, or the file is damaged"
        )
    try:
        key.verify(bytes(signature), bytes(document))
    except InvalidSignature:
        named = _named_key(document)
        if named is not None and named != key_id(key):
            raise SignatureError(
                f"manifest.json names signing key {named}, but the public key given is {key_id(key)}: "
                "the publisher's key changed, get its current signing.pub (or the manifest is forged)"
            ) from None
        raise SignatureError(
            "manifest.json.sig does not match manifest.json: the manifest was changed after signing, "
            "or signed by another key"
        ) from None


def _named_key(document: bytes) -> str | None:
    """The ``signing_key_id`` an unverified manifest claims, only to explain a failed check better."""
    try:
        named = json.loads(document).get("signing_key_id")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return named if isinstance(named, str) else None


def expected_file(manifest: dict[str, Any]) -> tuple[int, str]:
    """(size, sha256 hex) that the manifest names for model.tflite, or :class:`SignatureError`."""
    try:
        entry = manifest["files"][MODEL_FILE]
        size, digest = int(entry["size"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError):
        raise SignatureError("manifest has no files.model.tflite with sha256 and size") from None
    return size, digest


def check_digest(manifest: dict[str, Any], size: int, digest: str) -> None:
    """Raise :class:`SignatureError` unless a file of ``size`` bytes and sha256 ``digest`` is the manifest's.

    For callers that hash while streaming (a download, a file on disk) instead of holding the bytes.
    """
    want_size, want_digest = expected_file(manifest)
    if size != want_size:
        raise SignatureError(f"model.tflite is {size} bytes, the manifest says {want_size}: download it again")
    if digest != want_digest:
        raise SignatureError(f"model.tflite has sha256 {digest}, the manifest says {want_digest}: download it again")


def verify_file(manifest: dict[str, Any], model_bytes: bytes) -> None:
    """Raise :class:`SignatureError` unless ``model_bytes`` has the size and sha256 the manifest names."""
    expected_file(manifest)  # a manifest without the entry is the first thing to report
    check_digest(manifest, len(model_bytes), hashlib.sha256(model_bytes).hexdigest())


def file_sha256(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of the file at ``path``, read in chunks: models can be larger than a phone likes to hold twice."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()
