"""int8 bias correction: the classifier's bias moved by the mean error the int8 backbone makes on the embedding.

The arithmetic on made-up embeddings, then the tiny network through the real
converter: the corrected file differs from the converted one by its bias and
output range alone, by the error its own int8 backbone makes, measured here
on the interpreter independently of the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.export.bias_correction import (
    CorrectionFailed,
    KeptErrors,
    apply,
    corrected,
    correction_for,
    embedding_error,
)
from daemon.export.converter import convert
from daemon.export.flatbuffer import read_model
from daemon.export.head_patch import Head, embedding_quantization, head_of, with_embedding_output
from edge.runtime import Session


def made_up(seed: int = 0, n: int = 200, size: int = 16, classes: int = 4) -> tuple[Head, np.ndarray]:
    """A head with float embeddings of n images, and int8-like embeddings of them: a mean error of each
    channel's own plus noise."""
    rng = np.random.default_rng(seed)
    floats = rng.normal(size=(n, size)).astype(np.float32)
    quantized = floats + rng.normal(0, 0.3, size=size) + rng.normal(0, 0.05, size=(n, size))
    weight = rng.normal(size=(classes, size)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)
    return Head(weight, bias, floats @ weight.T + bias, floats), quantized.astype(np.float32)


def test_the_corrected_head_gives_the_float_mean_logits_on_int8_embeddings():
    head, quantized = made_up()
    assert head.calibration_embeddings is not None and head.calibration_logits is not None
    before = quantized @ head.weight.T + head.bias
    c = corrected(head, embedding_error(head, quantized))
    after = quantized @ c.head.weight.T + c.head.bias
    float_mean = head.calibration_logits.mean(axis=0)
    # The uncorrected head is off by W E[d] on average; the corrected one is not.
    assert np.abs(before.mean(axis=0) - float_mean).max() > 0.5
    assert np.abs(after.mean(axis=0) - float_mean).max() < 1e-4
    assert np.array_equal(c.head.weight, head.weight)  # only the bias moves
    assert c.logit_shift == pytest.approx(np.abs(c.head.bias - head.bias).max(), rel=1e-5)
    assert c.error.images == len(quantized)
    # The output range stays PT2E's: the float logits of the calibration images.
    assert c.head.calibration_logits is head.calibration_logits


def test_a_correction_without_matching_embeddings_is_refused_with_the_reason():
    head, quantized = made_up()
    with pytest.raises(CorrectionFailed, match="shape"):
        embedding_error(head, quantized[:10])
    with pytest.raises(CorrectionFailed, match="no float embeddings"):
        embedding_error(Head(head.weight, head.bias), quantized)
    other, _ = made_up(size=8)
    with pytest.raises(CorrectionFailed, match="embedding error of shape"):
        corrected(other, embedding_error(head, quantized))


def file_bias(tflite: bytes) -> np.ndarray:
    """The classifier's bias as the int8 file stores it, dequantised."""
    from ai_edge_litert import schema_py_generated as schema

    from daemon.export.head_patch import _classifier

    model = read_model(tflite)
    graph = model.subgraphs[0]
    tensor = graph.tensors[_classifier(model, graph, schema).inputs[2]]
    values = np.frombuffer(bytes(bytearray(model.buffers[tensor.buffer].data)), dtype=np.int32)
    return values * np.asarray(tensor.quantization.scale, dtype=np.float64)


@pytest.fixture(scope="module")
def int8_base(trained) -> bytes:
    model, _, _, calibration = trained
    return convert(model, "int8", 32, calibration)


def test_an_int8_file_is_corrected_by_its_own_backbones_mean_error(trained, int8_base: bytes, tmp_path: Path):
    model, images, _, calibration = trained
    head = head_of(model, calibration)
    kept = KeptErrors(tmp_path)
    correction = correction_for(int8_base, "base-sha", head, calibration, kept, "ai-edge-litert", None, 120)
    fixed = apply(int8_base, correction.head)
    # The int8 embeddings, measured here on the interpreter: the file with its embedding as a second output.
    session = Session(with_embedding_output(int8_base), "ai-edge-litert", threads=1, keep_output=1)
    _, _, exposed = session.run(session.inputs(np.stack(calibration)))
    quantization = embedding_quantization(int8_base)
    assert exposed is not None and quantization is not None and head.calibration_embeddings is not None
    scale, zero_point = quantization
    error = ((exposed.astype(np.float64) - zero_point) * scale - head.calibration_embeddings).mean(axis=0)
    expected = head.bias - head.weight.astype(np.float64) @ error
    got, converted = file_bias(fixed), file_bias(int8_base)
    assert np.abs(got - expected).max() < 1e-3  # to the bias's int32 step
    assert np.abs(got - converted).max() == pytest.approx(correction.logit_shift, abs=1e-3)
    assert correction.logit_shift > 1e-3  # the tiny backbone's int8 embedding is measurably off
    # The rest of the file is the converted one: same backbone bytes, so the same embeddings.
    again = Session(with_embedding_output(fixed), "ai-edge-litert", threads=1, keep_output=1)
    _, _, kept_again = again.run(again.inputs(np.stack(calibration)))
    assert kept_again is not None and np.array_equal(kept_again, exposed)
    probabilities, _ = Session(fixed, "ai-edge-litert", threads=1).probabilities(images)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=0.02)
    # The error is the backbone's: kept for it, and a new head patched into the same conversion reuses it
    # without running an interpreter (no Python to run one with here).
    saved = kept.load("base-sha")
    assert saved is not None and np.array_equal(saved.mean, correction.error.mean) and saved.images == len(calibration)
    assert kept.load("another-conversion") is None
    no_interpreter = {"ai-edge-litert": tmp_path / "no-python"}
    reused = correction_for(int8_base, "base-sha", head, calibration, kept, "ai-edge-litert", no_interpreter, 60)
    assert apply(int8_base, reused.head) == fixed and reused.logit_shift == correction.logit_shift
    (tmp_path / "export-cache" / "int8-embedding-error.npz").write_bytes(b"PK\x03\x04 cut short")
    assert kept.load("base-sha") is None  # unreadable: measured again


def test_a_correction_that_cannot_be_measured_says_why(trained, int8_base: bytes, tmp_path: Path):
    model, _, _, calibration = trained
    head = head_of(model, calibration)
    missing = {"ai-edge-litert": tmp_path / "no-python"}
    kept = KeptErrors(tmp_path)
    with pytest.raises(CorrectionFailed, match="could not run the calibration images"):
        correction_for(int8_base, "sha", head, calibration, kept, "ai-edge-litert", missing, 60)
    fp16 = convert(model, "fp16", 32)
    with pytest.raises(CorrectionFailed, match="not an int8 file"):
        correction_for(fp16, "sha", head, calibration, kept, "ai-edge-litert", None, 60)
    assert kept.load("sha") is None  # nothing measured, nothing kept
