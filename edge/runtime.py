"""Running a Sprout .tflite the way a device does, on either interpreter a device may have.

A device has ai-edge-litert (LiteRT, the successor) or tflite-runtime (older
installs; 2.14 needs numpy<2). Both expose the same ``Interpreter``. The model
takes one NHWC RGB image of 0-255 pixels, as float32 or as a quantised
integer tensor whose scale and zero point the model stores, and returns class
probabilities (float32, or quantised likewise). The exporter verifies every
candidate through this very code, in-process for ai-edge-litert and through
``edge/probe.py`` in tflite-runtime's own virtualenv, so what was checked is
what a device runs. Needs only numpy and an interpreter: never torch.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import numpy as np

# Runtime name (as in settings, manifests and reports) -> the module holding its Interpreter.
RUNTIMES = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}


class RuntimeUnavailable(Exception):
    """The named interpreter is not installed here; the message says how to get it."""


def interpreter_class(runtime: str):
    """(Interpreter class, package version) of ``runtime``."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    package = RUNTIMES[runtime]
    try:
        module = importlib.import_module(f"{package}.interpreter")
        version = getattr(importlib.import_module(package), "__version__", "unknown")
    except ImportError as e:
        raise RuntimeUnavailable(f"{runtime} is not installed in this Python ({e}); pip install {runtime}") from e
    return module.Interpreter, version


def to_input(pixels: np.ndarray, detail: dict) -> np.ndarray:
    """uint8 RGB pixels as the input tensor wants them: float32 0-255, or quantised with its scale and zero point."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return pixels.astype(np.float32)
    scale, zero_point = detail["quantization"]
    if scale == 0:  # an integer tensor that is not quantised: the raw pixels
        return pixels.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(pixels.astype(np.float32) / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """The output tensor as float32 probabilities."""
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]) == np.float32 or scale == 0:
        return values.astype(np.float32)
    return (values.astype(np.float32) - zero_point) * scale


@dataclass(frozen=True)
class Run:
    runtime: str
    version: str
    probabilities: np.ndarray  # (N, classes) float32
    latencies_ms: np.ndarray  # (N,) one invoke each, batch 1
    input_dtype: str
    input_scale: float | None  # None for float32 input
    input_zero_point: int | None


def classify(tflite: bytes, images: np.ndarray, runtime: str = "ai-edge-litert", threads: int = 2) -> Run:
    """Probabilities of a Sprout model for uint8 (N, H, W, 3) images, one invoke per image, with latencies."""
    interpreter_cls, version = interpreter_class(runtime)
    interpreter = interpreter_cls(model_content=tflite, num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    expected = tuple(int(d) for d in inp["shape"][1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images of shape {tuple(images.shape)} do not fit the model's input (N, {expected})")
    probabilities, latencies = [], []
    for image in images:
        interpreter.set_tensor(inp["index"], to_input(image[None], inp))
        started = time.perf_counter()
        interpreter.invoke()
        latencies.append((time.perf_counter() - started) * 1000)
        probabilities.append(dequantize(interpreter.get_tensor(out["index"]), out)[0])
    scale, zero_point = inp["quantization"]
    quantised = scale != 0
    return Run(
        runtime=runtime,
        version=version,
        probabilities=np.stack(probabilities).astype(np.float32) if probabilities else np.zeros((0, 0), np.float32),
        latencies_ms=np.array(latencies, dtype=np.float64),
        input_dtype=np.dtype(inp["dtype"]).name,
        input_scale=float(scale) if quantised else None,
        input_zero_point=int(zero_point) if quantised else None,
    )
