"""The learner inside the real daemon: it follows the feed, checkpoints, and resumes after SIGKILL with nothing skipped."""

from __future__ import annotations

import sqlite3
import threading
import time

import torch

from daemon import checkpoint
from daemon.feeder import Publisher
from helpers import stored_ids, wait_for
from test_learner import colour_jpeg

LEARNING = {
    "SPROUT_TRAINING__ENABLED": "true",
    "SPROUT_TRAINING__BATCH_SIZE": "8",
    "SPROUT_TRAINING__LEARNING_RATE": "0.1",
    "SPROUT_TRAINING__CHECKPOINT_EVERY_S": "0.3",
    "SPROUT_TRAINING__HOLDOUT_EVERY_STEPS": "5",
}


def publish_colours(url: str, n: int, rate: float, first: int = 0) -> None:
    with Publisher(url) as pub:
        started = time.monotonic()
        for i in range(first, first + n):
            delay = started + (i - first) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            c = i % 3
            pub.publish("sprout/leaves/examples", colour_jpeg(c, i), f"colour-{c}", "image/jpeg", f"c-{i}")
        assert pub.wait_all_acked(30)


def last_checkpoint(d) -> dict | None:
    try:
        return checkpoint.load(d.state / "checkpoints")
    except checkpoint.CheckpointError:
        return None


def test_learner_resumes_after_sigkill_from_its_checkpoint_with_nothing_skipped(broker, daemon_factory):
    d = daemon_factory(broker.url, env=LEARNING).start()
    assert d.health()[1].get("learner") is True
    n = 360
    feeder = threading.Thread(target=publish_colours, args=(broker.url, n, 120.0))
    feeder.start()
    mid = wait_for(lambda: (c := last_checkpoint(d)) and c["high_water_mark"] > 30 and c, 30, "a first checkpoint")
    d.kill()
    assert feeder.is_alive(), "the stream ended before the kill; slow the feed"
    d.start()
    feeder.join(60)
    wait_for(lambda: len(stored_ids(d.state)) == n, 30, f"{n} stored")
    wait_for(lambda: (c := last_checkpoint(d)) and c["high_water_mark"] >= n and c, 60, "the learner to catch up")
    assert d.stop() == 0
    final = checkpoint.load(d.state / "checkpoints")
    db = sqlite3.connect(d.state / "examples.db")
    train = db.execute("SELECT COUNT(*) FROM examples WHERE split = 'train'").fetchone()[0]
    max_seq = db.execute("SELECT MAX(seq) FROM examples").fetchone()[0]
    assert final["high_water_mark"] == max_seq
    assert final["trained"] == train  # every train example learned exactly once in the resumed history
    assert final["prequential"]["seen"] == train
    assert final["step"] > mid["step"]
    assert sorted(final["labels"]) == ["colour-0", "colour-1", "colour-2"]
    assert final["prequential"]["correct"] / train > 0.6  # it learned from the feed
    assert final["holdout"]["accuracy"] is not None
    assert "resumed at step" in d.log()
    assert isinstance(final["head"]["weight"], torch.Tensor)


def test_the_daemon_publishes_signed_verified_models_as_it_learns(broker, daemon_factory):
    from daemon.registry import Registry, registry_root
    from daemon.signing import verify, verify_file

    env = {**LEARNING, "SPROUT_EXPORT__EVERY_EXAMPLES": "100", "SPROUT_EXPORT__EVERY_SECONDS": "3600"}
    d = daemon_factory(broker.url, env=env).start()
    assert d.health()[1].get("exporter") is True

    def latest():
        try:
            return Registry.open_readonly(registry_root(d.state), "leaves").latest()
        except Exception:
            return None

    publish_colours(broker.url, 150, 300.0)
    wait_for(lambda: (m := latest()) and m["version"] >= 1, 120, "a first published version")
    publish_colours(broker.url, 150, 300.0, first=150)  # more learning: a second export
    manifest = wait_for(lambda: (m := latest()) and m["version"] >= 2 and m, 120, "a second published version")
    assert d.stop() == 0
    registry = Registry.open_readonly(registry_root(d.state), "leaves")
    verify(manifest, d.state / "signing" / "signing.pub")
    verify_file(manifest, registry.model_path(manifest["version"]).read_bytes())
    assert manifest["metrics"]["examples_trained"] >= 100
    assert sorted(manifest["labels"]) == ["colour-0", "colour-1", "colour-2"]
    assert "published version" in d.log()
