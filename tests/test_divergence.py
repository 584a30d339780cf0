"""Divergence guards on the tiny network: a non-finite step is skipped, a run of them or non-finite weights
go back to the last good checkpoint, and a non-finite state is never checkpointed (so never exported)."""

from __future__ import annotations

from pathlib import Path

import torch
from learning_helpers import saved_checkpoint, stream

from daemon.common.settings import Settings
from daemon.export.job import ExportJob
from daemon.export.pipeline import _restored
from daemon.learning import checkpoint
from daemon.learning.learner import Learner
from daemon.learning.training import Training
from daemon.store.examples import Store


def settings_for(tmp_path: Path, **training) -> Settings:
    return Settings.load(
        None,
        {
            "state_dir": str(tmp_path),
            "model": {"backbone": "tiny", "input_size": 32},
            "training": {"mode": "head", "device": "cpu", "batch_size": 4, "learning_rate": 0.1, **training},
        },
    )


def training_on(tmp_path: Path, examples, **training) -> Training:
    """The learner's thread, not started: its steps run on the test's thread, one at a time."""
    store = Store(tmp_path / "examples.db")
    store.commit(examples)
    store.close()
    settings = settings_for(tmp_path, **training)
    return Training(settings.model, settings.training, settings.state_dir)


def step(training: Training) -> None:
    training.learn(training.reader.after(training.learner.high_water_mark, training.settings.batch_size))


def poison_learning_rate(learner: Learner) -> None:
    """What an overflowing update does: the loss is finite, the weights after the step are not."""
    for group in learner.optimizer.param_groups:
        group["lr"] = float("nan")


def test_non_finite_weights_after_a_step_go_back_to_the_checkpoint_bit_for_bit(tmp_path: Path):
    training = training_on(tmp_path, stream([0, 1, 2], 12, seed=41, order="iid"))
    learner = training.learner
    for _ in range(3):
        step(training)
    assert training.save() is not None
    saved = saved_checkpoint(training.checkpoints)
    step(training)
    assert not torch.equal(learner.head.weight.detach(), saved.head["weight"])  # it moved on since
    poison_learning_rate(learner)
    batch = training.reader.after(learner.high_water_mark, 4)
    training.learn(batch)
    assert learner.nonfinite_skipped == 0  # the loss was finite: the guard is on the weights
    assert learner.divergence_restores == 1 and learner.diverged is None
    state = learner.state()
    assert state.labels[: len(saved.labels)] == saved.labels
    for name, tensor in saved.head.items():
        assert torch.equal(state.head[name][: len(tensor)], tensor), name  # the very numbers, bit for bit
    moments = [s["exp_avg"] for s in saved.optimizer["state"].values()]
    assert all(
        torch.equal(a[: len(b)], b)
        for a, b in zip((s["exp_avg"] for s in state.optimizer["state"].values()), moments, strict=True)
    )
    assert all(g["lr"] == 0.1 for g in learner.optimizer.param_groups)  # the poisoned rate went with it
    # The stream position does not go back: the batch that diverged is not learned again.
    assert learner.high_water_mark == max(e.seq for e in batch)
    step(training)
    assert learner.finite() and learner.divergence_restores == 1  # and it learns on from there


def test_repeated_non_finite_losses_go_back_to_the_checkpoint(tmp_path: Path):
    training = training_on(tmp_path, stream([0, 1], 30, seed=42, order="iid"), divergence_restore_after_steps=3)
    learner = training.learner
    for _ in range(3):
        step(training)
    training.save()
    saved = saved_checkpoint(training.checkpoints)
    step(training)
    assert not torch.equal(learner.head.weight.detach(), saved.head["weight"])
    # A frozen backbone weight gone NaN: every new example's embedding (and so every loss) is NaN, while
    # the weights the learner trains stay finite. Nothing but the streak can tell.
    conv = next(p for p in learner.backbone.parameters() if p.dim() == 4)
    good = conv.detach().clone()
    with torch.no_grad():
        conv.fill_(float("nan"))
    for skipped in (1, 2):
        step(training)
        assert learner.nonfinite_skipped == skipped and learner.divergence_restores == 0
    assert not torch.equal(learner.head.weight.detach(), saved.head["weight"])  # skips leave the weights alone
    step(training)
    assert learner.nonfinite_skipped == 3 and learner.divergence_restores == 1
    assert torch.equal(learner.head.weight.detach(), saved.head["weight"])
    assert torch.equal(learner.head.bias.detach(), saved.head["bias"])
    with torch.no_grad():
        conv.copy_(good)
    position = learner.high_water_mark
    step(training)
    assert learner.high_water_mark > position and learner.nonfinite_skipped == 3  # finite again, moving on
    # The NaN embeddings were never cached: replaying those examples now computes them afresh.
    assert learner.cache is not None
    assert all(torch.isfinite(torch.from_numpy(v)).all() for v in learner.cache.get(list(range(1, 61))).values())


def test_with_no_checkpoint_a_diverged_learner_starts_again_from_the_pretrained_weights(tmp_path: Path):
    """In 'full' mode the backbone itself trains: it goes back to exactly what a fresh learner loads."""
    training = training_on(tmp_path / "a", stream([0, 1], 10, seed=43, order="iid"), mode="full")
    learner = training.learner
    for _ in range(2):
        step(training)
    start = Learner(learner.model_settings, learner.settings, tmp_path / "b", learner.reader).backbone.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in learner.backbone.state_dict().items())  # it fine-tuned
    poison_learning_rate(learner)
    step(training)
    assert learner.divergence_restores == 1 and learner.finite()
    assert all(torch.equal(v, start[k]) for k, v in learner.backbone.state_dict().items())
    assert learner.head.num_classes == len(learner.labels) == 2
    step(training)
    assert learner.finite() and learner.last_loss is not None


def test_a_non_finite_state_is_never_checkpointed_so_never_exported(tmp_path: Path):
    training = training_on(tmp_path, stream([0, 1, 2], 12, seed=44, order="iid"))
    learner = training.learner
    for _ in range(3):
        step(training)
    path = training.save()
    assert path is not None
    written = path.read_bytes()
    poison_learning_rate(learner)
    learner.learn_many(training.reader.after(learner.high_water_mark, 4))  # the learner alone: nothing recovers yet
    assert learner.diverged is not None and not learner.finite()
    assert training.save() is None
    assert path.read_bytes() == written  # the last good checkpoint, untouched
    # What an export would convert.
    snapshot = _restored(ExportJob.from_settings(settings_for(tmp_path)), training.reader)
    assert all(torch.isfinite(p).all() for p in snapshot.head.parameters())
    assert snapshot.high_water_mark < learner.high_water_mark
    learner.recover(checkpoint.load(training.checkpoints))
    assert training.save() is not None  # good again: checkpoints resume, with the position moved on
    assert saved_checkpoint(training.checkpoints).high_water_mark == learner.high_water_mark


def test_restores_are_counted_across_a_restart(tmp_path: Path):
    training = training_on(tmp_path, stream([0, 1], 10, seed=45, order="iid"))
    step(training)
    training.save()
    poison_learning_rate(training.learner)
    step(training)
    training.save()
    training.reader.close()
    settings = settings_for(tmp_path)
    again = Training(settings.model, settings.training, settings.state_dir)
    assert again.learner.divergence_restores == 1
