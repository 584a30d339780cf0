"""/metrics and the status page of a real, learning daemon; the page rendered by a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from daemon.registry import Registry, registry_root
from helpers import wait_for
from test_daemon_learning import LEARNING, publish_colours

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def learning_daemon(broker, daemon_factory):
    env = {**LEARNING, "SPROUT_EXPORT__EVERY_EXAMPLES": "60", "SPROUT_EXPORT__EVERY_SECONDS": "3600",
           "SPROUT_EXPORT__QUANTIZATION": '["fp16"]', "SPROUT_EXPORT__RUNTIMES": '["ai-edge-litert"]'}
    d = daemon_factory(broker.url, env=env).start()
    publish_colours(broker.url, 120, 300.0)
    # One message without a label: rejected, counted by reason.
    mqtt_publish.single("sprout/leaves/examples", b"\xff\xd8\xff", qos=1, hostname="127.0.0.1", port=broker.port,
                        protocol=5)

    def latest():
        try:
            return Registry.open_readonly(registry_root(d.state), "leaves").latest()
        except Exception:
            return None

    manifest = wait_for(lambda: (m := latest()) and m, 120, "a published version")
    yield d, manifest
    assert d.stop() == 0


def test_metrics_report_what_the_daemon_did(learning_daemon):
    d, manifest = learning_daemon
    # The version is in the registry as soon as the export process published it; the daemon counts it when
    # that process has reported back.
    m = wait_for(lambda: (m := metrics(d.http_port)) and m.get(("sprout_learner_backlog", ())) == 0
                 and m.get(("sprout_exports_published_total", ())) and m, 60, "the learner to catch up")
    assert m[("sprout_examples_stored_total", ())] == 120
    # The holdout share (store.holdout_fraction) is scored, not trained on.
    assert 90 <= m[("sprout_examples_learned_total", ())] < 120, m
    assert m[("sprout_examples_rejected_total", (("reason", "missing_label"),))] == 1
    assert m[("sprout_model_version", ())] >= manifest["version"]
    assert m[("sprout_exports_published_total", ())] >= 1
    assert m[("sprout_training_steps_total", ())] > 0 and m[("sprout_classes", ())] == 3
    assert m[("sprout_training_steps_nonfinite_total", ())] == 0 and m[("sprout_divergence_restores_total", ())] == 0
    assert 0.0 <= m[("sprout_prequential_accuracy", ())] <= 1.0
    assert m[("sprout_broker_connected", ())] == 1.0
    assert m[("sprout_export_seconds_total", ())] > 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="scripts/setup.sh installs Debian's chromium")
def test_the_status_page_renders_in_chromium_with_numbers_and_charts(learning_daemon, tmp_path: Path):
    d, manifest = learning_daemon
    url = f"http://127.0.0.1:{d.http_port}/"
    # Let the history sample a few points (every 5 s) while learning goes on.
    publish_colours(d.broker_url, 60, 100.0, first=120)
    wait_for(lambda: (page := urllib.request.urlopen(url, timeout=5).read().decode()) and 'data-series="prequential"'
             in page, 60, "the accuracy chart to have two points")
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,1600"]
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
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100) & (pixels[..., 1] > 90) & (pixels[..., 1] < 160)
    assert blue.sum() > 50, "no chart line in the screenshot"  # the prequential line; the bars are green
