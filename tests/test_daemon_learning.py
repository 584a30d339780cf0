"""The learner inside the real daemon: it follows the feed, checkpoints, and resumes after SIGKILL with nothing skipped."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
import urllib.request

import pytest
import torch
from helpers import (
    LEARNING,
    TFLITE_VENV,
    Watching,
    colour_jpeg,
    last_checkpoint,
    latest_published,
    publish_colours,
    stored_ids,
    wait_for,
)

from daemon.learning import checkpoint


def test_learner_resumes_after_sigkill_from_its_checkpoint_with_nothing_skipped(broker, daemon_factory):
    d = daemon_factory(broker.url, env=LEARNING).start()
    assert d.health()[1].get("learner") is True
    n = 360
    feeder = threading.Thread(target=publish_colours, args=(broker.url, n, 120.0), daemon=True)
    feeder.start()
    mid = wait_for(lambda: (c := last_checkpoint(d)) and c.high_water_mark > 30 and c, 30, "a first checkpoint")
    d.kill()
    assert feeder.is_alive(), "the stream ended before the kill; slow the feed"
    d.start()
    feeder.join(60)
    wait_for(lambda: len(stored_ids(d.state)) == n, 30, f"{n} stored")
    wait_for(lambda: (c := last_checkpoint(d)) and c.high_water_mark >= n and c, 60, "the learner to catch up")
    assert d.stop() == 0
    final = checkpoint.load(d.state / "checkpoints")
    db = sqlite3.connect(d.state / "examples.db")
    train = db.execute("SELECT COUNT(*) FROM examples WHERE split = 'train'").fetchone()[0]
    max_seq = db.execute("SELECT MAX(seq) FROM examples").fetchone()[0]
    assert final.high_water_mark == max_seq
    assert final.trained == train  # every train example learned exactly once in the resumed history
    assert final.prequential["seen"] == train
    assert final.step > mid.step
    assert sorted(final.labels) == ["colour-0", "colour-1", "colour-2"]
    assert final.prequential["correct"] / train > 0.6  # it learned from the feed
    assert final.holdout["accuracy"] is not None
    assert "resumed at step" in d.log()
    assert isinstance(final.head["weight"], torch.Tensor)


def test_the_whole_loop_learns_publishes_and_reaches_a_device_that_classifies(broker, daemon_factory, tmp_path):
    """Examples over MQTT -> learner -> export -> signed registry -> HTTP and notice -> sprout-edge -> a label."""
    from daemon.registry.signing import verify, verify_file
    from daemon.registry.versions import Registry, registry_root
    from edge.modeldir import ModelDir

    env = {
        **LEARNING,
        "SPROUT_EXPORT__ENABLED": "true",
        "SPROUT_EXPORT__EVERY_EXAMPLES": "100",
        "SPROUT_EXPORT__EVERY_SECONDS": "3600",
    }
    d = daemon_factory(broker.url, env=env).start()
    assert d.health()[1].get("exporter") is True

    publish_colours(broker.url, 150, 300.0)
    wait_for(lambda: (m := latest_published(d.state)) and m["version"] >= 1, 120, "a first published version")
    device = tmp_path / "device"
    # The device polls only hourly: version 2 can reach it within the test only through the daemon's notice.
    watcher = Watching(
        tmp_path / "watch.log",
        "--url",
        f"http://127.0.0.1:{d.http_port}",
        "--model",
        "leaves",
        "--dir",
        device,
        "--public-key",
        d.state / "signing" / "signing.pub",
        "--interval",
        "3600",
        "--mqtt",
        broker.url,
    )
    try:
        first = latest_published(d.state)["version"]
        wait_for(lambda: ModelDir(device).current() == first, 30, f"the device's first model ({watcher.log})")
        publish_colours(broker.url, 150, 300.0, first=150)  # more learning: a second export
        manifest = wait_for(
            lambda: (m := latest_published(d.state)) and m["version"] > first and m, 120, "a second published version"
        )
        wait_for(
            lambda: ModelDir(device).current() == manifest["version"],
            30,
            f"the notice to bring the device version {manifest['version']} (log: {watcher.log.read_text()})",
        )
        assert watcher.stop() == 0
    finally:
        watcher.kill()
    registry = Registry.open_readonly(registry_root(d.state), "leaves")
    v = manifest["version"]
    verify(registry.document(v), registry.signature(v), d.state / "signing" / "signing.pub")
    verify_file(manifest, registry.model_path(manifest["version"]).read_bytes())
    assert manifest["metrics"]["examples_trained"] >= 100
    assert sorted(manifest["labels"]) == ["colour-0", "colour-1", "colour-2"]
    assert "published version" in d.log()
    # The device classifies new photos with what it holds, on tflite-runtime, without torch.
    photos = []
    for c in range(3):
        photos.append(tmp_path / f"colour-{c}.jpg")
        photos[-1].write_bytes(colour_jpeg(c, 10_000 + c))
    edge = str(TFLITE_VENV / "bin" / "sprout-edge")
    out = subprocess.run(
        [edge, "classify", "--dir", str(device), "--top", "1", "--json", "--report", *map(str, photos)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["version"] == manifest["version"] and answer["runtime"]["name"] == "tflite-runtime"
    assert [r["top"][0]["label"] for r in answer["results"]] == ["colour-0", "colour-1", "colour-2"], answer
    # The user opted in: the next sync reports the load and the three predictions, and the daemon shows them.
    url = f"http://127.0.0.1:{d.http_port}"
    out = subprocess.run(
        [edge, "sync", "--url", url, "--model", "leaves", "--dir", str(device), "--insecure", "--report"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "report 1 counted" in out.stderr, out.stderr
    v = manifest["version"]
    wait_for(lambda: f'sprout_field_predictions{{version="{v}"}} 3.0' in metrics(url), 25, "the report in the metrics")
    scores = [r["top"][0]["score"] for r in answer["results"]]
    mean = next(
        line for line in metrics(url).splitlines() if line.startswith(f'sprout_field_mean_confidence{{version="{v}"}}')
    )
    assert float(mean.split()[1]) == pytest.approx(sum(scores) / 3, abs=1e-4)
    assert d.stop() == 0


def test_a_new_daemon_publishes_its_first_model_soon_on_the_default_cadence(broker, daemon_factory):
    """export.every_examples (2,000) and every_seconds (600) by default: the first model still comes early."""
    from daemon.common.settings import Settings
    from daemon.registry.versions import Registry, registry_root

    defaults = Settings().export
    assert (defaults.every_examples, defaults.every_seconds) == (2000, 600.0)
    d = daemon_factory(broker.url, env={**LEARNING, "SPROUT_EXPORT__ENABLED": "true"}).start()
    publish_colours(broker.url, 300, 300.0)
    started = time.monotonic()
    manifest = wait_for(
        lambda: Registry.open_readonly(registry_root(d.state), "leaves").latest(),
        150,
        f"a first published version (log: {d.log_path})",
    )
    assert time.monotonic() - started < defaults.every_seconds / 2
    assert manifest["metrics"]["examples_trained"] >= defaults.first_model_examples
    assert manifest["metrics"]["examples_trained"] < defaults.every_examples
    assert d.stop() == 0


def metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        return r.read().decode()
