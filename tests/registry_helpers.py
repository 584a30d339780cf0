"""What the tests publish into a registry: a manifest's fields as the export pipeline hands them over."""

from __future__ import annotations

from typing import Any


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
