"""/metrics and the status page of a real, learning daemon, before and after a restart; the page rendered by a
real headless Chromium."""

from __future__ import annotations

import doctest
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
from helpers import LEARNING, metrics, publish_colours, wait_for
from learning_helpers import saved_checkpoint, stream
from PIL import Image

import daemon.learning.curves
import daemon.service.status
from daemon.common.settings import Settings
from daemon.learning import checkpoint
from daemon.learning.training import Training
from daemon.registry.versions import Registry, registry_root
from daemon.store.examples import Store

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.read().decode()


def shown(html: str, element_id: str) -> str:
    """The text of the page's element with this id."""
    found = re.search(f'id="{element_id}">([^<]*)<', html)
    assert found, f"no element with id {element_id!r} on the page"
    return found.group(1)


def chart(html: str, name: str) -> str:
    found = re.search(f'<(svg|p) id="chart-{name}".*?</(svg|p)>', html, re.DOTALL)
    assert found, f"no chart {name!r} on the page"
    return found.group(0)


@pytest.fixture
def learning_daemon(broker, daemon_factory):
    env = {
        **LEARNING,
        "SPROUT_EXPORT__ENABLED": "true",
        "SPROUT_EXPORT__EVERY_EXAMPLES": "60",
        "SPROUT_EXPORT__EVERY_SECONDS": "3600",
        "SPROUT_EXPORT__QUANTIZATION": '["fp16"]',
        "SPROUT_EXPORT__RUNTIMES": '["ai-edge-litert"]',
    }
    d = daemon_factory(broker.url, env=env).start()
    publish_colours(broker.url, 120, 300.0)
    # One message without a label: rejected, counted by reason.
    mqtt_publish.single(
        "sprout/leaves/examples", b"\xff\xd8\xff", qos=1, hostname="127.0.0.1", port=broker.port, protocol=5
    )

    def latest():
        try:
            return Registry.open_readonly(registry_root(d.state), "leaves").latest()
        except Exception:
            return None

    manifest = wait_for(lambda: (m := latest()) and m, 120, "a published version")
    yield d, manifest
    assert d.stop() == 0


def test_metrics_and_the_page_report_what_the_daemon_did_and_still_do_after_a_restart(learning_daemon):
    d, manifest = learning_daemon
    # The version is in the registry as soon as the export process published it; the daemon counts it when
    # that process has reported back.
    m = wait_for(
        lambda: (
            (m := metrics(d.http_port))
            and m.get(("sprout_learner_backlog", ())) == 0
            and m.get(("sprout_exports_total", (("outcome", "published"),)))
            and m
        ),
        60,
        "the learner to catch up",
    )
    assert m[("sprout_examples_stored_total", ())] == 120
    # The holdout share (store.holdout_fraction) is scored, not trained on.
    assert 90 <= m[("sprout_examples_learned_total", ())] < 120, m
    assert m[("sprout_examples_rejected_total", (("reason", "missing_label"),))] == 1
    assert m[("sprout_model_version", ())] >= manifest["version"]
    assert m[("sprout_exports_total", (("outcome", "published"),))] >= 1
    assert m[("sprout_exports_total", (("outcome", "failed"),))] == 0
    assert m[("sprout_training_steps_total", ())] > 0 and m[("sprout_classes", ())] == 3
    assert m[("sprout_training_steps_nonfinite_total", ())] == 0 and m[("sprout_divergence_restores_total", ())] == 0
    assert 0.0 <= m[("sprout_prequential_accuracy_ratio", ())] <= 1.0
    assert m[("sprout_broker_connected", ())] == 1.0
    exported = m[("sprout_export_duration_seconds_count", ())]
    assert exported >= 1 and m[("sprout_export_duration_seconds_sum", ())] > 0
    assert m[("sprout_export_duration_seconds_bucket", (("le", "+Inf"),))] == exported
    build = [labels for name, labels in m if name == "sprout_build_info"]
    assert len(build) == 1 and dict(build[0])["torch"].startswith("2.13.0"), build
    assert m[("process_resident_memory_bytes", ())] > 0 and m[("process_cpu_seconds_total", ())] > 0
    assert m[("sprout_store_examples", ())] == 120

    # A restart on the same state: totals come from the store; the learner's figures, its last holdout
    # evaluation and the curves from its checkpoint. First the chart up to where learning stands.
    learned = int(m[("sprout_examples_learned_total", ())])
    before = wait_for(
        lambda: (p := page(d.http_port)) and f">{learned} learned<" in p and p,
        30,
        "the chart to reach the examples learned",
    )
    assert shown(before, "stored") == "120" and shown(before, "rejected") == "1"
    assert shown(before, "holdout") != "-"
    assert d.stop() == 0
    d.start()
    after = page(d.http_port)
    assert shown(after, "stored") == "120" and shown(after, "rejected") == "1"
    assert shown(after, "stored-since-start") == "0"
    for figure in ("learned", "prequential", "holdout"):
        assert shown(after, figure) == shown(before, figure), figure
    assert after.count('class="class"') == 3  # the holdout accuracy of each class
    for name in ("accuracy", "loss"):
        assert chart(after, name) == chart(before, name) and chart(after, name).startswith("<svg"), name
    again = metrics(d.http_port)
    assert again[("sprout_store_examples", ())] == 120
    assert again[("sprout_examples_stored_total", ())] == 0  # a counter of this process, as Prometheus expects
    for name in (
        "sprout_examples_learned_total",
        "sprout_training_steps_total",
        "sprout_holdout_accuracy_ratio",
        "sprout_prequential_accuracy_ratio",
        "sprout_training_loss",
    ):
        assert again[(name, ())] == m[(name, ())], name
    assert (
        again[("sprout_holdout_class_accuracy_ratio", (("label", "colour-0"),))]
        == m[("sprout_holdout_class_accuracy_ratio", (("label", "colour-0"),))]
    )


def test_an_evaluation_between_steps_and_the_curves_reach_the_checkpoint_and_older_checkpoints_load(tmp_path: Path):
    store = Store(tmp_path / "examples.db")
    store.commit(stream([0, 1, 2], 10, seed=5, order="iid"))
    store.close()
    # The learner's thread, not started: its steps run here, one at a time.
    settings = Settings.load(
        None,
        {
            "state_dir": str(tmp_path),
            "model": {"backbone": "tiny", "input_size": 32},
            "training": {"mode": "head", "device": "cpu", "batch_size": 4, "holdout_every_steps": 1000},
        },
    )
    training = Training(settings.model, settings.training, settings.state_dir)
    training.observe()  # as the learner's loop does: a point before learning, one after
    for _ in range(5):
        training.learn(training.reader.after(training.learner.high_water_mark, 4))
    assert training.learner.holdout_index
    training.observe(force=True)
    assert training.save() is not None
    assert saved_checkpoint(training.checkpoints).holdout["accuracy"] is None  # not evaluated in a step
    # What the demo's summary does before it stops the daemon: an evaluation between two steps.
    training.learner.evaluate_holdout()
    assert training.save() is not None
    saved = saved_checkpoint(training.checkpoints)
    assert saved.holdout["accuracy"] == training.learner.holdout.accuracy is not None
    assert saved.curves is not None and len(saved.curves) == 2
    assert training.save() is None  # nothing new: no write
    resumed = Training(settings.model, settings.training, settings.state_dir)
    assert resumed.learner.holdout.state() == training.learner.holdout.state()
    assert resumed.learner.last_loss == training.learner.last_loss is not None
    assert resumed.curves.points() == training.curves.points()
    # A checkpoint written before the curves and the last loss were saved in it.
    payload = saved.to_payload()
    del payload["curves"], payload["last_loss"]
    checkpoint.save_payload(training.checkpoints, payload)
    older = Training(settings.model, settings.training, settings.state_dir)
    assert older.learner.step == 5 and older.learner.holdout.accuracy == saved.holdout["accuracy"]
    assert older.curves.points() == () and older.learner.last_loss is None


def test_the_status_and_curves_examples_run():
    for module in (daemon.service.status, daemon.learning.curves):
        assert doctest.testmod(module).failed == 0, module.__name__


@pytest.mark.skipif(shutil.which("chromium") is None, reason="scripts/setup.sh installs Debian's chromium")
def line_width(page: str, series: str) -> float:
    """How wide the chart's line of ``series`` is drawn, in px; 0 while it has no line."""
    found = re.search(f'data-series="{series}"[^>]*points="([^"]*)"', page)
    if not found:
        return 0.0
    xs = [float(pair.split(",")[0]) for pair in found.group(1).split()]
    return max(xs) - min(xs)


def test_the_status_page_renders_in_chromium_with_numbers_and_charts(learning_daemon, tmp_path: Path):
    d, manifest = learning_daemon
    url = f"http://127.0.0.1:{d.http_port}/"
    # Let the history sample a few points (every 5 s) while learning goes on.
    publish_colours(d.broker_url, 60, 100.0, first=120)
    wait_for(
        lambda: line_width(urllib.request.urlopen(url, timeout=5).read().decode(), "prequential") >= 60,
        90,
        "the accuracy chart's line to span 60 px",
    )
    chromium = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1000,1600",
    ]
    dom = subprocess.run([*chromium, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    version = int(page.split('id="model-version">', 1)[1].split("<", 1)[0])
    assert version >= manifest["version"]
    assert page.count('class="class"') == 3  # a per-class row for each colour
    assert '<polyline class="series" data-series="prequential"' in page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    out = subprocess.run([*chromium, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    # Something was drawn: a blank or error page is one colour; the chart's lines are blue.
    assert pixels.std() > 10
    # The accuracy chart's lines: prequential blue, holdout orange, drawn over it where both are the same
    # (both reach 100% on three colours, and then the blue is hidden). The per-class bars are green.
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blue = (b > 150) & (r < 100) & (g > 90) & (g < 160)
    orange = (r > 180) & (g > 100) & (g < 160) & (b < 90)
    # The x axis starts at the history's first point, before any prediction was scored, so an early line is
    # short (a 2-point line at the right edge measured 19 blue and 20 orange pixels): the wait above lets it
    # span 60 px first.
    assert blue.sum() + orange.sum() > 25, "no chart line in the screenshot"
