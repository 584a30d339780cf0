"""Incremental export: a new head written into the last full conversion predicts as a full conversion does.

The tiny network's holdout through the real converter and both interpreters,
in every quantization mode, with the head changed and with a class added.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from daemon.export.conversions import Conversions
from daemon.export.converter import Deployable, convert, float_probabilities
from daemon.export.flatbuffer import read_model, write_model
from daemon.export.float_reference import float_reference
from daemon.export.head_patch import PatchUnsupported, classifier_difference, head_of, patch_head
from daemon.export.head_verification import Embeddings, keep_embeddings, verify_patched
from daemon.export.verification import verify
from daemon.learning.head import GrowingHead

MODES = ["int8", "fp16", "none", "dynamic"]
# Measured 0.0 on the tiny network and 7e-7 on EfficientNet-Lite0 (int8, 128 px): the same numbers, as the
# interpreters compute them.
MAX_PROBABILITY_DIFFERENCE = 1e-5


def changed(model: Deployable, seed: int, extra_classes: int = 0) -> Deployable:
    """``model`` with its head moved (as more training moves it), and ``extra_classes`` outputs grown."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    head: GrowingHead = model.head  # type: ignore[assignment]
    with torch.no_grad():
        head.weight.add_(0.5 * torch.randn(head.weight.shape, generator=generator) * head.weight.std())
        head.bias.add_(0.1 * torch.randn(head.bias.shape, generator=generator))
    head.grow(extra_classes)
    with torch.no_grad():
        head.bias[head.num_classes - extra_classes :] = 0.2
    return model


def probabilities(tflite: bytes, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite, num_threads=1)
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    out = []
    for image in images:
        interpreter.set_tensor(source, image[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(sink)[0].copy())
    return np.array(out)


@pytest.fixture(scope="module")
def bases(trained):
    """The trained model's full conversion in each mode: what the patched exports start from."""
    model, _, _, calibration = trained
    return {mode: convert(model, mode, 32, calibration) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("extra_classes", [0, 1], ids=["same-classes", "a-new-class"])
def test_a_patched_file_predicts_as_a_full_conversion_on_both_interpreters(
    trained, bases, mode: str, extra_classes: int
):
    model, images, labels, calibration = trained
    new = changed(model, seed=3, extra_classes=extra_classes)
    full = convert(new, mode, 32, calibration)
    patched = patch_head(bases[mode], head_of(new, calibration if mode == "int8" else []), mode)
    assert classifier_difference(patched, full) is None
    expected, got = probabilities(full, images), probabilities(patched, images)
    assert got.shape == expected.shape == (len(images), 3 + extra_classes)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() <= MAX_PROBABILITY_DIFFERENCE
    # The head did change: the patched file is not the base's classifier any more.
    assert classifier_difference(patched, bases[mode]) is not None
    # tflite-runtime 2.14 too, where it runs the mode at all (it has no FULLY_CONNECTED v12 for dynamic).
    if mode != "dynamic":
        reports = {
            name: verify(tflite, images, labels, None, ["tflite-runtime"])[0]
            for name, tflite in (("full", full), ("patched", patched))
        }
        assert reports["full"].error is None and reports["patched"].error is None
        assert reports["patched"].predicted == reports["full"].predicted


def test_a_file_that_does_not_end_in_the_classifier_or_takes_other_embeddings_is_refused(trained, bases):
    model, _, _, _ = trained
    head = head_of(model)
    with pytest.raises(PatchUnsupported, match="embeddings"):
        patch_head(bases["none"], type(head)(head.weight[:, :-1], head.bias), "none")
    cut = read_model(bases["none"])  # the SOFTMAX removed: the classifier's logits are the output
    graph = cut.subgraphs[0]
    softmax = graph.operators.pop()
    graph.outputs = list(softmax.inputs)
    with pytest.raises(PatchUnsupported, match="SOFTMAX"):
        patch_head(write_model(cut), head, "none")
    with pytest.raises(PatchUnsupported, match="int8"):
        patch_head(bases["int8"], head, "fp16")


class _GainAfterPooling(nn.Module):
    """A backbone ending in a constant multiply, which the converter folds into the classifier's weights."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) * 3.0


def test_exports_reuse_the_kept_conversion_until_the_backbone_changes_or_a_full_one_is_due(trained, tmp_path: Path):
    model, images, _, calibration = trained
    conversions = Conversions(tmp_path, full_every=3)
    first = conversions.convert(model, "int8", 32, calibration)
    assert (first.how, first.why) == ("full", "no earlier conversion of this mode")
    second = conversions.convert(changed(model, 1), "int8", 32, calibration)
    third = conversions.convert(changed(model, 2, extra_classes=1), "int8", 32, calibration)
    assert second.how == third.how == "patched"
    fourth = conversions.convert(changed(model, 4), "int8", 32, calibration)
    assert fourth.how == "full" and "every 3 exports" in fourth.why
    # Another mode keeps its own.
    assert conversions.convert(model, "fp16", 32).how == "full"
    assert conversions.convert(changed(model, 5), "fp16", 32).how == "patched"
    # A backbone that learned (last_blocks mode) is converted in full.
    moved = copy.deepcopy(model)
    with torch.no_grad():
        next(moved.backbone.parameters()).mul_(1.01)
    assert conversions.convert(moved, "fp16", 32).why == "the backbone, the input size or a converting library changed"
    # A kept file cut short (a crash while it was written, a bad disk) is not patched.
    (tmp_path / "export-cache" / "conversions" / "fp16.tflite").write_bytes(b"TFL3")
    again = conversions.convert(moved, "fp16", 32)
    assert (again.how, again.why) == ("full", "the kept conversion is incomplete or damaged")
    assert np.array_equal(probabilities(again.tflite, images), probabilities(convert(moved, "fp16", 32), images))


def test_a_full_conversion_due_by_count_waits_for_the_minimum_interval(trained, tmp_path: Path):
    """Exports seconds apart: the cross-check's full conversion comes by time, not every few exports."""
    model, _, _, _ = trained
    conversions = Conversions(tmp_path, full_every=2, full_every_min_s=3600)
    assert conversions.convert(model, "fp16", 32).how == "full"
    assert [conversions.convert(changed(model, k), "fp16", 32).how for k in (1, 2, 3)] == ["patched"] * 3
    kept = tmp_path / "export-cache" / "conversions" / "fp16.json"
    state = json.loads(kept.read_text())
    kept.write_text(json.dumps({**state, "converted_at": time.time() - 3601}))  # an hour on
    due = conversions.convert(changed(model, 4), "fp16", 32)
    assert due.how == "full" and "at least 3600 s apart (export.full_conversion_min_interval_s)" in due.why
    assert conversions.convert(changed(model, 5), "fp16", 32).how == "patched"
    # 1 still converts at every export, whatever the interval.
    assert Conversions(tmp_path, full_every=1, full_every_min_s=3600).convert(model, "fp16", 32).how == "full"


def test_a_conversion_that_does_not_hold_the_trained_head_is_never_patched(trained, tmp_path: Path):
    model, _, _, _ = trained
    folded = copy.deepcopy(model)
    folded.backbone = _GainAfterPooling(folded.backbone)
    conversions = Conversions(tmp_path, full_every=10)
    assert conversions.convert(folded, "none", 32).how == "full"
    again = conversions.convert(changed(folded, 1), "none", 32)
    assert again.how == "full" and "does not hold the head as trained" in again.why
    assert "weights differ" in again.why


def test_a_patched_candidate_verified_on_kept_embeddings_scores_as_on_every_image(trained, tmp_path: Path):
    model, images, labels, calibration = trained
    conversions, embeddings = Conversions(tmp_path, full_every=10), Embeddings(tmp_path, "int8")
    conversions.convert(model, "int8", 32, calibration)
    runtimes = ["ai-edge-litert", "tflite-runtime"]
    seqs = np.arange(100, 100 + len(images))
    everyone, rolled = np.arange(len(images)), np.roll(np.arange(len(images)), -5)
    # No embedding kept yet (every image runs on the file, its embedding out); all kept; five new examples (the
    # same pixels under new seqs) replacing the five oldest.
    rounds = [(everyone, seqs), (everyone, seqs), (rolled, np.concatenate([seqs[5:], np.arange(900, 905)]))]
    for seed, (shown, holdout) in enumerate(rounds):
        new = changed(model, seed)
        patched = conversions.convert(new, "int8", 32, calibration)
        assert patched.how == "patched"
        reference = float_probabilities(new, images[shown])
        args = (images[shown], labels[shown], reference, runtimes)
        verified = verify_patched(patched.tflite, patched.base, embeddings, list(holdout), *args, None, 120)
        assert verified is not None
        quick, reused = verified
        assert reused == [0, len(images), len(images) - 5][seed]
        keep_embeddings(embeddings, patched.base, quick, list(holdout))
        assert all(set(by_seq) == set(holdout) for by_seq in embeddings.load(patched.base).values())
        for q, w in zip(quick, verify(patched.tflite, *args), strict=True):
            assert (q.runtime, q.predicted, q.top1, q.agreement, q.nonfinite) == (
                w.runtime,
                w.predicted,
                w.top1,
                w.agreement,
                w.nonfinite,
            )
            assert q.probabilities is not None and w.probabilities is not None
            assert np.abs(q.probabilities - w.probabilities).max() <= MAX_PROBABILITY_DIFFERENCE
    # Embeddings that are not what the backbone computes (another backbone's, a damaged file): the sample run
    # on the file disagrees, they are dropped, and the caller verifies every image on the file.
    kept = embeddings.load(patched.base)
    embeddings.save(
        patched.base, {r: {s: v // 2 + 7 for s, v in by_seq.items()} for r, by_seq in kept.items()}, list(holdout)
    )
    assert verify_patched(patched.tflite, patched.base, embeddings, list(holdout), *args, None, 120) is None
    assert embeddings.load(patched.base) == {}
    # Embeddings kept for another conversion are not used.
    keep_embeddings(embeddings, "another", quick, list(holdout))
    assert embeddings.load(patched.base) == {}


def test_the_float_reference_runs_the_backbone_only_on_images_new_to_the_holdout(trained, tmp_path: Path):
    model, images, _, _ = trained
    seqs = list(range(len(images)))
    expected = float_probabilities(model, images)
    first = float_reference(model, seqs, images, tmp_path)
    assert np.abs(first - expected).max() <= MAX_PROBABILITY_DIFFERENCE
    # Kept: blank images under the same seqs give the same reference; a new seq is computed from its image.
    blank = np.zeros_like(images)
    again = float_reference(changed(model, 1), [*seqs[1:], 999], np.concatenate([blank[1:], images[:1]]), tmp_path)
    assert np.abs(again - float_probabilities(changed(model, 1), np.roll(images, -1, axis=0))).max() <= 1e-5
    # Another backbone (last_blocks mode learned it) does not use them.
    moved = copy.deepcopy(model)
    with torch.no_grad():
        next(moved.backbone.parameters()).mul_(1.5)
    fresh = float_reference(moved, seqs, blank, tmp_path)
    assert np.abs(fresh - float_probabilities(moved, blank)).max() <= MAX_PROBABILITY_DIFFERENCE


def test_kept_embeddings_cut_short_are_run_again_not_an_error(tmp_path: Path):
    embeddings = Embeddings(tmp_path, "int8")
    embeddings.save("sha", {"ai-edge-litert": {1: np.ones(4, np.int8)}}, [1])
    assert embeddings.load("sha")["ai-edge-litert"][1].tolist() == [1, 1, 1, 1]
    whole = embeddings.path.read_bytes()
    embeddings.path.write_bytes(whole[: len(whole) // 2])  # a zip without its directory: BadZipFile
    assert embeddings.load("sha") == {}
