"""Devices' photos through the learner's backbone: the most unlike the stored photos go up the labelling queue, and
sample photos of what the training set lacks show as drift (daemon/learning/drift.py, field_scout.py)."""

from __future__ import annotations

import base64
import doctest
import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import colour_jpeg, wait_for
from learning_helpers import stream

import daemon.learning.drift
from daemon.common.settings import FieldSettings, Settings
from daemon.ingest.field_photos import PhotoLimits, parse_field_photo
from daemon.learning.drift import drift_test, novelty
from daemon.learning.field_scout import FieldScout
from daemon.learning.training import Training
from daemon.store.examples import Store
from daemon.store.labelling import PhotoRules
from daemon.store.records import FieldPhoto

LIMITS = PhotoLimits(1_000_000, 50_000_000, 50_000_000, 64)
RULES = PhotoRules(per_device_per_day=1000, max_queued=1000)


def field_photo(colour: int, n: int, kind: str = "sample", top1: float = 0.5) -> FieldPhoto:
    doc = {
        "device": f"phone-{n % 7}",
        "photo_id": f"{kind}-{colour}-{n}",
        "kind": kind,
        "version": 1,
        "guesses": [{"label": "class-0", "score": top1}],
        "content_type": "image/jpeg",
        "image": base64.b64encode(colour_jpeg(colour, seed=50_000 + colour * 1000 + n)).decode(),
    }
    item = parse_field_photo(json.dumps(doc).encode(), LIMITS)
    assert isinstance(item, FieldPhoto), item
    return item


def test_the_statistics_hold_their_documented_examples():
    assert doctest.testmod(daemon.learning.drift).failed == 0


def test_the_drift_test_rarely_flags_an_unchanged_field_and_always_a_moved_one():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 32))

    def photos(n: int, kinds: list[int]) -> np.ndarray:
        return centres[rng.choice(kinds, n)] + rng.normal(size=(n, 32)) * 0.6

    unchanged = [drift_test(photos(40, [0, 1, 2]), photos(120, [0, 1, 2]), 0, 200, seed=i).p_value for i in range(40)]
    moved = [drift_test(photos(40, [0, 1, 3]), photos(120, [0, 1, 2]), 0, 200, seed=i).p_value for i in range(10)]
    assert sum(p < 0.01 for p in unchanged) <= 3  # ~1% expected; 3 of 40 would be very unlucky
    assert all(p < 0.01 for p in moved)
    assert novelty(np.zeros((3, 4)), np.ones((1, 4))).tolist() == [0.5, 0.5, 0.5]  # nothing stored: nothing known


@pytest.fixture
def trained(tmp_path: Path):
    """A started learner that learned three colours, its store, and a scout over both."""
    state = tmp_path / "var"
    store = Store(state / "examples.db")
    examples = stream([0, 1, 2], 20, seed=1)
    store.commit(examples)
    settings = Settings.load(
        None,
        {
            "state_dir": str(state),
            "model": {"name": "leaves", "backbone": "tiny", "input_size": 32},
            "training": {"mode": "head", "device": "cpu", "batch_size": 8, "learning_rate": 0.1},
        },
    )
    training = Training(settings.model, settings.training, settings.state_dir)
    training.start()
    learned = sum(e.split == "train" for e in examples)
    wait_for(lambda: training.learner.trained >= learned, 60, "the learner to learn the stored examples")
    scout = FieldScout(store, training, FieldSettings(drift_min_photos=20), seed=0)
    yield store, scout
    training.stop(time.monotonic() + 30)
    store.close()


def test_an_unlike_photo_goes_up_the_queue_and_samples_of_a_new_kind_show_as_drift(trained):
    store, scout = trained
    store.commit([], [], [], [field_photo(0, 1, "unsure", 0.5), field_photo(4, 1, "unsure", 0.5)], RULES)
    store.commit([], [], [], [field_photo(c, n) for n in range(10) for c in (0, 1, 2)], RULES)
    while scout.score():
        pass
    queue, _ = store.labelling_queue(100)
    unsure = {p.id: p for p in queue if p.kind.value == "unsure"}
    known, new = sorted(unsure.values(), key=lambda p: p.id)
    assert new.novelty is not None and known.novelty is not None and new.novelty > 0.9 > known.novelty
    assert queue[0].id == new.id  # same uncertainty: the unlike photo comes first
    assert scout.scored == 32 and store.unscored_photos(10) == []

    first = scout.test_drift()
    assert first is not None and first.field_photos == 30 and not first.drifted(0.01), first
    store.commit([], [], [], [field_photo(c, n) for n in range(20) for c in (4, 5)], RULES)
    while scout.score():
        pass
    moved = scout.test_drift()
    assert moved is not None and moved.field_photos == 70 and moved.drifted(0.01) and moved.mmd2 > first.mmd2, moved


def test_without_enough_samples_drift_waits_and_says_why(trained):
    store, scout = trained
    store.commit([], [], [], [field_photo(0, n, "unsure") for n in range(25)], RULES)  # unsure ones are no sample
    while scout.score():
        pass
    assert scout.test_drift() is None
    assert scout.drift_waiting is not None and "0 sample photos" in scout.drift_waiting
