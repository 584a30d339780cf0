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
from collections.abc import Iterable, Iterator
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


def available(preferred: str | None = None) -> str:
    """The runtime to use: ``preferred`` when given (an error says how to install it), else the first that imports.

    ai-edge-litert first: it is the maintained successor and reads every model
    tflite-runtime reads, and more (see the dynamic mode in docs/quantization.md).
    """
    if preferred is not None:
        interpreter_class(preferred)
        return preferred
    reasons = []
    for runtime in RUNTIMES:
        try:
            interpreter_class(runtime)
        except RuntimeUnavailable as e:
            reasons.append(str(e))
            continue
        return runtime
    raise RuntimeUnavailable("no TFLite interpreter is installed: " + "; ".join(reasons))


class Session:
    """One model loaded on one interpreter, kept for many images (loading costs far more than one invoke).

    Not thread-safe: an Interpreter holds its tensors; give each thread its own Session.
    """

    def __init__(
        self, tflite: bytes, runtime: str = "ai-edge-litert", threads: int = 2, keep_output: int | None = None
    ):
        """``keep_output``: the position of a further output whose raw values :meth:`run` returns too (the
        exporter's verification models expose the embedding so)."""
        interpreter_cls, self.version = interpreter_class(runtime)
        self.runtime = runtime
        self._interpreter = interpreter_cls(model_content=tflite, num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        outputs = self._interpreter.get_output_details()
        self._output = outputs[0]
        self._kept = outputs[keep_output] if keep_output is not None else None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._input["shape"])

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._input["dtype"]).name

    @property
    def input_quantization(self) -> tuple[float | None, int | None]:
        """(scale, zero point) of a quantised input tensor; (None, None) for float32 or raw integers."""
        scale, zero_point = self._input["quantization"]
        return (float(scale), int(zero_point)) if scale != 0 else (None, None)

    @property
    def classes(self) -> int:
        return int(self._output["shape"][-1])

    def probabilities(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((N, classes) float32 probabilities, (N,) invoke latencies in ms) for uint8 (N, H, W, 3) images."""
        probabilities, latencies, _ = self.run(self.inputs(images))
        return probabilities, latencies

    def inputs(self, images: np.ndarray) -> Iterator[np.ndarray]:
        """Each of uint8 (N, H, W, 3) ``images`` as the input tensor takes it (without the batch axis)."""
        expected = self.input_shape[1:]
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)} do not fit the model's input (N, {expected})")
        return (to_input(image[None], self._input)[0] for image in images)

    def run(self, inputs: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(probabilities, latencies in ms, the kept output's values or None) for input tensors as the model takes
        them (one per invoke, without the batch axis)."""
        probabilities, latencies, kept = [], [], []
        for one in inputs:
            self._interpreter.set_tensor(self._input["index"], one[None])
            started = time.perf_counter()
            self._interpreter.invoke()
            latencies.append((time.perf_counter() - started) * 1000)
            probabilities.append(dequantize(self._interpreter.get_tensor(self._output["index"]), self._output)[0])
            if self._kept is not None:
                kept.append(self._interpreter.get_tensor(self._kept["index"])[0].copy())
        out = np.stack(probabilities).astype(np.float32) if probabilities else np.zeros((0, 0), np.float32)
        return out, np.array(latencies, dtype=np.float64), np.stack(kept) if kept else None


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
    session = Session(tflite, runtime, threads)
    probabilities, latencies = session.probabilities(images)
    scale, zero_point = session.input_quantization
    return Run(
        runtime=runtime,
        version=session.version,
        probabilities=probabilities,
        latencies_ms=latencies,
        input_dtype=session.input_dtype,
        input_scale=scale,
        input_zero_point=zero_point,
    )
