"""What the exporter hands ``Registry.publish``, checked whole (every problem named at once), and the manifest made of it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from daemon.registry.layout import FIELDS, MODEL_FILE, QUANTIZATIONS, SCHEMA, RegistryError, utc_now
from edge.manifest import INPUT_DTYPES, is_image_shape


def check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A JSON-clean copy of the exporter's ``fields``, or :class:`RegistryError` listing every problem."""
    if not isinstance(fields, dict):
        raise RegistryError(f"publish: fields must be a dict with {', '.join(FIELDS)}")
    missing = [k for k in FIELDS if k not in fields]
    extra = sorted(set(fields) - set(FIELDS))
    if missing or extra:
        raise RegistryError(
            f"publish: fields missing {missing}, unexpected {extra}; the exporter gives exactly {list(FIELDS)} "
            "(the registry sets schema, model, version, created_at, files and signing_key_id)"
        )
    try:
        body = json.loads(json.dumps(fields, allow_nan=False))
    except ValueError:
        raise RegistryError(
            "publish: fields contain NaN or Infinity (a metric?); the gates should reject such a model"
        ) from None
    except TypeError as err:
        raise RegistryError(f"publish: fields must be plain JSON data: {err}") from None

    problems = []
    if not isinstance(body["base"], str) or not body["base"]:
        problems.append("base must be the backbone's name")
    labels = body["labels"]
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x and not set(x) & {"\n", "\r"} for x in labels)
    ):
        problems.append("labels must be a non-empty list of class names without line breaks (index = output index)")
    elif len(set(labels)) != len(labels):
        problems.append("labels must be unique")
    problems += _input_problems(body["input"])
    if body["quantization"] not in QUANTIZATIONS:
        problems.append(f"quantization must be one of {list(QUANTIZATIONS)}, not {body['quantization']!r}")
    if not isinstance(body["metrics"], dict):
        problems.append("metrics must be an object")
    runtimes = body["runtimes_verified"]
    if (
        not isinstance(runtimes, list)
        or not runtimes
        or not all(
            isinstance(r, dict) and set(r) == {"name", "version"} and all(isinstance(v, str) and v for v in r.values())
            for r in runtimes
        )
    ):
        problems.append("runtimes_verified must list at least one {name, version} (both non-empty strings)")
    if problems:
        raise RegistryError("publish: " + "; ".join(problems))
    return body


def _input_problems(spec: Any) -> list[str]:
    wanted = {"shape", "layout", "dtype", "range"}
    if not isinstance(spec, dict) or set(spec) != wanted:
        return [f"input must be an object with exactly {sorted(wanted)}"]
    problems = []
    shape = spec["shape"]
    if not is_image_shape(shape):
        problems.append(f"input.shape must be [1, H, W, 3], not {shape!r}")
    if spec["layout"] != "NHWC":
        problems.append("input.layout must be 'NHWC'")
    if spec["dtype"] not in INPUT_DTYPES:
        problems.append(f"input.dtype must be one of {list(INPUT_DTYPES)}")
    rng = spec["range"]
    if not (
        isinstance(rng, list)
        and len(rng) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng)
        and rng[0] < rng[1]
    ):
        problems.append("input.range must be [low, high], e.g. [0, 255]")
    return problems


def manifest_of(model: str, version: int, body: dict[str, Any], tflite: bytes, key_id: str) -> dict[str, Any]:
    """The manifest of ``version``: the exporter's checked ``body`` and what the registry sets itself."""
    return {
        "schema": SCHEMA,
        "model": model,
        "version": version,
        "created_at": utc_now(),
        "base": body["base"],
        "labels": body["labels"],
        "input": body["input"],
        "quantization": body["quantization"],
        "files": {
            MODEL_FILE: {
                "sha256": hashlib.sha256(tflite).hexdigest(),
                "size": len(tflite),
                "path": f"versions/{version}/{MODEL_FILE}",
            }
        },
        "metrics": body["metrics"],
        "runtimes_verified": body["runtimes_verified"],
        # Informative only: which key to check with, said before a device has checked anything.
        "signing_key_id": key_id,
    }
