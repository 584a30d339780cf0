"""What the tests publish into a registry (a manifest's fields as the export pipeline hands them over), and what
they read back from one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.registry.signing import Signer
    from daemon.registry.versions import Registry


def fields(labels: list[str] | None = None, **changes: Any) -> dict[str, Any]:
    """A valid version's fields for ``Registry.publish`` (an int8 tiny model), with ``changes`` applied."""
    out = {
        "base": "tiny",
        "labels": labels or ["healthy", "rust", "blight"],
        "input": {"shape": [1, 96, 96, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
        "quantization": "int8",
        "metrics": {
            "holdout_top1_float": 0.91,
            "holdout_top1": {"ai-edge-litert": 0.9, "tflite-runtime": 0.9},
            "holdout_examples": 200,
            "examples_trained": 1800,
            "high_water_mark": 2000,
        },
        "runtimes_verified": [
            {"name": "ai-edge-litert", "version": "2.3.0"},
            {"name": "tflite-runtime", "version": "2.14.0"},
        ],
    }
    out.update(changes)
    return out


def latest_manifest(registry: Registry) -> dict[str, Any]:
    """The registry's latest manifest; the test fails here if nothing is published."""
    manifest = registry.latest()
    assert manifest is not None, f"{registry.folder}: no published version"
    return manifest


def public_key_file(signer: Signer) -> Path:
    """The public half of a signing key loaded from a file: ``<key>.pub`` beside it."""
    assert signer.path is not None, "this signer was made from a key in memory, not loaded from a file"
    return signer.path.with_suffix(".pub")


def registry_signer(registry: Registry) -> Signer:
    """The key a writable registry signs with (a read-only one has none)."""
    assert registry.signer is not None, f"{registry.folder}: opened read-only, no signing key"
    return registry.signer
