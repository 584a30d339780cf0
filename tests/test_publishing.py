"""sprout export end to end on the tiny network: a learned checkpoint becomes a signed, verified version; bad ones are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from export_helpers import export
from helpers import colour_jpeg
from learning_helpers import learn_all, learned_state, make_learner, saved_checkpoint, stream
from registry_helpers import latest_manifest

from daemon.common.settings import Settings
from daemon.export.pipeline import export_once
from daemon.ingest.wire import Example
from daemon.learning import checkpoint
from daemon.registry.signing import verify, verify_file
from daemon.registry.versions import Registry, registry_root
from daemon.store.examples import Store


def test_export_publishes_a_signed_verified_version(tmp_path: Path):
    state = learned_state(tmp_path)
    code, result, err = export(state, SPROUT_EXPORT__CALIBRATION_EXAMPLES="30")
    assert code == 0, err
    assert result["published"] == 1 and result["rejected_because"] == []
    metrics = result["metrics"]
    assert set(metrics["holdout_top1"]) == {"ai-edge-litert", "tflite-runtime"}
    assert all(top1 >= metrics["holdout_top1_float"] - 0.01 for top1 in metrics["holdout_top1"].values())
    assert metrics["calibration_examples"] == 30  # 10 of each of the three classes: class-balanced
    assert metrics["conversion"] == "full" and metrics["verification"] == "every_image"  # the first: nothing to reuse
    assert metrics["int8_bias_correction_logits"] > 0  # on by default: int8's classifier bias corrected
    registry = Registry.open_readonly(registry_root(state), "plant-disease")
    manifest = latest_manifest(registry)
    assert manifest["version"] == 1 and manifest["quantization"] == "int8"  # the default mode
    assert sorted(manifest["labels"]) == ["class-0", "class-1", "class-2"]
    assert manifest["input"] == {"shape": [1, 32, 32, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]}
    assert [r["name"] for r in manifest["runtimes_verified"]] == ["ai-edge-litert", "tflite-runtime"]
    verify(registry.document(1), registry.signature(1), state / "signing" / "signing.pub")
    verify_file(manifest, registry.model_path(1).read_bytes())
    code, result, _ = export(state)
    assert code == 0 and result["published"] == 2  # as good as the published one: within the tolerance
    assert result["metrics"]["conversion"] == "patched"  # head mode: the backbone is the one converted for v1
    assert result["metrics"]["verification"] == "kept_embeddings"
    # Version 1 was run on this holdout when it was verified: the comparison reused its predictions.
    assert result["metrics"]["published_top1_same_holdout"]["version"] == 1
    assert result["metrics"]["published_rescored_examples"] == 0
    kept = state / "export-cache"
    assert [p.name for p in kept.glob("published-v*.json")] == ["published-v2.json"]  # only the latest's
    # Predictions that cannot be read are made anew, and the comparison comes out the same.
    (kept / "published-v2.json").write_text('{"model_version": 2, "runtimes": {"ai-edge-litert": [')
    code, again, _ = export(
        state, SPROUT_EXPORT__FULL_CONVERSION_EVERY="1", SPROUT_EXPORT__INT8_BIAS_CORRECTION="false"
    )
    assert code == 0 and again["published"] == 3 and again["metrics"]["conversion"] == "full"
    assert "int8_bias_correction_logits" not in again["metrics"]  # switched off: the classifier as converted
    assert again["metrics"]["published_rescored_examples"] == again["metrics"]["holdout_examples"]
    assert again["metrics"]["published_top1_same_holdout"] == {**result["metrics"]["holdout_top1"], "version": 2}


def test_a_worse_candidate_is_rejected_with_reasons_and_not_published(tmp_path: Path):
    state = learned_state(tmp_path)
    assert export(state)[0] == 0
    payload = saved_checkpoint(state / "checkpoints")
    weight = payload.head["weight"]
    generator = torch.Generator().manual_seed(5)
    payload.head["weight"] = weight.flatten()[torch.randperm(weight.numel(), generator=generator)].view_as(weight)
    checkpoint.save(state / "checkpoints", payload)
    code, result, _ = export(state)
    assert code == 1
    assert result["published"] is None
    assert any("below the published version 1" in r for r in result["rejected_because"])
    baseline = result["metrics"]["published_top1_same_holdout"]
    assert baseline["version"] == 1 and baseline["ai-edge-litert"] >= 0.9  # v1 re-scored on today's holdout
    registry = Registry.open_readonly(registry_root(state), "plant-disease")
    assert registry.versions() == [1]
    rejected = [e for e in registry.events() if e.get("event") == "rejected"]
    assert [e["candidate"]["quantization"] for e in rejected] == ["int8", "fp16"]  # each mode, in order
    assert [f"{e['candidate']['quantization']}: {r}" for e in rejected for r in e["reasons"]] == result[
        "rejected_because"
    ]
    # Beside each sentence, the refusal as data: its kind and the figures that tripped it.
    refusals = [r for e in rejected for r in e["refusals"]]
    assert {r["kind"] for r in refusals} == {"regression"}
    assert all(r["published_version"] == 1 and r["top1"] < r["published_top1"] for r in refusals)


def test_the_published_version_is_rescored_on_the_candidates_holdout(tmp_path: Path):
    """A model that learned a new class is compared with the published one on the same images, new class included."""
    from daemon.store.examples import Store

    learner, reader = make_learner(tmp_path, stream([0, 1], 40, seed=34, order="iid"))
    learn_all(learner, reader)
    checkpoint.save(tmp_path / "checkpoints", learner.state())
    code, first, err = export(tmp_path)
    assert code == 0 and first["published"] == 1, err
    store = Store(tmp_path / "examples.db")
    store.commit(stream([2], 40, seed=35))
    store.close()
    learn_all(learner, reader)
    checkpoint.save(tmp_path / "checkpoints", learner.state())
    code, second, err = export(tmp_path)
    assert code == 0 and second["published"] == 2, second.get("rejected_because", err)
    baseline = second["metrics"]["published_top1_same_holdout"]
    assert baseline["version"] == 1
    # Only the new holdout images (class 2) were run on version 1; the rest it had answered at its publish.
    new = second["metrics"]["holdout_examples"] - first["metrics"]["holdout_examples"]
    assert new > 0 and second["metrics"]["published_rescored_examples"] == new
    # Version 1 knows two of the three classes: on today's holdout it misses every class-2 image.
    assert set(baseline) == {"version", "ai-edge-litert", "tflite-runtime"}
    assert baseline["ai-edge-litert"] < 0.7 < first["metrics"]["holdout_top1"]["ai-edge-litert"]


def test_nothing_to_export_before_the_first_checkpoint(tmp_path: Path):
    make_learner(tmp_path, stream([0], 5, seed=32))
    code, _, err = export(tmp_path)
    assert code == 66
    assert "no checkpoint yet" in err


def test_float_export_on_one_runtime_when_configured(tmp_path: Path):
    state = learned_state(tmp_path)
    code, result, err = export(
        state, SPROUT_EXPORT__QUANTIZATION='["none"]', SPROUT_EXPORT__RUNTIMES='["ai-edge-litert"]'
    )
    assert code == 0, err
    assert result["metrics"]["holdout_top1"] == {"ai-edge-litert": result["metrics"]["holdout_top1_float"]}
    manifest = latest_manifest(Registry.open_readonly(registry_root(state), "plant-disease"))
    assert (
        manifest["quantization"] == "none" and manifest["input"]["dtype"] == "uint8"
    )  # the one input contract, float model too
    assert manifest["runtimes_verified"] == [{"name": "ai-edge-litert", "version": "2.3.0"}]


def test_gate_refuses_nan_and_a_large_drop_and_a_regression_per_runtime():
    from daemon.export.gates import Baseline, RefusalKind, gate
    from daemon.export.verification import RuntimeReport

    settings = Settings.load(None)
    report = RuntimeReport("ai-edge-litert", "2.3.0", 0.80, 0.9, 1.0, True, "float32")
    reasons = gate([report], 0.90, None, settings.export)
    assert [r.kind for r in reasons] == [RefusalKind.NONFINITE, RefusalKind.ACCURACY_DROP]
    assert any("NaN" in str(r) for r in reasons)
    assert any("10.0 points below the float model" in str(r) for r in reasons)
    assert (reasons[1].top1, reasons[1].float_top1, reasons[1].limit_pts) == (0.80, 0.90, settings.export.max_drop_pts)
    fine = RuntimeReport("ai-edge-litert", "2.3.0", 0.895, 1.0, 1.0, False, "float32")
    old = RuntimeReport("tflite-runtime", "2.14.0", 0.895, 1.0, 30.0, False, "float32")
    assert gate([fine, old], 0.90, None, settings.export) == []
    published = Baseline(4, {"ai-edge-litert": 0.89, "tflite-runtime": 0.91})
    reasons = gate([fine, old], 0.90, published, settings.export)
    assert [(r.kind, r.runtime, r.published_version) for r in reasons] == [
        (RefusalKind.REGRESSION, "tflite-runtime", 4)
    ]
    assert [str(r) for r in reasons] == [
        "holdout top-1 on tflite-runtime 2.14.0 is 89.5%, below the published version 4's 91.0% "
        "on the same images by more than export.tolerance_pts = 0.5 points"
    ]


def _hits(labels: np.ndarray, wrong: list[int]) -> np.ndarray:
    """Predictions equal to ``labels`` except at ``wrong``."""
    predicted = labels.copy()
    predicted[wrong] = (labels[wrong] + 1) % 3
    return predicted


def test_a_drop_past_the_limit_that_is_a_few_images_of_a_small_holdout_is_not_refused():
    """3 images of 260 are 1.2 points: past max_drop_pts, yet McNemar's p = 1/8, not evidence of a worse model."""
    from daemon.export.gates import Baseline, Holdout, RefusalKind, judge
    from daemon.export.verification import RuntimeReport

    limits = Settings.load(None).export
    labels = np.arange(260) % 3
    float_predicted = _hits(labels, list(range(0, 30)))  # the float model misses 30
    holdout = Holdout(labels, float_predicted)
    float_top1 = float((float_predicted == labels).mean())

    def report(wrong: list[int]) -> RuntimeReport:
        predicted = _hits(labels, wrong)
        top1 = float((predicted == labels).mean())
        return RuntimeReport("tflite-runtime", "2.14.0", top1, None, 1.0, False, "uint8", predicted=tuple(predicted))

    noise = report(list(range(0, 30)) + [100, 101, 102])  # misses the float model's 30 and 3 more
    verdict = judge([noise], float_top1, None, limits, holdout)
    assert verdict.refusals == []
    [passed] = verdict.within_chance
    assert (passed.kind, passed.lost, passed.gained, round(passed.p_value, 3)) == (
        RefusalKind.ACCURACY_DROP,
        3,
        0,
        0.125,
    )
    assert "within chance at export.refusal_significance = 0.05" in str(passed)
    # On its point figure alone (significance 1), the same candidate is refused, as it was before the test.
    strict = limits.model_copy(update={"refusal_significance": 1.0})
    assert [r.kind for r in judge([noise], float_top1, None, strict, holdout).refusals] == [RefusalKind.ACCURACY_DROP]

    worse = report(list(range(0, 30)) + list(range(100, 108)))  # 8 more misses, none gained: p = 1/256
    [refusal] = judge([worse], float_top1, None, limits, holdout).refusals
    assert (refusal.lost, refusal.gained) == (8, 0) and refusal.p_value < 0.005
    assert "beyond chance" in str(refusal) and "McNemar" in str(refusal)
    # Against the published version: the same paired evidence on its kept per-image hits.
    published_right = _hits(labels, list(range(0, 30))) == labels
    published = Baseline(3, {"tflite-runtime": float(published_right.mean())}, 0, {"tflite-runtime": published_right})
    verdict = judge([noise], float_top1, published, limits, holdout)
    assert verdict.refusals == [] and [r.kind for r in verdict.within_chance] == [
        RefusalKind.ACCURACY_DROP,
        RefusalKind.REGRESSION,
    ]
    assert [r.kind for r in judge([worse], float_top1, published, limits, holdout).refusals] == [
        RefusalKind.ACCURACY_DROP,
        RefusalKind.REGRESSION,
    ]
    # Swapped gains and losses (as many fixed as broken) never count as evidence.
    swapped = report(list(range(3, 30)) + [100, 101, 102, 103, 104, 105])
    assert judge([swapped], float_top1, None, limits, holdout).refusals == []


def test_mcnemar_tail_is_the_exact_binomial():
    from daemon.export.significance import binomial_tail

    assert binomial_tail(0, 5) == 1.0 and binomial_tail(6, 5) == 0.0
    assert abs(binomial_tail(5, 7) - 29 / 128) < 1e-12
    assert abs(binomial_tail(10, 11) - 12 / 2048) < 1e-12
    assert 0.0 < binomial_tail(1600, 3000) < 0.001  # large counts stay finite


def test_a_burst_of_flipped_labels_does_not_get_a_worse_model_published(tmp_path: Path):
    """30% of a window mislabelled (every class-0 image in it called class-1): the model learns it, the gates hold it back."""
    # Replay off: the window is all the learner sees, so the burst reliably makes it worse. With replay
    # (the default) the learner often rides such a burst out; the gates are for when it does not.
    learner, reader = make_learner(tmp_path, stream([0, 1, 2], 40, seed=36, order="iid"), replay_ratio=0.0)
    learn_all(learner, reader)
    checkpoint.save(tmp_path / "checkpoints", learner.state())
    settings = Settings.load(
        None,
        {"state_dir": str(tmp_path), "model": {"backbone": "tiny", "input_size": 32}, "training": {"mode": "head"}},
    )
    first = export_once(settings)
    assert first.published is not None and first.published["version"] == 1, first.reasons

    window = [(c, i) for c, n in ((0, 12), (1, 14), (2, 14)) for i in range(n)]
    assert sum(c == 0 for c, _ in window) / len(window) == 0.3  # the share of wrong labels
    window = [window[k] for k in np.random.default_rng(37).permutation(len(window))]
    burst = [
        Example(
            f"burst-{c}-{i}",
            "class-1" if c == 0 else f"class-{c}",
            "train",
            "image/jpeg",
            32,
            32,
            colour_jpeg(c, 3_700_000 + c * 1000 + i),
            0.0,
        )
        for c, i in window
    ]
    store = Store(tmp_path / "examples.db")
    store.commit(burst)
    store.close()
    learn_all(learner, reader)
    checkpoint.save(tmp_path / "checkpoints", learner.state())
    second = export_once(settings)

    # The model really is worse, on the very holdout images version 1 was scored on: the refusal below is
    # the gate catching a worse model, not holding back one as good as the published one.
    before, after = first.metrics["holdout_top1_float"], second.metrics["holdout_top1_float"]
    assert second.metrics["holdout_examples"] == first.metrics["holdout_examples"]
    assert after <= before - 0.2, (before, after)
    assert second.published is None
    kinds = {r.kind for r in second.reasons}
    assert "regression" in kinds and kinds <= {"regression", "accuracy_drop"}, second.reasons
    registry = Registry.open_readonly(registry_root(tmp_path), "plant-disease")
    assert registry.versions() == [1] and latest_manifest(registry)["version"] == 1


def test_a_mode_refused_for_its_accuracy_drop_rests_for_some_exports(tmp_path: Path):
    from daemon.export.lossy_modes import LossyModes

    state = learned_state(tmp_path)
    settings = Settings.load(
        None,
        {
            "state_dir": str(state),
            "model": {"backbone": "tiny", "input_size": 32},
            "training": {"mode": "head"},
            "export": {"skip_lossy_mode_for": 2},
        },
    )
    # What an export leaves after int8 lost too much against float (the tiny model's int8 does not).
    rest = LossyModes(state)
    rest.refused_for_accuracy("int8", settings.export.skip_lossy_mode_for)
    rest.save()
    first = export_once(settings)
    assert first.skipped == ("int8",) and first.published is not None
    assert first.published["quantization"] == "fp16"
    assert LossyModes(state).resting("int8") == 1
    second = export_once(settings)
    assert second.skipped == ("int8",) and second.published is not None
    assert second.published["quantization"] == "fp16"
    assert LossyModes(state).resting("int8") == 0
    third = export_once(settings)  # rested: tried again, and it passes
    assert third.skipped == () and third.published is not None
    assert third.published["quantization"] == "int8"
    events = Registry.open_readonly(registry_root(state), "plant-disease").events()
    assert [e["quantization"] for e in events if e.get("event") == "published"] == ["fp16", "fp16", "int8"]


def test_lossy_mode_bookkeeping(tmp_path: Path):
    from daemon.export.lossy_modes import LossyModes

    root = tmp_path
    rest = LossyModes(root)
    rest.refused_for_accuracy("int8", 3)
    rest.refused_for_accuracy("dynamic", 0)  # 0: never rests
    rest.save()
    again = LossyModes(root)
    assert (again.resting("int8"), again.resting("dynamic")) == (3, 0)
    again.skipped("int8")
    again.tried("int8")  # tried and passed, or refused for another reason: no more rest
    assert again.resting("int8") == 0
    (root / "export-cache" / "lossy-modes.json").write_text("{not json")
    assert LossyModes(root).resting("int8") == 0  # unreadable: every mode is tried


def test_a_patched_int8_candidate_that_loses_accuracy_is_converted_again_in_full(tmp_path: Path):
    """A kept int8 conversion whose activation ranges no longer fit (calibrated on a first model's few examples)
    costs one refused patched candidate, not the mode: the same export converts in full and ships int8."""
    import hashlib

    from daemon.export.flatbuffer import read_model, write_model

    state = learned_state(tmp_path)
    code, first, err = export(state)
    assert code == 0 and first["published"] == 1 and first["metrics"]["conversion"] == "full", err
    kept = state / "export-cache" / "conversions"
    model = read_model((kept / "int8.tflite").read_bytes())
    for tensor in model.subgraphs[0].tensors:  # every activation's range 50 times too narrow: saturated
        q = tensor.quantization
        if model.buffers[tensor.buffer].data is None and q is not None and q.scale is not None and len(q.scale) == 1:
            q.scale = [float(q.scale[0]) / 50]
    narrowed = write_model(model)
    (kept / "int8.tflite").write_bytes(narrowed)
    doc = json.loads((kept / "int8.json").read_text())
    (kept / "int8.json").write_text(json.dumps({**doc, "sha256": hashlib.sha256(narrowed).hexdigest()}))
    code, second, err = export(state)
    assert code == 0 and second["published"] == 2, second.get("rejected_because", err)
    assert second["metrics"]["conversion"] == "full"
    registry = Registry.open_readonly(registry_root(state), "plant-disease")
    assert latest_manifest(registry)["quantization"] == "int8"
    rejected = [e for e in registry.events() if e.get("event") == "rejected"]
    assert [e["candidate"]["metrics"]["conversion"] for e in rejected] == ["patched"]
    assert {r["kind"] for r in rejected[0]["refusals"]} >= {"accuracy_drop"}
