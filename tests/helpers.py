"""Helpers shared by the tests: small real images, a QoS 1 publisher, waiting on a condition, the daemon and
sprout-edge as real processes, and the fast learning settings the daemon tests share.

Test modules never import one another (tests/test_architecture.py checks it): what two of them share lives here,
in learning_helpers.py (the learner in-process), registry_helpers.py, systemd_socket.py, or as a fixture in
conftest.py."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import paho.mqtt.client as mqtt
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from daemon.store.reader import open_reader
from daemon.tools.broker import free_port
from daemon.tools.feeder import Publisher

if TYPE_CHECKING:
    from daemon.learning.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
SPROUT = [sys.executable, "-m", "daemon.cli"]
TFLITE_VENV = REPO / ".venv-tflite"  # sprout-edge on tflite-runtime, without torch (scripts/setup.sh makes it)

# The learner on, fast: small batches, a high learning rate, frequent checkpoints and holdout scores. Exports stay
# off (each costs CPU for seconds); a test that wants them turns them on with "SPROUT_EXPORT__ENABLED": "true".
LEARNING = {
    "SPROUT_TRAINING__ENABLED": "true",
    "SPROUT_TRAINING__BATCH_SIZE": "8",
    "SPROUT_TRAINING__LEARNING_RATE": "0.1",
    "SPROUT_TRAINING__CHECKPOINT_EVERY_S": "0.3",
    "SPROUT_TRAINING__HOLDOUT_EVERY_STEPS": "5",
    "SPROUT_EXPORT__ENABLED": "false",
}

# Distinct colours per class: random conv features of the tiny backbone separate them.
PALETTE = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 210)]


def jpeg(seed: int, size: int = 32, quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def colour_jpeg(class_index: int, seed: int, size: int = 32) -> bytes:
    """A photo of one colour of ``PALETTE`` with noise: what the tests' classes look like."""
    rng = np.random.default_rng(seed)
    base = np.array(PALETTE[class_index], dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 35, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def publish_examples(
    url: str,
    model: str,
    ids: list[str],
    labels: list[str],
    rate: float = 0.0,
    images: Iterable[bytes] | None = None,
) -> Publisher:
    """Publish one example per id at QoS 1, ``rate`` a second (0: as fast as the window allows), and wait until the
    broker acked them all. ``images`` gives each id's photo; by default a small noise JPEG seeded by the id."""
    if images is None:
        images = (jpeg(zlib.crc32(example_id.encode())) for example_id in ids)
    with Publisher(url, window=128) as pub:
        started = time.monotonic()
        for i, (example_id, label, image) in enumerate(zip(ids, labels, images, strict=True)):
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            pub.publish(f"sprout/{model}/examples", image, label, "image/jpeg", example_id)
        assert pub.wait_all_acked(30.0), pub.report
    assert pub.report.acked == len(ids), pub.report.as_dict()
    return pub


def publish_colours(url: str, n: int, rate: float = 0.0, first: int = 0) -> Publisher:
    """Examples ``c-<i>`` for i from ``first``: a photo of colour i % 3, labelled ``colour-<i % 3>``."""
    seeds = range(first, first + n)
    return publish_examples(
        url,
        "leaves",
        [f"c-{i}" for i in seeds],
        [f"colour-{i % 3}" for i in seeds],
        rate,
        (colour_jpeg(i % 3, i) for i in seeds),
    )


@contextmanager
def rejection_notices(broker_port: int, model: str = "leaves") -> Iterator[list[dict]]:
    """The JSON notices the daemon publishes on ``sprout/<model>/rejected``, collected while the block runs."""
    notices: list[dict] = []
    listener = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    listener.on_message = lambda c, u, m: notices.append(json.loads(m.payload))
    listener.connect("127.0.0.1", broker_port)
    listener.subscribe(f"sprout/{model}/rejected", qos=1)
    listener.loop_start()
    time.sleep(0.3)  # the SUBACK: a notice published before it would be missed
    try:
        yield notices
    finally:
        listener.loop_stop()
        listener.disconnect()


def stored_ids(state: Path) -> list[str]:
    db_path = state / "examples.db"
    if not db_path.exists():
        return []
    db = open_reader(db_path)
    try:
        return [row[0] for row in db.query("SELECT example_id FROM examples ORDER BY seq")]
    finally:
        db.close()


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    """The daemon's /metrics, parsed: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def last_checkpoint(d: DaemonProcess) -> Checkpoint | None:
    """The learner's last checkpoint in the daemon's state folder, or None while there is none."""
    from daemon.learning import checkpoint  # torch: only for the tests that read one

    try:
        return checkpoint.load(d.state / "checkpoints")
    except checkpoint.CheckpointError:
        return None


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def latest_published(state: Path, model: str = "leaves") -> dict | None:
    """The registry's latest manifest, or None before the first publish."""
    from daemon.registry.versions import Registry, registry_root

    try:
        return Registry.open_readonly(registry_root(state), model).latest()
    except Exception:
        return None


class DaemonProcess:
    """``sprout run`` as a child process, as systemd would run it."""

    def __init__(
        self,
        broker_url: str,
        state: Path,
        model: str = "leaves",
        config: Path | None = None,
        env=None,
        prefix: list[str] | None = None,
    ):
        self.prefix = prefix or []  # a wrapper command, e.g. nsenter into a mount namespace
        self.broker_url = broker_url
        self.state = state
        self.model = model
        self.config = config
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "SPROUT_MQTT__RECONNECT_MIN_S": "0.2",
            "SPROUT_MQTT__RECONNECT_MAX_S": "1",
            "SPROUT_LOGGING__PROGRESS_EVERY_S": "1",
            # Ingest tests leave the learner off; learning tests turn it on, on the tiny backbone.
            "SPROUT_TRAINING__ENABLED": "false",
            "SPROUT_MODEL__BACKBONE": "tiny",
            "SPROUT_MODEL__INPUT_SIZE": "32",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = state.parent / f"{state.name}-daemon.log"
        self._log: TextIO | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        args = [
            *self.prefix,
            *SPROUT,
            "run",
            "--broker",
            self.broker_url,
            "--state",
            str(self.state),
            "--model",
            self.model,
        ]
        args += ["--http", f"127.0.0.1:{self.http_port}"]
        if self.config:
            args += ["--config", str(self.config)]
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        if wait_ready:
            wait_for(self.ready, 30.0, f"the daemon to subscribe (log: {self.log_path})", 0.05)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return self.health()[0] == 200

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
        except OSError:
            return 0, {}

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # the daemon writes every thread's stack into its log
            time.sleep(1)
            raise AssertionError(
                f"the daemon did not stop within {timeout_s:.0f} s of SIGTERM; its threads:\n{self.log()[-12000:]}"
            ) from None
        assert self._log is not None  # start() opened it with the process
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text()


def sprout_edge(*args) -> list[str]:
    """The device client's command line, run on this interpreter (ai-edge-litert)."""
    return [sys.executable, "-m", "edge.cli", *map(str, args)]


class Watching:
    """``sprout-edge sync --watch`` as a child process, its log in a file."""

    def __init__(self, log: Path, *args):
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen(
            sprout_edge("sync", "--watch", *args), stdout=self.out, stderr=subprocess.STDOUT, cwd=REPO, text=True
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            self.out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
