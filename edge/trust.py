"""Deciding whether to trust a model: the manifest's Ed25519 signature, then the file's size and sha256.

The signature covers :func:`canonical`: the manifest without its ``signature``
field, as sorted, compact, UTF-8 JSON. A device re-serialises the parsed
manifest the same way and checks the signature with the publisher's public
key, then checks the downloaded file against the manifest's sha256 and size
(:func:`verify_file`), so one trusted key vouches for every byte it runs.
The daemon signs with the very same :func:`canonical` (``daemon/signing.py``
imports it from here), so signer and verifier cannot drift apart.

>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> import base64
>>> private = Ed25519PrivateKey.generate()
>>> manifest = {"schema": 1, "labels": ["healthy", "rust"]}
>>> manifest["signature"] = {"alg": "ed25519", "key_id": key_id(private.public_key()),
...                          "value": base64.b64encode(private.sign(canonical(manifest))).decode()}
>>> verify_manifest(manifest, private.public_key())
>>> manifest["labels"][1] = "blight"
>>> verify_manifest(manifest, private.public_key())
Traceback (most recent call last):
...
edge.trust.SignatureError: signature does not match the manifest: it was changed after signing, or signed by another key
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALG = "ed25519"
MODEL_FILE = "model.tflite"


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


def verify_manifest(manifest: dict[str, Any], public_key: Ed25519PublicKey | bytes | str | Path) -> None:
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
