"""``sprout demo``: the daemon on the default configuration, fed live with Fashion-MNIST, learning as it goes.

Uses the broker of the default config (127.0.0.1:1883) when one answers,
otherwise starts a private Mosquitto under the state directory. Feeds
Fashion-MNIST class-incrementally (one class after another) while a device,
sprout-edge's watch, follows the published models over the daemon's HTTP API
and MQTT notice. Prints the status page's address, a progress line (fed,
stored, learned, prequential and holdout accuracy; redrawn every second on a
terminal, every 10 s into a pipe), a line per published version (size,
accuracy) and per installed one on the device, and, once the learner and the
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
from daemon.registry.signing import Signer
from daemon.service.daemon import Daemon
from daemon.service.status import latest_manifest, learning_status
from daemon.service.status import pct as _pct
from daemon.store.reader import open_reader, stats
from daemon.tools.broker import Mosquitto, reachable
from daemon.tools.datasets import DatasetError, arrange, fashion_mnist_samples, iter_encoded
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


def _learner_summary(training: Any) -> dict[str, Any]:
    if training.learner.holdout_index:  # a fresh evaluation, on the learner's thread: it owns the learner's connections
        training.on_learner_thread(training.learner.evaluate_holdout)
    lr = learning_status(training)
    return {
        "backbone": lr.backbone,
        "mode": lr.mode,
        "steps": lr.steps,
        "learned": lr.learned,
        "classes": list(lr.classes),
        "prequential_accuracy": lr.prequential_overall,
        "prequential_accuracy_recent": lr.prequential,
        "holdout_accuracy": lr.holdout,
        "holdout_per_class": lr.holdout_per_class,
        "average_forgetting": lr.average_forgetting,
    }


class DemoDevice(threading.Thread):
    """A phone in the field: ``sprout-edge sync --watch`` against the daemon, told of new models by the notice."""

    def __init__(self, settings: Settings, address: str, terminal: Terminal):
        super().__init__(name="sprout-demo-device", daemon=True)
        self.settings = settings
        self.terminal = terminal
        self.url = f"http://{address}"
        self.folder = settings.state_dir / "device"
        self.public_key = settings.signing.resolved_key_file(settings.state_dir).with_suffix(".pub")
        self.stop_event = threading.Event()

    def run(self) -> None:
        from edge.sync import COMPLETED, FAILED
        from edge.watch import watch

        said = {"waiting": False}

        def on_event(event: Any) -> None:
            if event.kind == COMPLETED:
                self.terminal.say(f"device: installed version {event.version} ({event.total / 1e6:.2f} MB), verified")
            elif event.kind == FAILED and event.version is None:
                if not said["waiting"]:  # before the first publish every poll fails alike: say it once
                    said["waiting"] = True
                    self.terminal.say("device: no model published yet; waiting for the notice")
            elif event.kind == FAILED:
                self.terminal.say(f"device: refused version {event.version}: {event.reason}")

        s = self.settings
        watch(
            self.url,
            s.model.name,
            self.folder,
            self.public_key,
            on_event=on_event,
            mqtt_url=s.mqtt.broker,
            topic_prefix=s.mqtt.topic_prefix,
            interval_s=30.0,
            stop=self.stop_event,
        )

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15.0)


def _device(device: DemoDevice, photos: int = 200) -> dict[str, Any]:
    """The device's view at the end: its model (one last sync first), then its top-1 on unseen photos.

    The photos are Fashion-MNIST's test set, which the daemon never saw, encoded as an app sends them.
    """
    from edge.model import EdgeModel
    from edge.sync import sync

    device.stop()
    folder, public_key, url = device.folder, device.public_key, device.url
    result = sync(url, device.settings.model.name, folder, public_key)
    if not result.ok:
        return {"synced": False, "reason": result.reason}
    model = EdgeModel.load(folder, public_key=public_key)
    samples = arrange(fashion_mnist_samples("t10k"), "iid", None, seed=1, limit=photos)
    right = sum(
        model.predict(payload, 1)[0][0] == sample.label for sample, payload, _ in iter_encoded(samples, 224, "jpeg")
    )
    return {
        "synced_from": url,
        "folder": str(folder),
        "version": model.version,
        "quantization": model.manifest["quantization"],
        "runtime": f"{model.runtime} {model.session.version}",
        "test_photos": len(samples),
        "top1_on_device": right / len(samples),
        "try": f"sprout-edge classify --dir {folder} PHOTO.jpg",
    }


def _report_exports(d: Daemon, state: dict[str, Any], terminal: Terminal) -> None:
    """One line per version published, with its size and accuracy, and one per refused export."""
    exporting = d.exporting
    if exporting is None:
        return
    published = exporting.latest_published
    if published is not None and published["version"] != state["announced"]:
        state["announced"] = published["version"]
        m = published["metrics"]
        on = ", ".join(f"{runtime} {_pct(top1)}" for runtime, top1 in m["holdout_top1"].items())
        terminal.say(
            f"demo: published version {published['version']}: {published['quantization']}, "
            f"{published['files']['model.tflite']['size'] / 1e6:.2f} MB, {len(published['labels'])} classes, "
            f"holdout top-1 {on} (float {_pct(m['holdout_top1_float'])})"
        )
    if exporting.rejected != state["rejected"] and exporting.last is not None:
        state["rejected"] = exporting.rejected
        terminal.say(f"demo: export refused: {'; '.join(str(r) for r in exporting.last.reasons)}")


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
    terminal.say(f"demo: the daemon's log is {_shown(log_file)}; only its warnings and errors show here")
    broker = None
    if not reachable(settings.mqtt.host, settings.mqtt.port):
        broker = Mosquitto(settings.state_dir / "broker").start()
        terminal.say(f"demo: no broker at {settings.mqtt.broker}; started a private Mosquitto at {broker.url}")
        settings = Settings.load(None, {**overrides, "mqtt": {"broker": broker.url}})
    daemon = Daemon(settings)
    feeder = DemoFeed(
        settings.mqtt.broker, settings.mqtt.examples_topic(settings.model.name), args.limit, args.rate, args.order
    )
    # The key pair now, not at the first publish: the device needs the public key from the start.
    Signer.load_or_create(settings.signing.resolved_key_file(settings.state_dir))
    state: dict[str, Any] = {
        "last": 0.0,
        "stored": 0,
        "finished": False,
        "started": time.monotonic(),
        "device": None,
        "announced": None,
        "rejected": 0,
    }

    def on_tick(d: Daemon) -> None:
        if not feeder.is_alive() and not feeder.done.is_set() and d.feed is not None and d.feed.subscribed.is_set():
            if d.http_address is not None:
                terminal.say(f"demo: status page at http://{d.http_address}/ (metrics at /metrics)")
                state["device"] = DemoDevice(settings, d.http_address, terminal)
                state["device"].start()
            feeder.start()
        _report_exports(d, state, terminal)
        now = time.monotonic()
        if now - state["last"] < 1.0:
            return
        status = d.status()
        intake, lr, training = status.intake, status.learning, d.training
        assert intake is not None  # the main loop ticks once the daemon has started
        r = feeder.report
        rate = (intake.stored - state["stored"]) / (now - state["last"]) if state["last"] else 0.0
        # This run's intake ("new", "again"): the feed's examples, however many the state folder held before.
        line = (
            f"demo: fed {r.acked}/{args.limit} | stored {intake.stored} new ({rate:.0f}/s), {intake.duplicates} again"
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
        terminal.progress(line)
        state["last"], state["stored"] = now, intake.stored
        handled = intake.stored + intake.duplicates + intake.rejected_total
        caught_up = lr is None or (lr.backlog == 0 and lr.high_water_mark > 0)
        if caught_up and d.exporting is not None and lr is not None:
            # ... and the last model published covers everything learned.
            caught_up = not d.exporting.busy and d.exporting.exported_learned >= lr.learned
        timed_out = now - state["started"] > args.max_seconds
        if timed_out and not state["finished"]:
            terminal.say(f"demo: {args.max_seconds:.0f} s are up: summary of where it stands")
        if (timed_out or (feeder.done.is_set() and handled >= r.acked and caught_up)) and not state["finished"]:
            state["finished"] = True
            terminal.say(line)  # where it ended, kept on the screen
            if feeder.error is not None:
                terminal.say(f"demo: the feed failed: {feeder.error}")
            summary: dict[str, Any] = {
                "feed": r.as_dict(),
                "store": stats(open_reader(settings.state_dir / "examples.db")),
            }
            if training is not None:
                summary["learner"] = _learner_summary(training)
            if d.exporting is not None:
                last = d.exporting.last
                latest = latest_manifest(settings)  # this run's, or an earlier run's in the same state folder
                summary["export"] = {
                    "published": d.exporting.published,
                    "rejected": d.exporting.rejected,
                    "latest_version": latest["version"] if latest else None,
                    "last_export": None
                    if last is None
                    else {
                        "published": bool(last.published),
                        "rejected_because": [str(r) for r in last.reasons],
                        "metrics": last.metrics,
                    },
                }
            if state["device"] is not None:
                summary["device"] = _device(state["device"])
            summary["seconds"] = round(now - state["started"], 1)
            summary_file = settings.state_dir / "demo-summary.json"
            write_atomic(summary_file, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
            if args.json:
                print(json.dumps(summary, indent=2, ensure_ascii=False), flush=True)
            else:
                print("\n".join(_readable(summary, summary_file, log_file)), flush=True)
            state["failure"] = _failure(d, summary, timed_out, args.max_seconds)
            if not args.keep_running:
                d.should_exit.set()

    try:
        code = daemon.run(on_tick=on_tick)
    finally:
        # The device first (Ctrl-C, or the summary already did): a thread still inside an interpreter
        # or paho's loop when Python exits aborts the process.
        if state["device"] is not None:
            state["device"].stop()
        if broker is not None:
            broker.stop()
    if feeder.error is not None:
        code = 66 if isinstance(feeder.error, DatasetError) else 69
    elif code == 0 and state.get("failure"):
        # The loop did not reach its end: say why in one line, and let a script (or CI) see it.
        terminal.say(f"demo: FAILED: {state['failure']}")
        code = 1
    return code


def _failure(d: Daemon, summary: dict[str, Any], timed_out: bool, max_seconds: float) -> str | None:
    """Why the demo's loop did not complete (no verified model on the device at the end), or None when it did."""
    late = f" within --max-seconds {max_seconds:.0f}" if timed_out else ""
    if d.exporting is None:
        return "no model can be published: training.enabled and export.enabled must both be true"
    if summary.get("export", {}).get("latest_version") is None:  # none in the registry, from this run or before
        why = "; ".join(d.exporting.last.reasons) if d.exporting.last is not None and d.exporting.last.reasons else ""
        return f"no model was published{late}" + (
            f" (last export refused: {why})" if why else " (see demo.log in the state folder)"
        )
    device = summary.get("device")
    if device is None:
        return "no device followed the models: server.enabled must be true"
    if not device.get("version"):
        return f"the device holds no verified model: {device.get('reason', 'unknown')}"
    return None


def _shown(path: Path) -> str:
    """A path as the person typed their way to it: relative to where they stand when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _readable(summary: dict[str, Any], summary_file: Path, log_file: Path) -> list[str]:
    """The summary in a few lines a person reads; the whole of it is in ``summary_file``."""
    feed, store = summary["feed"], summary["store"]
    splits = store["per_split"]
    lines = [
        f"Sprout demo, {summary['seconds']:.0f} s:",
        f"  fed      {feed['acked']} Fashion-MNIST photos; stored {store['total']} ({splits.get('train', 0)} to learn, "
        f"{splits.get('holdout', 0)} held out), rejected {store['rejected_total']}",
    ]
    learner = summary.get("learner")
    if learner:
        lines.append(
            f"  learned  {learner['learned']} examples in {learner['steps']} steps ({learner['backbone']}, "
            f"{learner['mode']} mode): {len(learner['classes'])} classes, holdout top-1 "
            f"{_pct(learner['holdout_accuracy'])}, prequential {_pct(learner['prequential_accuracy'])}"
        )
    export = summary.get("export")
    if export:
        earlier = (
            " (this state folder's, from an earlier run: nothing new to learn)"
            if (export["latest_version"] and not export["published"])
            else ""
        )
        lines.append(
            f"  models   {export['published']} published, {export['rejected']} refused by the gates; "
            f"latest version {export['latest_version'] or '-'}{earlier}"
        )
    device = summary.get("device")
    if device and device.get("version"):
        lines.append(
            f"  device   version {device['version']} ({device['quantization']}) on {device['runtime']}: "
            f"top-1 {_pct(device['top1_on_device'])} on {device['test_photos']} photos it never saw"
        )
        lines.append(f"  try      sprout-edge classify --dir {_shown(Path(device['folder']))} PHOTO.jpg")
    elif device:
        lines.append(f"  device   no verified model: {device.get('reason', 'unknown')}")
    lines.append(f"  details  {_shown(summary_file)} (all figures), {_shown(log_file)} (the daemon's log)")
    return lines
