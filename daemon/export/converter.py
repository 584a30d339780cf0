"""Export: the learner's classifier as a .tflite that phones run, converted with litert-torch.

The exported graph is the whole classifier: normalisation, backbone, head and
softmax, with NHWC input of plain RGB pixels (0-255), so an app cannot get
preprocessing wrong. Modes (litert-torch 0.10.0; what was measured and why in
docs/quantization.md):

Every mode takes uint8 pixels (NHWC), cast to float inside the graph: an app
keeps one input buffer whatever mode a version was published in.

- ``none``: float32 weights and compute.
- ``fp16``: float16 weights (half the file), float32 compute after loading:
  ai-edge-quantizer's float-casting recipe over the float model.
- ``dynamic``: int8 weights, activations quantised on the fly (PT2E dynamic,
  per-channel). Loads on ai-edge-litert only: tflite-runtime 2.14 has no
  FULLY_CONNECTED version 12, and verification rejects it there.
- ``int8``: full-integer, PT2E static, symmetric per-channel weights, min-max
  activation ranges calibrated one image at a time (PT2E's export guard
  requires batch 1) on a class-balanced sample of stored examples (scale and
  zero point of the first quantised tensor are the model's business, not the
  app's); the output is float32.

Verification on each target interpreter is daemon/export/verification.py's job.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.manifest import Quantization
from models.zoo import Preprocessing

MODES = tuple(q.value for q in Quantization)


def input_dtype(mode: str) -> str:
    """What the app feeds a model of any mode: uint8 RGB pixels, cast inside the graph.

    One input type for every mode: exports fall back from int8 to fp16 when a gate refuses int8, and
    an app that fills a byte buffer must not break on such an ordinary update.
    """
    return "uint8"


class ExportError(Exception):
    """Conversion failed; the message says which mode and why."""


class Deployable(nn.Module):
    """Pixels 0-255 in (NCHW here; the converter makes the graph's input NHWC), class probabilities out."""

    scale: torch.Tensor  # buffers, registered in __init__
    shift: torch.Tensor

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


class _Uint8Pixels(nn.Module):
    """uint8 input, cast to float inside the graph: every mode takes the pixels an app has."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.to(torch.float32))


_conversions_run = 0  # in this process; an export process that converted ends after its export (child.py)


def conversions_run() -> int:
    """Full conversions begun in this process: litert-torch keeps memory after each."""
    return _conversions_run


def convert(model: Deployable, mode: str, input_size: int, calibration: Sequence[np.ndarray] = ()) -> bytes:
    """The .tflite bytes of ``model`` in ``mode``; ``calibration``: uint8 (H, W, 3) images, required for int8.

    torch.export changes process-wide state while it traces (``torch.compiler.is_exporting()`` turns true
    in every thread): a learner stepping beside it in the same process died with KeyError: 'custom'. The
    daemon therefore converts in a process of its own (daemon/export/child.py).
    """
    global _conversions_run
    _conversions_run += 1
    # litert-torch draws progress bars on stdout: noise in a daemon's journal, and it would
    # corrupt `sprout export`'s JSON output. An explicit setting by the operator wins.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import litert_torch  # heavy (~2 s): only where exports happen

    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}: choose one of {', '.join(MODES)}")
    nhwc = litert_torch.to_channel_last_io(_Uint8Pixels(model), args=[0]).eval()
    sample = (torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8),)
    if mode == "int8":
        if not calibration:
            raise ExportError("int8 export needs calibration images: none were given (is the store empty?)")
        edge = _convert_int8(litert_torch, nhwc, sample, calibration)
    else:
        if mode == "dynamic":
            edge = _convert_dynamic(litert_torch, nhwc, sample)
        else:
            edge = litert_torch.convert(nhwc, sample)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        edge.export(str(path))
        flat = path.read_bytes()
    return _fp16_weights(flat) if mode == "fp16" else flat


def int8_config():
    """The PT2E quantization config of int8 exports; head_patch.py quantises a new head with its observers."""
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.observer import MinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=True)
    # Min-max activation ranges instead of the default histogram search: on EfficientNet-Lite0 they lost
    # less top-1 and calibrate ~4x faster (docs/quantization.md). The clamped ReLU6 bounds most of them.
    minmax = dataclasses.replace(
        config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12)
    )
    return dataclasses.replace(config, input_activation=minmax, output_activation=minmax)


def _convert_int8(litert_torch, nhwc: nn.Module, sample: tuple[torch.Tensor], calibration: Sequence[np.ndarray]):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(int8_config())
    prepared = prepare_pt2e(torch.export.export(nhwc, sample).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(torch.from_numpy(np.array(image, dtype=np.uint8))[None])  # a writable copy, as torch wants
    quantized = convert_pt2e(prepared, fold_quantize=False)
    return litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))


def _convert_dynamic(litert_torch, nhwc: nn.Module, sample: tuple[torch.Tensor]):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    prepared = prepare_pt2e(torch.export.export(nhwc, sample).module(), quantizer)
    with torch.no_grad():
        prepared(*sample)  # dynamic observers need one pass to exist; the ranges are computed at run time
    quantized = convert_pt2e(prepared, fold_quantize=False)
    return litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))


def _fp16_weights(flat: bytes) -> bytes:
    """The float model with its weights stored as float16 (ai-edge-quantizer's float casting)."""
    import contextlib
    import io

    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    q = quantizer.Quantizer(bytearray(flat))
    q.add_weight_only_config(
        regex=".*",
        operation_name=TFLOperationName.ALL_SUPPORTED,
        num_bits=16,
        algorithm_key=AlgorithmName.FLOAT_CASTING,
    )
    # It prints a progress bar and a size summary to stdout, which is `sprout export`'s JSON channel.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return bytes(q.quantize().quantized_model)


@torch.no_grad()
def float_probabilities(model: Deployable, images: np.ndarray) -> np.ndarray:
    """The PyTorch model's output on uint8 (N, H, W, 3) images: the reference every runtime is held to."""
    out = []
    for start in range(0, len(images), 64):
        x = torch.from_numpy(images[start : start + 64].astype(np.float32)).permute(0, 3, 1, 2)
        out.append(model(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
