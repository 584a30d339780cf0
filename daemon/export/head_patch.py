"""A new classifier head written into an earlier conversion's .tflite: an export that converts nothing else.

In head mode (the default on a CPU) the backbone never changes: a full
conversion traces, lowers and (int8) calibrates the same frozen network at
every export to change a head of ``embedding_size x classes`` weights. The
converter ends every mode's graph the same way (litert-torch 0.10.0)::

    embedding -> FULLY_CONNECTED(weights, bias) [-> DEQUANTIZE] -> SOFTMAX -> output

with the weights a constant (int8 per channel in int8 and dynamic, float16
behind a DEQUANTIZE in fp16, float32 in none) and the bias a constant (int32
at scale input x weight in int8, float32 otherwise), or no bias at all where
it was all zeros. :func:`patch_head` rewrites those constants, their
quantization parameters and the classifier's output range (int8), and the
class count in every shape from the weights to the output: a grown head is
a normal model file. The tensors' own library does the work, the TFLite
schema's object API (ai-edge-litert's generated schema, with ``flatbuffers``).

int8 parameters come from the very observers a full conversion uses
(converter.int8_config): per-channel symmetric min-max weights, and the
logits' min-max range over the calibration images' logits, computed from the
float model as PT2E's calibration computes them. So a patched file and a
full conversion of the same network with the same calibration images hold
the same numbers (tests/test_head_patch.py).

A file that does not end as above, or whose embedding size differs, is a
:class:`PatchUnsupported`: the caller converts in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INT8_MODES = ("int8", "dynamic")  # weights stored int8 per channel


class PatchUnsupported(Exception):
    """The base file's graph does not end in the converter's classifier; a full conversion is needed."""


@dataclass(frozen=True)
class Head:
    """The float classifier to write: weights (classes, embedding_size), bias (classes,), and for int8 the logits
    of the calibration images (N, classes), whose range sets the classifier's output scale, and their float
    embeddings (N, embedding_size), which int8's bias correction compares with the int8 backbone's."""

    weight: np.ndarray
    bias: np.ndarray
    calibration_logits: np.ndarray | None = None
    calibration_embeddings: np.ndarray | None = None

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])


def patch_head(base: bytes, head: Head, mode: str) -> bytes:
    """``base`` (a conversion in ``mode``, without metadata) with ``head`` in place of its classifier."""
    from ai_edge_litert import schema_py_generated as schema

    from daemon.export.flatbuffer import read_model, write_model

    model = read_model(base)
    graph = model.subgraphs[0]
    fc = _classifier(model, graph, schema)
    inputs = list(fc.inputs) + [-1] * (3 - len(fc.inputs))
    embedding, weights, bias = inputs[0], inputs[1], inputs[2]
    weight_tensor = graph.tensors[weights]
    dequantized = _producer(graph, weights)
    if dequantized is not None:  # fp16: a DEQUANTIZE of the float16 constant feeds the classifier
        stored = graph.tensors[dequantized.inputs[0]]
    else:
        stored = weight_tensor
    if list(stored.shape)[1:] != [head.weight.shape[1]]:
        raise PatchUnsupported(
            f"the base's classifier takes {list(stored.shape)[1:]} embeddings, the head {head.weight.shape[1]}"
        )
    int8 = stored.type == schema.TensorType.INT8
    if int8 and mode not in INT8_MODES:
        raise PatchUnsupported(f"the base's classifier weights are int8, not what a {mode} conversion stores")
    weight_scale = None
    if int8:
        weight_scale, weight_q = _quantize_weights(head.weight)
        _set(model, stored, weight_q.astype(np.int8), scale=weight_scale)
    elif stored.type == schema.TensorType.FLOAT16:
        _set(model, stored, head.weight.astype(np.float16))
    elif stored.type == schema.TensorType.FLOAT32:
        _set(model, stored, head.weight.astype(np.float32))
    else:
        raise PatchUnsupported(f"the base's classifier weights are of TFLite type {stored.type}")
    output = graph.tensors[fc.outputs[0]]
    quantized_output = output.type == schema.TensorType.INT8
    if bias < 0:
        bias = _new_tensor(model, graph, schema, quantized_output)
        fc.inputs = [embedding, weights, bias]
    bias_tensor = graph.tensors[bias]
    if quantized_output:  # full-integer: int32 bias at scale input x weight, and the logits' own range
        if weight_scale is None or head.calibration_logits is None:
            raise PatchUnsupported("an int8 classifier needs int8 weights and the calibration images' logits")
        input_scale = float(np.asarray(graph.tensors[embedding].quantization.scale)[0])
        bias_scale = (np.float32(input_scale) * weight_scale).astype(np.float32)
        _set(model, bias_tensor, _quantize_bias(head.bias, bias_scale), scale=bias_scale)
        scale, zero_point = _output_range(head.calibration_logits)
        output.quantization.scale, output.quantization.zeroPoint = [scale], [zero_point]
    else:
        _set(model, bias_tensor, head.bias.astype(np.float32))
    # The class count in every shape from the classifier to the graph's output (logits, dequantized, softmax).
    _resize(weight_tensor, head.classes, axis=0)
    for tensor in _downstream(graph, fc.outputs[0]):
        _resize(tensor, head.classes, axis=-1)
    return write_model(model)


def _classifier(model, graph, schema):
    """The FULLY_CONNECTED the output's SOFTMAX reads, through an optional DEQUANTIZE."""
    ops = {getattr(schema.BuiltinOperator, name): name for name in ("SOFTMAX", "DEQUANTIZE", "FULLY_CONNECTED")}

    def kind(op) -> str | None:
        code = model.operatorCodes[op.opcodeIndex]
        return ops.get(max(code.builtinCode, code.deprecatedBuiltinCode))

    if len(graph.outputs) != 1:
        raise PatchUnsupported(f"the base has {len(graph.outputs)} outputs, not one")
    op = _producer(graph, graph.outputs[0])
    if op is None or kind(op) != "SOFTMAX":
        raise PatchUnsupported("the base's output is not a SOFTMAX")
    op = _producer(graph, op.inputs[0])
    if op is not None and kind(op) == "DEQUANTIZE":
        op = _producer(graph, op.inputs[0])
    if op is None or kind(op) != "FULLY_CONNECTED":
        raise PatchUnsupported("the base's SOFTMAX does not read a FULLY_CONNECTED classifier")
    return op


def _producer(graph, tensor: int):
    return next((op for op in graph.operators if tensor in list(op.outputs)), None)


def _downstream(graph, tensor: int) -> list:
    """The tensors computed from ``tensor`` on the way to the output (itself first)."""
    chain, frontier = [graph.tensors[tensor]], tensor
    while True:
        op = next((op for op in graph.operators if frontier in list(op.inputs)), None)
        if op is None:
            return chain
        frontier = op.outputs[0]
        chain.append(graph.tensors[frontier])


def _resize(tensor, classes: int, axis: int) -> None:
    """``tensor``'s class axis (the first of a weight, the last of an activation) set to ``classes``."""
    shape = list(tensor.shape)
    axis %= len(shape)
    if tensor.shapeSignature is not None and len(tensor.shapeSignature) == len(shape):
        signature = list(tensor.shapeSignature)
        signature[axis] = classes
        tensor.shapeSignature = signature
    shape[axis] = classes
    tensor.shape = shape


def _set(model, tensor, values: np.ndarray, scale: np.ndarray | None = None) -> None:
    """Write ``values`` as ``tensor``'s constant, in a buffer of its own; with ``scale``, per-channel zero-point 0."""
    from ai_edge_litert import schema_py_generated as schema

    shared = sum(1 for t in _all_tensors(model) if t.buffer == tensor.buffer) > 1
    if shared or tensor.buffer == 0:
        model.buffers.append(schema.BufferT())
        tensor.buffer = len(model.buffers) - 1
    buffer = model.buffers[tensor.buffer]
    buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    buffer.offset = buffer.size = 0
    tensor.shape = list(values.shape)
    if scale is not None:
        if tensor.quantization is None:
            tensor.quantization = schema.QuantizationParametersT()
        tensor.quantization.scale = [float(s) for s in scale]
        tensor.quantization.zeroPoint = [0] * len(scale)
        tensor.quantization.quantizedDimension = 0


def _all_tensors(model):
    return (t for g in model.subgraphs for t in g.tensors)


def _new_tensor(model, graph, schema, quantized: bool) -> int:
    """A bias tensor for a classifier converted without one (its bias was all zeros then)."""
    tensor = schema.TensorT()
    tensor.type = schema.TensorType.INT32 if quantized else schema.TensorType.FLOAT32
    tensor.name = b"sprout/classifier_bias"
    tensor.shape = [0]
    model.buffers.append(schema.BufferT())
    tensor.buffer = len(model.buffers) - 1
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _quantize_weights(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8, with the weight observer of a full int8 conversion: (scales, values)."""
    import torch
    import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed

    from daemon.export.converter import int8_config

    spec = int8_config().weight
    observer = spec.observer_or_fake_quant_ctr(
        dtype=spec.dtype, quant_min=spec.quant_min, quant_max=spec.quant_max, qscheme=spec.qscheme, ch_axis=spec.ch_axis
    )
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    q = torch.ops.quantized_decomposed.quantize_per_channel(
        w, scale, zero_point, spec.ch_axis, spec.quant_min, spec.quant_max, torch.int8
    )
    return scale.numpy().astype(np.float32), q.numpy()


def _quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.round(bias.astype(np.float64) / scale.astype(np.float64)).astype(np.int32)


def _output_range(logits: np.ndarray) -> tuple[float, int]:
    """The classifier's output (scale, zero point) from the calibration logits, as PT2E's activation observer."""
    import torch

    from daemon.export.converter import int8_config

    spec = int8_config().output_activation
    observer = spec.observer_or_fake_quant_ctr(
        dtype=spec.dtype, quant_min=spec.quant_min, quant_max=spec.quant_max, qscheme=spec.qscheme
    )
    observer(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)))
    scale, zero_point = observer.calculate_qparams()
    return float(scale.item()), int(zero_point.item())


def head_of(model: Any, calibration: Sequence[np.ndarray] = (), embeddings: np.ndarray | None = None) -> Head:
    """The classifier of a :class:`~daemon.export.converter.Deployable`, with the logits and float embeddings of
    the uint8 (H, W, 3) ``calibration`` images when given (int8 needs them); their ``embeddings``, when known
    (float_reference.float_embeddings), spare running the backbone on them."""
    import torch

    logits = None
    if embeddings is None and len(calibration):
        from daemon.export.float_reference import (
            backbone_embeddings,
        )  # here: it imports conversions, which imports this

        embeddings = backbone_embeddings(model, calibration)
    if embeddings is not None and len(embeddings):
        with torch.no_grad():
            logits = model.head(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))).numpy()
    else:
        embeddings = None
    weight = model.head.weight.detach().cpu().numpy().astype(np.float32)
    bias = model.head.bias.detach().cpu().numpy().astype(np.float32)
    return Head(weight, bias, logits, embeddings)


def embedding_quantization(tflite: bytes) -> tuple[float, int] | None:
    """(scale, zero point) of the embedding the classifier takes, or None where it is float."""
    from ai_edge_litert import schema_py_generated as schema

    from daemon.export.flatbuffer import read_model

    model = read_model(tflite)
    graph = model.subgraphs[0]
    tensor = graph.tensors[_classifier(model, graph, schema).inputs[0]]
    if tensor.type == schema.TensorType.FLOAT32 or tensor.quantization is None:
        return None
    return float(np.asarray(tensor.quantization.scale)[0]), int(np.asarray(tensor.quantization.zeroPoint)[0])


def classifier_difference(a: bytes, b: bytes) -> str | None:
    """What differs between the classifiers of two files of one mode, or None when they hold the same one.

    Weights and biases must match byte for byte; the int8 output scale within a relative 1e-4 (the float
    model's logits, computed in batches here and one image at a time by PT2E's calibration, differ in their
    last bits).
    """
    from ai_edge_litert import schema_py_generated as schema

    from daemon.export.flatbuffer import read_model

    found: list[dict[str, Any]] = []
    for tflite in (a, b):
        model = read_model(tflite)
        graph = model.subgraphs[0]
        fc = _classifier(model, graph, schema)
        weights = fc.inputs[1]
        dequantized = _producer(graph, weights)
        stored = graph.tensors[dequantized.inputs[0] if dequantized is not None else weights]
        bias = graph.tensors[fc.inputs[2]] if len(fc.inputs) > 2 and fc.inputs[2] >= 0 else None
        output = graph.tensors[fc.outputs[0]]
        found.append(
            {
                "weights": _constant(model, stored),
                "bias": _constant(model, bias) if bias is not None else None,
                "output": _quantization(output),
            }
        )
    for part in ("weights", "bias"):
        if found[0][part] != found[1][part]:
            return f"the classifier's {part} differ"
    (scale_a, zero_a), (scale_b, zero_b) = found[0]["output"], found[1]["output"]
    if zero_a != zero_b or not np.allclose(scale_a, scale_b, rtol=1e-4, atol=0):
        return f"the classifier's output range differs: scale {scale_a} zero point {zero_a} against {scale_b} {zero_b}"
    return None


def _constant(model, tensor) -> tuple:
    data = model.buffers[tensor.buffer].data
    return (
        list(tensor.shape),
        tensor.type,
        None if data is None else np.asarray(data).tobytes(),
        _quantization(tensor),
    )


def _quantization(tensor) -> tuple:
    q = tensor.quantization
    if q is None or q.scale is None:
        return ((), ())
    return tuple(float(s) for s in q.scale), tuple(int(z) for z in (q.zeroPoint if q.zeroPoint is not None else ()))


def with_embedding_output(tflite: bytes) -> bytes:
    """``tflite`` with the tensor its classifier reads (the backbone's embedding) as a second output.

    The same ops on the same constants: an interpreter computes the same probabilities, and hands out the
    embedding (an inner tensor of a delegated graph is not kept otherwise). PatchUnsupported in another graph.
    """
    from ai_edge_litert import schema_py_generated as schema

    from daemon.export.flatbuffer import read_model, write_model

    model = read_model(tflite)
    graph = model.subgraphs[0]
    graph.outputs = [int(graph.outputs[0]), int(_classifier(model, graph, schema).inputs[0])]
    model.signatureDefs = []  # they name one output
    return write_model(model)


def classifier_only(tflite: bytes) -> bytes:
    """The model's classifier alone: the embedding tensor in (as the model holds it), the probabilities out.

    Its ops are the model's own (FULLY_CONNECTED, the DEQUANTIZEs, SOFTMAX) on the same constants, so an
    interpreter fed the embeddings it computed inside the whole model returns what the whole model returns.
    """
    from ai_edge_litert import schema_py_generated as schema

    from daemon.export.flatbuffer import read_model, write_model

    model = read_model(tflite)
    graph = model.subgraphs[0]
    fc = _classifier(model, graph, schema)
    kept = [op for op in graph.operators if op is fc or _feeds(graph, op, fc) or _after(graph, fc, op)]
    graph.operators = kept
    graph.inputs = [int(fc.inputs[0])]
    used = {int(i) for op in kept for i in (*op.inputs, *op.outputs) if i >= 0} | set(graph.inputs)
    needed = {graph.tensors[i].buffer for i in used}
    for index, buffer in enumerate(model.buffers):  # the backbone's weights: not read, not written
        if index not in needed:
            buffer.data = None
    model.signatureDefs = []  # they name the image input
    model.metadata = []
    return write_model(model)


def _feeds(graph, op, fc) -> bool:
    """``op`` computes one of the classifier's constants (fp16's DEQUANTIZE of the weights)."""
    return any(int(o) in [int(i) for i in fc.inputs[1:]] for o in op.outputs)


def _after(graph, fc, op) -> bool:
    """``op`` is on the way from the classifier to the output."""
    frontier = {int(fc.outputs[0])}
    for candidate in graph.operators:
        if any(int(i) in frontier for i in candidate.inputs):
            if candidate is op:
                return True
            frontier |= {int(o) for o in candidate.outputs}
    return False
