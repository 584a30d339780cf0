"""Export on the tiny network: each mode converts, runs on the real LiteRT interpreter, and matches the float model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.exporter import ExportError, convert, float_probabilities, snapshot, verify_litert
from daemon.imaging import load_rgb
from models.zoo import get
from test_learner import learn_all, make_learner, stream

TINY = get("tiny").preprocessing


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained on three colours, and labelled holdout images as an app would send them."""
    tmp = tmp_path_factory.mktemp("export")
    examples = stream([0, 1, 2], 40, seed=21, order="iid")
    learner, reader = make_learner(tmp, examples)
    learn_all(learner, reader)
    holdout = [e for e in examples if e.split == "holdout"]
    images = np.stack([load_rgb(e.image, 32) for e in holdout])
    labels = np.array([learner.labels.index(e.label) for e in holdout])
    calibration = [load_rgb(e.image, 32) for e in examples if e.split == "train"][:32]
    model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
    return model, images, labels, calibration


def test_float_export_matches_pytorch_on_litert(trained):
    model, images, labels, _ = trained
    reference = float_probabilities(model, images)
    assert (reference.argmax(1) == labels).mean() >= 0.8  # the float model itself is good
    tflite = convert(model, "none", 32)
    report = verify_litert(tflite, images, labels, reference)
    assert report.agreement == 1.0
    assert report.top1 == pytest.approx((reference.argmax(1) == labels).mean())
    assert report.input_dtype == "float32" and report.input_scale is None
    assert not report.nonfinite and report.latency_ms > 0


def test_int8_export_is_integer_smaller_and_agrees(trained):
    model, images, labels, calibration = trained
    reference = float_probabilities(model, images)
    float_size = len(convert(model, "none", 32))
    tflite = convert(model, "int8", 32, calibration)
    report = verify_litert(tflite, images, labels, reference)
    assert report.input_dtype == "int8"
    assert report.input_scale == pytest.approx(1.0, abs=0.01) and report.input_zero_point == -128
    assert report.agreement >= 0.9
    assert len(tflite) < float_size


def test_int8_needs_calibration_images(trained):
    with pytest.raises(ExportError, match="calibration"):
        convert(trained[0], "int8", 32, [])
    with pytest.raises(ExportError, match="unknown export mode"):
        convert(trained[0], "int4", 32)


def test_a_damaged_candidate_shows_in_verification(trained):
    model, images, labels, _ = trained
    reference = float_probabilities(model, images)
    damaged = snapshot(model.backbone, model.head, TINY)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w = damaged.head.weight
        w.copy_(w.flatten()[torch.randperm(w.numel(), generator=generator)].view_as(w))
    report = verify_litert(convert(damaged, "none", 32), images, labels, reference)
    assert report.agreement < 0.7  # the gate compares this against the float model


def test_nan_output_is_reported(trained):
    model, images, labels, _ = trained
    broken = snapshot(model.backbone, model.head, TINY)
    with torch.no_grad():
        broken.head.bias.fill_(float("nan"))
    report = verify_litert(convert(broken, "none", 32), images, labels, float_probabilities(model, images))
    assert report.nonfinite

