"""``sprout demo``: the daemon on the default configuration, fed live with Fashion-MNIST.

Uses the broker of the default config (127.0.0.1:1883) when one answers,
otherwise starts a private Mosquitto under the state directory. Prints a
progress line every second and a summary from the store at the end.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from daemon import logs
from daemon.broker import Mosquitto, reachable
from daemon.datasets import DatasetError, arrange, fashion_mnist_samples, iter_encoded
from daemon.feeder import FeedReport, Publisher, feed
from daemon.service import Daemon
from daemon.settings import Settings
from daemon.store import open_reader, stats

log = logging.getLogger("sprout.demo")


class DemoFeed(threading.Thread):
    def __init__(self, broker: str, topic: str, limit: int, rate: float):
        super().__init__(name="sprout-demo-feed", daemon=True)
        self.broker, self.topic, self.limit, self.rate = broker, topic, limit, rate
        self.report = FeedReport()
        self.error: Exception | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            samples = arrange(fashion_mnist_samples("train"), "iid", None, seed=0, limit=self.limit)
            with Publisher(self.broker) as publisher:
                self.report = publisher.report
                feed(publisher, self.topic, iter_encoded(samples, 224, "jpeg"), len(samples), self.rate, progress=False)
        except (DatasetError, ConnectionError, OSError) as err:
            self.error = err
        finally:
            self.done.set()


def run_demo(args: Any) -> int:
    overrides: dict[str, Any] = {"logging": {"progress_every_s": 3600.0}}  # the demo prints its own progress
    if args.state:
        overrides["state_dir"] = args.state
    if args.broker:
        overrides["mqtt"] = {"broker": args.broker}
    settings = Settings.load(None, overrides)
    logs.configure(settings.logging.level, settings.logging.format)
    broker = None
    if not reachable(settings.mqtt.host, settings.mqtt.port):
        broker = Mosquitto(settings.state_dir / "broker").start()
        log.info("no broker at %s; started a private Mosquitto at %s", settings.mqtt.broker, broker.url)
        settings = Settings.load(None, {**overrides, "mqtt": {"broker": broker.url}})
    daemon = Daemon(settings)
    feeder = DemoFeed(settings.mqtt.broker, settings.mqtt.examples_topic(settings.model.name), args.limit, args.rate)
    state = {"last": 0.0, "stored": 0, "finished": False}

    def on_tick(d: Daemon) -> None:
        if not feeder.is_alive() and not feeder.done.is_set() and d.feed is not None and d.feed.subscribed.is_set():
            feeder.start()
        now = time.monotonic()
        if now - state["last"] < 1.0:
            return
        intake = d.intake
        r = feeder.report
        rate = (intake.stored - state["stored"]) / (now - state["last"]) if state["last"] else 0.0
        print(
            f"demo: fed {r.acked}/{args.limit} | stored {intake.stored} new, {intake.duplicates} again | "
            f"rejected {intake.rejected_total} | {rate:.0f} ex/s | backlog {d.feed.deliveries.qsize()}",
            file=sys.stderr,
            flush=True,
        )
        state["last"], state["stored"] = now, intake.stored
        handled = intake.stored + intake.duplicates + intake.rejected_total
        if feeder.done.is_set() and handled >= r.acked and not state["finished"]:
            state["finished"] = True
            if feeder.error is not None:
                print(f"demo: the feed failed: {feeder.error}", file=sys.stderr)
            summary = stats(open_reader(settings.state_dir / "examples.db"))
            print(json.dumps({"feed": r.as_dict(), "store": summary}, indent=2, ensure_ascii=False))
            if not args.keep_running:
                d.should_exit.set()

    try:
        code = daemon.run(on_tick=on_tick)
    finally:
        if broker is not None:
            broker.stop()
    if feeder.error is not None:
        return 66 if isinstance(feeder.error, DatasetError) else 69
    return code
