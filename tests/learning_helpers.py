"""The learner in-process on the tiny backbone: a stream of colour examples, a learner over a store of them, and
the loops that feed it, as daemon.learning.training runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import colour_jpeg

from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.ingest.wire import Example
from daemon.learning import checkpoint
from daemon.learning.learner import Learner
from daemon.store.examples import Store
from daemon.store.reader import StoreReader


def stream(classes: list[int], per_class: int, seed: int, order: str = "class-incremental") -> list[Example]:
    """``per_class`` examples of each class (``class-<c>``, a colour of helpers.PALETTE), every fifth one holdout;
    class after class, or shuffled (``order="iid"``)."""
    items = [(c, i) for c in classes for i in range(per_class)]
    rng = np.random.default_rng(seed)
    if order == "iid":
        items = [items[i] for i in rng.permutation(len(items))]
    out = []
    for c, i in items:
        split = "holdout" if i % 5 == 0 else "train"
        data = colour_jpeg(c, seed * 100_000 + c * 1000 + i)
        out.append(Example(f"s{seed}-c{c}-{i}", f"class-{c}", split, "image/jpeg", 32, 32, data, 0.0))
    return out


def make_learner(tmp_path: Path, examples: list[Example], **training) -> tuple[Learner, StoreReader]:
    """A learner on the CPU (head mode, batches of 4 unless ``training`` says otherwise) over a store of
    ``examples`` in ``tmp_path``, and the store's reader."""
    store = Store(tmp_path / "examples.db")
    store.commit(examples)
    store.close()
    reader = StoreReader(tmp_path / "examples.db")
    settings = TrainingSettings(**{"mode": "head", "device": "cpu", "batch_size": 4, "learning_rate": 0.1, **training})
    return Learner(ModelSettings(backbone="tiny", input_size=32), settings, tmp_path, reader), reader


def learn_all(learner: Learner, reader: StoreReader, batch_size: int = 4) -> None:
    """Learn everything the store holds past the learner's high-water mark."""
    while batch := reader.after(learner.high_water_mark, batch_size):
        learner.learn_many(batch)


def drive(learner: Learner, reader: StoreReader, batch_size: int, read_ahead: bool) -> int:
    """The learner's loop as daemon.learning.training runs it; returns how many images the read-aheads should hold
    (without replay: the next batch's train examples, after every step that learned something)."""
    expected = 0
    batch = reader.after(learner.high_water_mark, batch_size)
    while batch:
        upcoming = reader.after(batch[-1].seq, batch_size)
        learner.learn_many(batch, upcoming if read_ahead else ())
        if read_ahead and any(e.split == "train" for e in batch):
            expected += sum(e.split == "train" for e in upcoming)
        batch = upcoming
    return expected


def learned_state(tmp_path: Path) -> Path:
    """A state directory as the daemon leaves it: a store and a checkpoint of a learner trained on colours."""
    learner, reader = make_learner(tmp_path, stream([0, 1, 2], 40, seed=31, order="iid"))
    learn_all(learner, reader)
    checkpoint.save(tmp_path / "checkpoints", learner.state())
    return tmp_path


def saved_checkpoint(folder: Path) -> checkpoint.Checkpoint:
    """The checkpoint saved in ``folder``; the test fails here if there is none."""
    saved = checkpoint.load(folder)
    assert saved is not None, f"{folder}: no checkpoint saved"
    return saved
