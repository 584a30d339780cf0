"""Export on the tiny network: each mode converts and is verified on both real interpreters, ai-edge-litert and
tflite-runtime 2.14 (in its own virtualenv, as the daemon runs it); each known way a conversion goes wrong is caught."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.common.settings import Settings
from daemon.export.converter import ExportError, convert, float_probabilities, snapshot
from daemon.export.gates import gate
from daemon.export.verification import RuntimeFault, default_tflite_runtime_python, verify
from models.zoo import get

TINY = get("tiny").preprocessing
BOTH = ["ai-edge-litert", "tflite-runtime"]


@pytest.fixture(scope="module")
def float_size(trained):
    return len(convert(trained[0], "none", 32))


def assert_takes_uint8_rgb(tflite: bytes, size: int) -> None:
    """The input tensor an app fills, read from the file itself: one uint8 NHWC RGB image, whatever the mode."""
    from ai_edge_litert.interpreter import Interpreter

    (detail,) = Interpreter(model_content=tflite).get_input_details()
    assert detail["dtype"] == np.uint8 and list(detail["shape"]) == [1, size, size, 3], detail


def test_the_tflite_runtime_virtualenv_exists():
    # scripts/setup.sh makes it; without it every other test here would only exercise ai-edge-litert.
    assert default_tflite_runtime_python().exists()


@pytest.mark.parametrize("mode", ["none", "fp16", "int8"])
def test_each_mode_runs_on_both_interpreters_and_agrees_with_pytorch(trained, float_size, mode):
    model, images, labels, calibration = trained
    reference = float_probabilities(model, images)
    assert (reference.argmax(1) == labels).mean() >= 0.8  # the float model itself is good
    tflite = convert(model, mode, 32, calibration if mode == "int8" else ())
    reports = verify(tflite, images, labels, reference, BOTH)
    assert [r.runtime for r in reports] == BOTH
    for report in reports:
        assert report.error is None, report.error
        assert not report.nonfinite and report.latency_ms > 0
        assert report.agreement >= (1.0 if mode != "int8" else 0.9)
        assert report.input_dtype == "uint8"  # one input contract in every mode: an update never changes it
    assert reports[0].version.startswith("2.3") and reports[1].version == "2.14.0"
    assert gate(reports, float((reference.argmax(1) == labels).mean()), None, Settings.load(None).export) == []
    assert_takes_uint8_rgb(tflite, 32)
    if mode == "fp16":
        assert len(tflite) < 0.8 * float_size  # the tiny net: graph overhead is a large share
    if mode == "int8":
        assert len(tflite) < float_size


def test_dynamic_runs_on_litert_and_is_refused_by_tflite_runtime_2_14(trained):
    """PT2E dynamic-range models use FULLY_CONNECTED version 12, which tflite-runtime 2.14 does not have."""
    model, images, labels, _ = trained
    reference = float_probabilities(model, images)
    tflite = convert(model, "dynamic", 32)
    litert, old = verify(tflite, images, labels, reference, BOTH)
    assert litert.error is None and not litert.nonfinite and litert.agreement > 0.5
    assert litert.input_dtype == "uint8"
    assert_takes_uint8_rgb(tflite, 32)
    assert old.error is not None and "FULLY_CONNECTED" in old.error
    reasons = [
        str(r)
        for r in gate([litert, old], float((reference.argmax(1) == labels).mean()), None, Settings.load(None).export)
    ]
    assert any(
        r.startswith("tflite-runtime could not load or run the model: ValueError: Didn't find op") for r in reasons
    )


def test_a_model_that_loads_but_computes_wrong_numbers_on_tflite_runtime_is_refused(trained):
    """ai-edge-quantizer's dynamic-range recipe: right on ai-edge-litert, chance level on tflite-runtime 2.14."""
    import contextlib
    import io

    from ai_edge_quantizer import quantizer, recipe

    model, images, labels, _ = trained
    reference = float_probabilities(model, images)
    q = quantizer.Quantizer(bytearray(convert(model, "none", 32)))
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    with contextlib.redirect_stdout(io.StringIO()):
        tflite = bytes(q.quantize().quantized_model)
    litert, old = verify(tflite, images, labels, reference, BOTH)
    assert litert.error is None and litert.agreement == 1.0
    assert old.error is None and old.agreement < 0.7  # it loads and runs: only the comparison shows it
    reasons = [
        str(r)
        for r in gate([litert, old], float((reference.argmax(1) == labels).mean()), None, Settings.load(None).export)
    ]
    assert len(reasons) == 1 and reasons[0].startswith("holdout top-1 on tflite-runtime 2.14.0 is")


def test_int8_needs_calibration_images(trained):
    with pytest.raises(ExportError, match="calibration"):
        convert(trained[0], "int8", 32, [])
    with pytest.raises(ExportError, match="unknown export mode"):
        convert(trained[0], "int4", 32)


def test_a_damaged_candidate_is_refused_on_every_runtime(trained):
    model, images, labels, _ = trained
    reference = float_probabilities(model, images)
    damaged = snapshot(model.backbone, model.head, TINY)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w = damaged.head.weight
        w.copy_(w.flatten()[torch.randperm(w.numel(), generator=generator)].view_as(w))
    reports = verify(convert(damaged, "none", 32), images, labels, reference, BOTH)
    assert all(r.error is None and r.agreement < 0.7 for r in reports)
    reasons = [
        str(r) for r in gate(reports, float((reference.argmax(1) == labels).mean()), None, Settings.load(None).export)
    ]
    assert [r.split(" ")[3] for r in reasons] == BOTH  # "holdout top-1 on <runtime> ..." once per runtime
    assert all("points below the float model" in r for r in reasons)


def test_nan_output_is_refused(trained):
    model, images, labels, _ = trained
    broken = snapshot(model.backbone, model.head, TINY)
    with torch.no_grad():
        broken.head.bias.fill_(float("nan"))
    reports = verify(convert(broken, "none", 32), images, labels, float_probabilities(model, images), BOTH)
    assert all(r.nonfinite for r in reports)
    reasons = [str(r) for r in gate(reports, 1.0, None, Settings.load(None).export)]
    assert sum("NaN" in r for r in reasons) == 2


def test_a_crashing_or_missing_runtime_is_a_reason_not_a_crash(trained, tmp_path: Path):
    model, images, labels, _ = trained
    crasher = tmp_path / "python"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    os.chmod(crasher, 0o755)
    tflite = convert(model, "none", 32)
    reference = float_probabilities(model, images)
    (crashed,) = verify(tflite, images, labels, reference, ["tflite-runtime"], {"tflite-runtime": crasher})
    assert crashed.error == "crashed (signal 11) while loading or running the model"
    assert crashed.fault is RuntimeFault.CRASHED
    (missing,) = verify(tflite, images, labels, reference, ["tflite-runtime"], {"tflite-runtime": tmp_path / "nope"})
    assert missing.error is not None and "run scripts/setup.sh" in missing.error
    assert missing.fault is RuntimeFault.UNAVAILABLE
    reasons = [str(r) for r in gate([crashed, missing], 1.0, None, Settings.load(None).export)]
    assert len(reasons) == 2 and all("could not load or run the model" in r for r in reasons)
