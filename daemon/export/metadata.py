"""TFLite Model Metadata in every exported model: labels, input description, name and version inside the file.

Platform classifiers load a Sprout model as it is (MediaPipe's ImageClassifier,
the TFLite Task Library, Android Studio's ML binding) because the file says
what it is: the model's name, version and a description; the input tensor is
an RGB image of ``input_size`` pixels, uint8 0-255, with no normalisation
options (the graph normalises); the output tensor is the probability of each
label, with ``labels.txt`` (one label per line, the registry's very file)
attached as its TENSOR_AXIS_LABELS file, which those classifiers turn into
category names.

The metadata is built with tflite-support's metadata writers (the kept
library; MediaPipe's own do not import in its 1.2 releases) and placed as
their populator places it: a buffer named by the model's ``TFLITE_METADATA``
entry, and labels.txt in a zip archive appended to the file. The model is
rewritten with ai-edge-litert's copy of the TFLite schema, not with the
populator, because the populator rewrites it through tflite-support 0.4.4's
own 2023 schema, which has no Buffer.offset/size: ai-edge-quantizer stores
the weights of larger models (EfficientNet-Lite0 in fp16) after the
flatbuffer at such offsets, and the populated file lost them. Weights stored
that way are moved into the flatbuffer, as the other modes store them: the
Task Library's TFLite (2.13) cannot read them otherwise.

The exporter calls :func:`describe` right after conversion, so the bytes
verified on every runtime are the ones with metadata. The registry's version
number is known only under its lock, so the metadata holds the placeholder
``unpublished`` until :func:`stamp_version` writes the number over it in
place: the stamped file has the same length and differs in those few bytes of
the metadata buffer only, which no interpreter reads.

>>> described = describe(tflite, name="maize", labels=["healthy", "rust"], input_size=128,  # doctest: +SKIP
...                      base="efficientnet_lite0", quantization="int8")
>>> stamp_version(described, 7)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import struct
import zipfile

import flatbuffers
import numpy as np

UNPUBLISHED = "unpublished"  # the version until the registry numbers it; its length is the room for the number
LABELS_FILE = "labels.txt"  # the registry's name for the same lines (daemon/registry/versions.py), and the devices'
METADATA_NAME = b"TFLITE_METADATA"  # the model's metadata entry naming the buffer, where every reader looks
METADATA_IDENTIFIER = b"M001"  # the metadata schema's flatbuffer file identifier
# ModelMetadata.version is field 2 of metadata_schema.fbs (name 4, description 6, version 8 in the vtable);
# a field's slot never moves while the schema evolves.
_VERSION_SLOT = 8


def describe(tflite: bytes, *, name: str, labels: list[str], input_size: int, base: str, quantization: str) -> bytes:
    """``tflite`` with TFLite Model Metadata and ``labels.txt`` attached; the version is :data:`UNPUBLISHED`.

    The input must be one uint8 image and the output float32 probabilities (every export mode's contract);
    anything else is a ValueError.
    """
    from ai_edge_litert import schema_py_generated as schema  # the converter's generation of the TFLite schema

    from daemon.export.flatbuffer import read_model, write_model

    model = read_model(tflite)
    graph = model.subgraphs[0]
    types = [graph.tensors[i].type for i in graph.inputs], [graph.tensors[i].type for i in graph.outputs]
    if types != ([schema.TensorType.UINT8], [schema.TensorType.FLOAT32]):
        raise ValueError(
            f"describe: expected one uint8 input and one float32 output, the model has {types[0]} "
            f"and {types[1]} (TFLite TensorType numbers)"
        )
    metadata = schema.BufferT()
    metadata.data = np.frombuffer(_metadata(name, labels, input_size, base, quantization), np.uint8)
    model.buffers.append(metadata)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in model.metadata or [] if m.name != METADATA_NAME] + [entry]
    described = io.BytesIO(write_model(model))
    described.seek(0, io.SEEK_END)
    # Appending to a file that is not a zip archive starts one after it: where the populator puts the files.
    with zipfile.ZipFile(described, "a") as archive:
        archive.writestr(LABELS_FILE, "".join(f"{label}\n" for label in labels).encode("utf-8"))
    return described.getvalue()


def _metadata(name: str, labels: list[str], input_size: int, base: str, quantization: str) -> bytes:
    """The ModelMetadata flatbuffer, as tflite-support's ImageClassifier writer builds it, plus the input size."""
    # tflite-support 0.4.4 is installed without its dependencies (scripts/setup.sh: it would pin protobuf<4);
    # these modules need flatbuffers only. Imported here: only the export child needs them.
    from tensorflow_lite_support.metadata import metadata_schema_py_generated as fb
    from tensorflow_lite_support.metadata import schema_py_generated as tfl
    from tensorflow_lite_support.metadata.cc.python import _pywrap_metadata_version
    from tensorflow_lite_support.metadata.python.metadata_writers import metadata_info

    model = metadata_info.GeneralMd(
        name=name,
        version=UNPUBLISHED,
        description=f"Classifies an image into one of the {len(labels)} labels of {LABELS_FILE}: {base} fine-tuned "
        f"by Sprout, {quantization} quantization.",
        author="Sprout",
    ).create_metadata()
    # uint8 input: the writer records the 0-255 range; no NormalizationOptions, because the graph normalises
    # (a classifier applies them to float inputs only, and would need them there).
    image = metadata_info.InputImageTensorMd(
        name="image",
        description=f"One upright RGB image, {input_size}x{input_size} pixels, uint8 0-255 (shorter side resized to "
        f"{input_size}, centre cropped). Normalisation is inside the model: feed the pixels as they are.",
        color_space_type=fb.ColorSpaceType.RGB,
        tensor_type=tfl.TensorType.UINT8,
    ).create_metadata()
    image.content.contentProperties.defaultSize = fb.ImageSizeT()
    image.content.contentProperties.defaultSize.width = input_size
    image.content.contentProperties.defaultSize.height = input_size
    probabilities = metadata_info.ClassificationTensorMd(
        name="probability",
        description=f"The probability of each label of {LABELS_FILE}, in its order (float32, summing to 1).",
        label_files=[metadata_info.LabelFileMd(LABELS_FILE)],
        tensor_type=tfl.TensorType.FLOAT32,
    ).create_metadata()
    model.subgraphMetadata = [fb.SubGraphMetadataT()]
    model.subgraphMetadata[0].inputTensorMetadata = [image]
    model.subgraphMetadata[0].outputTensorMetadata = [probabilities]
    # The oldest metadata parser that reads every field used: what the populator records (load_metadata_buffer).
    model.minParserVersion = _pywrap_metadata_version.GetMinimumMetadataParserVersion(_pack(model))
    return _pack(model)


def _pack(metadata) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(metadata.Pack(builder), METADATA_IDENTIFIER)
    return bytes(builder.Output())


def stamp_version(tflite: bytes, version: int) -> bytes:
    """``tflite`` (from :func:`describe`) with ``version`` written over the placeholder: same length, nothing else changed.

    The registry calls it under its lock with the number it assigns (``Registry.publish(..., stamp=...)``).
    """
    text = str(version).encode("ascii")
    at, length = _version_string(tflite)
    room = len(UNPUBLISHED)
    if bytes(tflite[at : at + length]) != UNPUBLISHED.encode("ascii"):
        raise ValueError(
            f"stamp_version: the model's metadata version is {bytes(tflite[at : at + length])!r}, "
            f"not the placeholder {UNPUBLISHED!r} that describe() writes"
        )
    if len(text) > room:
        raise ValueError(f"stamp_version: version {version} does not fit in the {room} characters reserved for it")
    stamped = bytearray(tflite)
    # A flatbuffers string: its length (uint32), its bytes, a NUL. The shorter number leaves zeros after its
    # NUL, inside the bytes the placeholder held: a valid string in an unchanged layout.
    struct.pack_into("<I", stamped, at - 4, len(text))
    stamped[at : at + room + 1] = text.ljust(room + 1, b"\0")
    return bytes(stamped)


def _version_string(tflite: bytes) -> tuple[int, int]:
    """(where the metadata's version string starts in ``tflite``, its length); ValueError when there is none."""
    from ai_edge_litert import schema_py_generated as schema
    from tensorflow_lite_support.metadata import metadata_schema_py_generated as fb

    model = schema.Model.GetRootAs(tflite, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != METADATA_NAME:
            continue
        buffer = model.Buffers(entry.Buffer())
        start = buffer._tab.Vector(buffer._tab.Offset(4))  # Buffer.data (slot 4): its first byte, in the file
        metadata = fb.ModelMetadata.GetRootAsModelMetadata(tflite, start)
        slot = metadata._tab.Offset(_VERSION_SLOT)
        if not slot:
            break
        string = metadata._tab.Indirect(metadata._tab.Pos + slot)
        return string + 4, flatbuffers.encode.Get(flatbuffers.packer.uoffset, tflite, string)
    raise ValueError("stamp_version: the model has no TFLite Model Metadata with a version (see describe())")
