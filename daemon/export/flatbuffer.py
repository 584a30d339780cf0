"""A .tflite file as the TFLite schema's objects and back, with every weight inside the flatbuffer.

ai-edge-litert's generated copy of the schema (the converter's generation)
reads and writes the file. ai-edge-quantizer stores the weights of larger
models (EfficientNet-Lite0 in fp16) after the flatbuffer, at a buffer's
``offset``; a file rebuilt from the objects would lose them, so :func:`read_model`
moves them inside, as every other mode stores them (the Task Library's
TFLite 2.13 cannot read them otherwise).
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np

MODEL_IDENTIFIER = b"TFL3"  # the TFLite schema's file identifier


def read_model(tflite: bytes) -> Any:
    """The file's ``ModelT``, every buffer's bytes in ``data``."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(tflite, 0))
    for buffer in model.buffers:
        if buffer.offset > 1:  # stored after the flatbuffer (TFLite: an offset above 1 is one): moved inside
            buffer.data = np.frombuffer(tflite, np.uint8, buffer.size, buffer.offset)
            buffer.offset = buffer.size = 0
    return model


def write_model(model: Any, extra: int = 4096) -> bytes:
    """The file of ``model`` (from :func:`read_model`); ``extra``: bytes of room beyond its buffers."""
    builder = flatbuffers.Builder(sum(len(b.data) for b in model.buffers if b.data is not None) + extra)
    builder.Finish(model.Pack(builder), MODEL_IDENTIFIER)
    return bytes(builder.Output())
