"""int8 head distillation: the classifier refitted on the int8 backbone's embeddings towards the float head's outputs.

The fit on made-up embeddings; the sample of stored examples it uses; and
`sprout export` end to end on the tiny network with enough stored examples,
where a patched export reuses the embeddings kept at the full conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import export
from learning_helpers import learn_all, make_learner, stream

from daemon.export import images as stored
from daemon.export.head_patch import Head
from daemon.export.int8_head import L2, DistillationSample, distilled
from daemon.learning import checkpoint
from daemon.store.examples import Store
from daemon.store.reader import StoreReader


def cross_entropy(targets: np.ndarray, logits: np.ndarray) -> float:
    return float(-(targets * torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()).sum(axis=1).mean())


def test_the_distilled_head_follows_the_float_head_on_int8_embeddings_more_closely_than_it_started():
    rng = np.random.default_rng(0)
    n, size, classes = 600, 32, 5
    floats = rng.normal(size=(n, size)).astype(np.float32)
    # An int8 backbone's error: a mean per channel (which bias correction takes out) and a part that scales
    # with the embedding (which it cannot).
    quantized = (floats * rng.uniform(0.7, 1.3, size) + rng.normal(0, 0.2, size=(n, size))).astype(np.float32)
    weight = rng.normal(size=(classes, size)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)
    float_head = Head(weight, bias, np.zeros((1, classes), np.float32))
    targets = torch.softmax(torch.from_numpy(floats @ weight.T + bias), dim=1).numpy()
    out = distilled(float_head, float_head, DistillationSample(floats, quantized, n))
    before = cross_entropy(targets, quantized @ weight.T + bias)
    after = cross_entropy(targets, quantized @ out.weight.T + out.bias)
    assert after < 0.9 * before
    agree = lambda w, b: ((quantized @ w.T + b).argmax(1) == targets.argmax(1)).mean()  # noqa: E731
    assert agree(out.weight, out.bias) > agree(weight, bias)
    # Held near the float weights; the output range is the starting head's.
    assert np.abs(out.weight - weight).max() < 1.0 and L2 > 0
    assert out.calibration_logits is float_head.calibration_logits


def test_the_distillation_sample_is_class_balanced_and_stays_put_as_the_store_grows(tmp_path: Path):
    first = stream([0, 1, 2], 50, seed=3, order="iid")
    store = Store(tmp_path / "examples.db")
    store.commit(first)
    reader = StoreReader(tmp_path / "examples.db")
    sample = stored.distillation_sample(reader, reader.high_water_mark(), 60)
    labels = dict(reader.labels_up_to(reader.high_water_mark(), "train"))
    assert len(sample) == 60 and sorted(labels[s] for s in sample).count("class-1") == 20
    assert set(sample) <= set(labels)  # training examples only, never the holdout
    store.commit(stream([0, 1, 2], 50, seed=4, order="iid"))  # as many again
    grown = stored.distillation_sample(reader, reader.high_water_mark(), 60)
    # A hash order: about half of the sample is kept (a new example takes a place only with a smaller hash),
    # where a fresh random draw would keep about a quarter.
    assert len(set(sample) & set(grown)) >= 20
    assert stored.distillation_sample(reader, reader.high_water_mark(), 0) == []
    assert set(stored.decoded(reader, grown[:5], 32)) == set(grown[:5])
    reader.close()
    store.close()


def int8_export(state: Path, **env: str) -> tuple[dict, str]:
    code, result, log = export(state, SPROUT_EXPORT__QUANTIZATION='["int8"]', **env)
    assert code == 0, log
    return result, log


@pytest.mark.timeout(600)
def test_an_int8_export_distils_its_classifier_and_a_patched_one_reuses_the_kept_embeddings(tmp_path: Path):
    learner, reader = make_learner(tmp_path, stream([0, 1, 2], 130, seed=8, order="iid"))  # 312 to train on
    learn_all(learner, reader)
    checkpoint.save(tmp_path / "checkpoints", learner.state())
    first, log = int8_export(tmp_path)
    assert first["published"] == 1
    metrics = first["metrics"]
    # The float backbone runs on at most a quarter of the sample per export, and never on fewer than the
    # 300 a distillation needs: 300 of the 312 now.
    assert metrics["conversion"] == "full" and metrics["int8_distillation_examples"] == 300
    assert metrics["int8_bias_correction_logits"] >= 0
    assert "(300 images run now" in log
    kept = tmp_path / "export-cache" / "embeddings"
    assert {p.name for p in kept.glob("distillation-*.npz")} == {"distillation-float.npz", "distillation-int8.npz"}
    second, log = int8_export(tmp_path)
    # Patched: nothing is run (it would cost freshness); the 300 kept are used.
    assert second["metrics"]["conversion"] == "patched"
    assert second["metrics"]["int8_distillation_examples"] == 300
    assert "(0 images run now" in log
    third, log = int8_export(tmp_path, SPROUT_EXPORT__FULL_CONVERSION_EVERY="1")
    # Converted again: the same bytes as the first (same network, same calibration), so the same sha256 and
    # its kept int8 embeddings; both backbones run on the 12 left, and the distillation sees all 312.
    assert third["metrics"]["conversion"] == "full" and third["metrics"]["int8_distillation_examples"] == 312
    assert "(12 images run now" in log
    # Off: the bias-corrected classifier alone.
    fourth, _ = int8_export(tmp_path, SPROUT_EXPORT__INT8_DISTILLATION_EXAMPLES="0")
    assert "int8_distillation_examples" not in fourth["metrics"]
    assert "int8_bias_correction_logits" in fourth["metrics"]


def test_a_patched_export_distils_on_every_kept_pair_even_as_the_sample_moves(tmp_path: Path):
    """The sample moved by two examples since the full conversion embedded 300: all 300 pairs still count."""
    from daemon.export.head_verification import Embeddings
    from daemon.export.int8_head import distillation_sample

    rng = np.random.default_rng(3)
    embedded = list(range(300))
    Embeddings(tmp_path, "distillation-float").save(
        "frozen", {"float": {s: rng.normal(size=8).astype(np.float32) for s in embedded}}, embedded
    )
    Embeddings(tmp_path, "distillation-int8").save(
        "base", {"ai-edge-litert": {s: rng.normal(size=8).astype(np.float32) for s in embedded}}, embedded
    )

    def nothing_runs(*_):
        raise AssertionError("a patched export decodes and runs nothing")

    sample = distillation_sample(
        list(range(2, 302)),  # two examples left the sample, two new ones entered
        nothing_runs,
        nothing_runs,
        "frozen",
        b"",
        "base",
        tmp_path,
        "ai-edge-litert",
        None,
        10.0,
        float_budget=0,
        int8_now=False,
    )
    assert sample is not None and len(sample.int8_embeddings) == 300 and sample.computed == 0
