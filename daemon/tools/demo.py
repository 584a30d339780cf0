"""``sprout demo``: the daemon on the default configuration, fed live with Fashion-MNIST, learning as it goes.

Uses the broker of the default config (127.0.0.1:1883) when one answers,
otherwise starts a private Mosquitto under the state directory. Feeds
Fashion-MNIST class-incrementally (one class after another) while a device,
sprout-edge's watch, follows the published models over the daemon's HTTP API
and MQTT notice. Prints the status page's address, a progress line (fed,
stored, learned, prequential and holdout accuracy; redrawn every second on a
terminal, every 10 s into a pipe), a line per published version (full and delta
size, accuracy) and per installed one on the device, and, once the learner and the
last export have caught up with the feed (or after ``--max-seconds``), a
summary that ends with the device's top-1 on test photos the daemon never
saw. The daemon's log goes to STATE/demo.log; only its warnings and errors
reach the terminal. Ctrl-C stops it cleanly at any point.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from daemon.common import logs
from daemon.common.settings import Settings
from daemon.registry.layout import RegistryError
from daemon.registry.signing import Signer
from daemon.registry.versions import Registry, registry_root
from daemon.service.daemon import Daemon
from daemon.service.status import IntakeStatus, LearningStatus
from daemon.service.status import pct as _pct
from daemon.store.location import StoreLocation
from daemon.store.reader import open_reader, stats
from daemon.tools.broker import Mosquitto, reachable
from daemon.tools.datasets import DatasetError, arrange, fashion_mnist_samples, iter_encoded
from daemon.tools.demo_device import DemoDevice, device_summary
from daemon.tools.demo_summary import export_summary, failure, learner_summary, readable, shown
from daemon.tools.feeder import FeedReport, Publisher, feed
from edge.atomic import write_atomic

log = logging.getLogger("sprout.demo")


class DemoFeed(threading.Thread):
    def __init__(self, broker: str, topic: str, limit: int, rate: float, order: str):
        super().__init__(name="sprout-demo-feed", daemon=True)
        self.broker, self.topic, self.limit, self.rate, self.order = broker, topic, limit, rate, order
        self.report = FeedReport()
        self.error: Exception | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            # A class-balanced draw of `limit` examples first, then put in order: class-incremental
            # sends all of one class, then the next (the learner grows its head as they come).
            samples = arrange(fashion_mnist_samples("train"), "iid", None, seed=0, limit=self.limit)
            samples = arrange(samples, self.order, None, seed=0, limit=None)
            with Publisher(self.broker) as publisher:
                self.report = publisher.report
                feed(publisher, self.topic, iter_encoded(samples, 224, "jpeg"), len(samples), self.rate, progress=False)
        except (DatasetError, ConnectionError, OSError) as err:
            self.error = err
        finally:
            self.done.set()


class Terminal:
    """The demo's lines on stderr: a progress line (redrawn in place on a terminal, every
    ``PIPE_EVERY_S`` into a pipe or file) and event lines that stay."""

    PIPE_EVERY_S = 10.0

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self._drawn = False
        self._last_plain = 0.0

    def progress(self, line: str) -> None:
        if self.live:
            width = shutil.get_terminal_size().columns
            sys.stderr.write("\r\x1b[K" + line[: width - 1])
            self._drawn = True
        elif time.monotonic() - self._last_plain >= self.PIPE_EVERY_S:
            self._last_plain = time.monotonic()
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def say(self, line: str) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")  # the event takes the progress line's place; the next tick redraws it
            self._drawn = False
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_demo(args: Any) -> int:
    overrides: dict[str, Any] = {
        "logging": {"progress_every_s": 3600.0},  # the demo prints its own progress
        # Publish a model every 1,000 examples learned, and what is left 15 s after the feed ends.
        "export": {"every_examples": 1000, "every_seconds": 15.0},
    }
    if args.state:
        overrides["state_dir"] = args.state
    if args.broker:
        overrides["mqtt"] = {"broker": args.broker}
    if args.log_level:
        overrides["logging"]["level"] = args.log_level
    settings = Settings.load(None, overrides)
    log_file = settings.state_dir / "demo.log"
    logs.native_stderr_to(log_file)
    logs.configure_to_file(log_file, settings.logging.level)
    terminal = Terminal()
    terminal.say(f"demo: the daemon's log is {shown(log_file)}; only its warnings and errors show here")
    broker = None
    if not reachable(settings.mqtt.host, settings.mqtt.port):
        broker = Mosquitto(settings.state_dir / "broker").start()
        terminal.say(f"demo: no broker at {settings.mqtt.broker}; started a private Mosquitto at {broker.url}")
        settings = Settings.load(None, {**overrides, "mqtt": {"broker": broker.url}})
    daemon = Daemon(settings)
    # The key pair now, not at the first publish: the device needs the public key from the start.
    Signer.load_or_create(settings.signing.resolved_key_file(settings.state_dir))
    demo = Demo(args, settings, log_file, terminal)
    try:
        code = daemon.run(on_tick=demo.on_tick)
    finally:
        # The device first (Ctrl-C, or the summary already did): a thread still inside an interpreter
        # or paho's loop when Python exits aborts the process.
        if demo.device is not None:
            demo.device.stop()
        if broker is not None:
            broker.stop()
    return demo.exit_code(code)


class Demo:
    """One run of the demo, driven by the daemon's main loop: each tick starts the feed and the device once
    the daemon receives, reports exports, redraws the progress line and, once everything has caught up
    with the feed (or ``--max-seconds`` are up), prints the summary."""

    def __init__(self, args: Any, settings: Settings, log_file: Path, terminal: Terminal):
        self.args, self.settings, self.log_file, self.terminal = args, settings, log_file, terminal
        self.feeder = DemoFeed(
            settings.mqtt.broker, settings.mqtt.examples_topic(settings.model.name), args.limit, args.rate, args.order
        )
        self.device: DemoDevice | None = None
        self.started = time.monotonic()
        self.last = 0.0  # when the progress line was drawn
        self.stored = 0  # intake's count then
        self.announced: int | None = None  # the last version published, said
        self.rejected = 0  # refused exports, said
        self.finished = False
        self.failure: str | None = None  # why the loop did not reach its end

    def on_tick(self, d: Daemon) -> None:
        self._start_feeding(d)
        self._report_exports(d)
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        status = d.status()
        intake, lr = status.intake, status.learning
        assert intake is not None  # the main loop ticks once the daemon has started
        r = self.feeder.report
        line = self._progress_line(d, intake, lr, r, now)
        self.terminal.progress(line)
        self.last, self.stored = now, intake.stored
        timed_out = now - self.started > self.args.max_seconds
        if self.finished:
            return
        if timed_out:
            self.terminal.say(f"demo: {self.args.max_seconds:.0f} s are up: summary of where it stands")
        if timed_out or (self.feeder.done.is_set() and self._caught_up(d, intake, lr, r)):
            self._finish(d, line, r, now, timed_out)

    def exit_code(self, code: int) -> int:
        """The daemon's exit code, unless the feed failed or the loop did not reach its end."""
        if self.feeder.error is not None:
            return 66 if isinstance(self.feeder.error, DatasetError) else 69
        if code == 0 and self.failure:
            # The loop did not reach its end: say why in one line, and let a script (or CI) see it.
            self.terminal.say(f"demo: FAILED: {self.failure}")
            return 1
        return code

    def _start_feeding(self, d: Daemon) -> None:
        """Once the daemon is subscribed: the status page's address, the device, then the feed."""
        if self.feeder.is_alive() or self.feeder.done.is_set() or d.feed is None or not d.feed.subscribed.is_set():
            return
        if d.http_address is not None:
            self.terminal.say(f"demo: status page at http://{d.http_address}/ (metrics at /metrics)")
            self.device = DemoDevice(self.settings, d.http_address, self.terminal.say)
            self.device.start()
        self.feeder.start()

    def _report_exports(self, d: Daemon) -> None:
        """One line per version published, with its size and accuracy, and one per refused export."""
        exporting = d.exporting
        if exporting is None:
            return
        published = exporting.latest_published
        if published is not None and published["version"] != self.announced:
            self.announced = published["version"]
            m = published["metrics"]
            on = ", ".join(f"{runtime} {_pct(top1)}" for runtime, top1 in m["holdout_top1"].items())
            model_file = published["files"]["model.tflite"]
            # What a phone one version behind downloads instead of the whole file (daemon/registry/deltas.py).
            delta = (model_file.get("deltas") or {}).get(str(published["version"] - 1))
            update = f", delta from {published['version'] - 1} {delta['size'] / 1e3:.1f} kB" if delta else ""
            # A new head written into the kept conversion (daemon/export/head_patch.py), or the whole network.
            how = "new head only" if m.get("conversion") == "patched" else "converted in full"
            last = exporting.last
            took = (
                f" in {last.seconds:.0f} s"
                if last is not None and last.published and last.published["version"] == published["version"]
                else ""
            )
            self.terminal.say(
                f"demo: published version {published['version']}: {published['quantization']} ({how}{took}), "
                f"{model_file['size'] / 1e6:.2f} MB full{update}, {len(published['labels'])} classes, "
                f"holdout top-1 {on} (float {_pct(m['holdout_top1_float'])}), {self._reach(published['version'])}"
            )
        if exporting.rejected != self.rejected and exporting.last is not None:
            self.rejected = exporting.rejected
            self.terminal.say(f"demo: export refused: {'; '.join(str(r) for r in exporting.last.reasons)}")

    def _reach(self, version: int) -> str:
        """Which devices the version goes to: all at once, or the first stage of its rollout (rollout.stages)."""
        try:
            r = Registry.open_readonly(registry_root(self.settings.state_dir), self.settings.model.name).rollout()
        except RegistryError:
            r = None
        if r is not None and r.version == version and r.rolling:
            return f"rolling out: {r.percent:g}% of devices first (stage {r.stage + 1} of {len(r.stages)})"
        if self.settings.rollout.stages:
            return "to every device (a first version; the next roll out in stages)"
        return "to every device at once (rollout.stages empty)"

    def _progress_line(
        self, d: Daemon, intake: IntakeStatus, lr: LearningStatus | None, r: FeedReport, now: float
    ) -> str:
        rate = (intake.stored - self.stored) / (now - self.last) if self.last else 0.0
        # This run's intake ("new", "again"): the feed's examples, however many the state folder held before.
        line = (
            f"demo: fed {r.acked}/{self.args.limit} | stored {intake.stored} new ({rate:.0f}/s), "
            f"{intake.duplicates} again"
        )
        if lr is not None:
            line += (
                f" | learned {lr.learned} (backlog {lr.backlog}) | prequential {_pct(lr.prequential)}"
                f" | holdout {_pct(lr.holdout)} | {len(lr.classes)} classes"
            )
        exporting = d.exporting
        if exporting is not None:
            published = exporting.latest_published
            line += f" | model v{published['version']}" if published else " | model -"
            line += " (exporting)" if exporting.busy else ""
        return line

    @staticmethod
    def _caught_up(d: Daemon, intake: IntakeStatus, lr: LearningStatus | None, r: FeedReport) -> bool:
        """Whether intake has handled all the feed sent, the learner has learned it all and the last model
        published covers everything learned."""
        if intake.stored + intake.duplicates + intake.rejected_total < r.acked:
            return False
        if lr is None:
            return True
        if lr.backlog != 0 or lr.high_water_mark <= 0:
            return False
        return d.exporting is None or (not d.exporting.busy and d.exporting.exported_learned >= lr.learned)

    def _finish(self, d: Daemon, line: str, r: FeedReport, now: float, timed_out: bool) -> None:
        """The summary: printed, written to STATE/demo-summary.json; the daemon stops unless --keep-running."""
        self.finished = True
        self.terminal.say(line)  # where it ended, kept on the screen
        if self.feeder.error is not None:
            self.terminal.say(f"demo: the feed failed: {self.feeder.error}")
        summary = self._summary(d, r, now)
        summary_file = self.settings.state_dir / "demo-summary.json"
        write_atomic(summary_file, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
        if self.args.json:
            print(json.dumps(summary, indent=2, ensure_ascii=False), flush=True)
        else:
            print("\n".join(readable(summary, summary_file, self.log_file)), flush=True)
        self.failure = failure(d, summary, timed_out, self.args.max_seconds)
        if not self.args.keep_running:
            d.should_exit.set()

    def _summary(self, d: Daemon, r: FeedReport, now: float) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "feed": r.as_dict(),
            "store": stats(open_reader(StoreLocation.of_settings(self.settings))),
        }
        if d.training is not None:
            summary["learner"] = learner_summary(d.training)
        if d.exporting is not None:
            summary["export"] = export_summary(d.exporting, self.settings)
        if self.device is not None:
            summary["device"] = device_summary(self.device)
        summary["seconds"] = round(now - self.started, 1)
        return summary
