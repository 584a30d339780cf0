"""Export: the learner's classifier as a .tflite that phones run, converted with litert-torch and verified.

The exported graph is the whole classifier: normalisation, backbone, head and
softmax, with NHWC input of plain RGB pixels (0-255), so an app cannot get
preprocessing wrong. Modes (litert-torch 0.10.0; measured facts in
../shared/notes/export-probe.md and docs/quantization.md):

- ``none``: float32 in and out.
- ``int8``: full-integer, PT2E static quantisation, symmetric per-channel,
  calibrated one image at a time (PT2E's export guard requires batch 1) on a
  class-balanced sample of stored examples. The input is int8 with the scale
  and zero point stored in the model (scale ~1, zero point -128: the pixel
  minus 128); the output stays float32.

Every candidate is run on the target interpreter before anyone may publish
it: top-1 on the holdout, agreement with the float PyTorch model, latency,
and whether any output is NaN.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.zoo import Preprocessing

MODES = ("none", "int8")


class ExportError(Exception):
    """Conversion failed; the message says which mode and why."""


class Deployable(nn.Module):
    """Pixels 0-255 in (NCHW here; the converter makes the graph's input NHWC), class probabilities out."""

    def __init__(self, backbone: nn.Module, head: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.backbone = backbone
        self.head = head
        std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
        mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add, which the converter folds into the graph.
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", mean / std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.backbone(pixels * self.scale - self.shift)), dim=1)


def snapshot(backbone: nn.Module, head: nn.Module, preprocessing: Preprocessing) -> Deployable:
    """A frozen copy on the CPU: training goes on while the copy converts."""
    model = Deployable(copy.deepcopy(backbone).cpu(), copy.deepcopy(head).cpu(), preprocessing).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def convert(model: Deployable, mode: str, input_size: int, calibration: Sequence[np.ndarray] = ()) -> bytes:
    """The .tflite bytes of ``model`` in ``mode``; ``calibration``: uint8 (H, W, 3) images, required for int8."""
    # litert-torch draws progress bars on stdout: noise in a daemon's journal, and it would
    # corrupt `sprout export`'s JSON output. An explicit setting by the operator wins.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import litert_torch  # heavy (~2 s): only where exports happen

    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}: choose one of {', '.join(MODES)}")
    nhwc = litert_torch.to_channel_last_io(model, args=[0]).eval()
    sample = (torch.zeros(1, input_size, input_size, 3),)
    if mode == "none":
        edge = litert_torch.convert(nhwc, sample)
    else:
        if not calibration:
            raise ExportError("int8 export needs calibration images: none were given (is the store empty?)")
        edge = _convert_int8(litert_torch, nhwc, sample, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        edge.export(str(path))
        return path.read_bytes()


def _convert_int8(litert_torch, nhwc: nn.Module, sample: tuple[torch.Tensor], calibration: Sequence[np.ndarray]):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(nhwc, sample).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None])
    quantized = convert_pt2e(prepared, fold_quantize=False)
    return litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))


@torch.no_grad()
def float_probabilities(model: Deployable, images: np.ndarray) -> np.ndarray:
    """The PyTorch model's output on uint8 (N, H, W, 3) images: the reference every runtime is held to."""
    out = []
    for start in range(0, len(images), 64):
        x = torch.from_numpy(images[start : start + 64].astype(np.float32)).permute(0, 3, 1, 2)
        out.append(model(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class RuntimeReport:
    runtime: str
    version: str
    top1: float | None  # on the labelled images given; None without labels
    agreement: float  # share of images where top-1 equals the float model's
    latency_ms: float  # median per image, batch 1
    nonfinite: bool  # any NaN or infinity in any output
    input_dtype: str
    input_scale: float | None
    input_zero_point: int | None


def run_litert(tflite: bytes, images: np.ndarray, threads: int = 2) -> tuple[np.ndarray, list[float], dict]:
    """Outputs of ai-edge-litert's interpreter for uint8 (N, H, W, 3) images, one at a time, and latencies."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite, num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    outputs, latencies = [], []
    for image in images:
        interpreter.set_tensor(inp["index"], to_input(image[None], inp))
        started = time.perf_counter()
        interpreter.invoke()
        latencies.append((time.perf_counter() - started) * 1000)
        outputs.append(dequantize(interpreter.get_tensor(out["index"]), out)[0])
    return np.stack(outputs) if outputs else np.zeros((0, 0)), latencies, inp


def to_input(pixels: np.ndarray, detail: dict) -> np.ndarray:
    """uint8 RGB pixels as the model's input tensor wants them (float32, or quantised with its scale/zero point)."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return pixels.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(pixels.astype(np.float32) / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]) == np.float32:
        return values
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale


def verify_litert(tflite: bytes, images: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> RuntimeReport:
    """Run the candidate on ai-edge-litert and compare it with the float model's ``reference`` probabilities."""
    import ai_edge_litert

    outputs, latencies, inp = run_litert(tflite, images)
    predicted = outputs.argmax(1)
    scale, zero_point = inp["quantization"]
    quantised = np.dtype(inp["dtype"]) != np.float32
    return RuntimeReport(
        runtime="ai-edge-litert",
        version=getattr(ai_edge_litert, "__version__", "unknown"),
        top1=float((predicted == labels).mean()) if labels is not None and len(labels) else None,
        agreement=float((predicted == reference.argmax(1)).mean()) if len(reference) else 0.0,
        latency_ms=float(np.median(latencies)) if latencies else 0.0,
        nonfinite=bool(not np.all(np.isfinite(outputs))),
        input_dtype=np.dtype(inp["dtype"]).name,
        input_scale=float(scale) if quantised else None,
        input_zero_point=int(zero_point) if quantised else None,
    )
