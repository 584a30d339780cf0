"""Keeping a device's model current for as long as it runs: :func:`edge.sync.sync` on a poll interval, at
once when a retained MQTT notice announces another version, with an exponential, jittered backoff while the
server fails, until SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from edge import field_photos
from edge.modeldir import ModelDir
from edge.sync import STOPPED, Event, current_version, sync
from edge.telemetry import send_report

log = logging.getLogger("sprout.edge.sync")


def watch(
    url: str,
    model: str,
    dir: Path | str,
    public_key: Any = None,
    token: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    *,
    mqtt_url: str | None = None,
    topic_prefix: str = "sprout",
    interval_s: float = 60.0,
    backoff_max_s: float = 300.0,
    runtime: str | None = "auto",
    stop: threading.Event | None = None,
    report: bool = False,
    send_photos: bool = False,
) -> None:
    """Keep ``dir`` current until SIGTERM or SIGINT (or until ``stop`` is set); see the module docstring."""
    Watcher(
        url,
        model,
        dir,
        public_key,
        token,
        on_event,
        mqtt_url=mqtt_url,
        topic_prefix=topic_prefix,
        interval_s=interval_s,
        backoff_max_s=backoff_max_s,
        runtime=runtime,
        stop=stop,
        report=report,
        send_photos=send_photos,
    ).run()


class Watcher:
    """Owns the watch's lifecycle: startup (signals, MQTT), the loop of syncs, an orderly shutdown."""

    HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
    FIRST_BACKOFF_S = 1.0

    def __init__(
        self,
        url: str,
        model: str,
        dir: Path | str,
        public_key: Any = None,
        token: str | None = None,
        on_event: Callable[[Event], None] | None = None,
        *,
        mqtt_url: str | None = None,
        topic_prefix: str = "sprout",
        interval_s: float = 60.0,
        backoff_max_s: float = 300.0,
        runtime: str | None = "auto",
        stop: threading.Event | None = None,
        report: bool = False,
        send_photos: bool = False,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval must be positive seconds, not {interval_s}")
        self.sync_args = dict(
            url=url, model=model, dir=dir, public_key=public_key, token=token, on_event=on_event, runtime=runtime
        )
        self.model = model
        self.folder = ModelDir(dir)
        self.report = report  # after each sync, send the counts of edge/telemetry.py (the user opted in)
        self.send_photos = send_photos  # and the outbox of edge/field_photos.py (opted in too)
        self.mqtt_url = mqtt_url
        self.interval_s = interval_s
        self.backoff_max_s = max(backoff_max_s, self.FIRST_BACKOFF_S)
        self.should_exit = stop if stop is not None else threading.Event()
        self.wake = threading.Event()  # set by a notice or a signal: end the wait early
        self.announced: int | None = None
        self.failures = 0
        self._old_handlers: dict[int, Any] = {}
        self.listener = None
        if mqtt_url is not None:
            from edge.notice import NoticeListener  # paho only when asked for; raises ValueError for a bad URL

            self.listener = NoticeListener(mqtt_url, model, self._on_notice, topic_prefix)

    def run(self) -> None:
        self.startup()
        try:
            self.loop()
        finally:
            self.shutdown()

    def startup(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.HANDLED_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, self._handle_exit)
        log.info(
            "watching model %s at %s every %gs%s",
            self.model,
            self.sync_args["url"],
            self.interval_s,
            f" and notices from {self.mqtt_url}" if self.mqtt_url else "",
        )
        if self.listener is not None:
            self.listener.start()

    def loop(self) -> None:
        next_sync = time.monotonic()
        while not self.should_exit.is_set():
            if time.monotonic() >= next_sync or self._take_announcement():
                next_sync = time.monotonic() + self.on_tick()
                continue
            # Short slices: a stop Event set by another thread (not a signal) is noticed within one.
            self.wake.wait(min(0.25, max(0.0, next_sync - time.monotonic())))
            self.wake.clear()

    def on_tick(self) -> float:
        """One sync; returns the seconds until the next: the interval when fine, a growing backoff when failing."""
        result = sync(**self.sync_args, should_stop=self.should_exit.is_set)
        if self.report and result.status != STOPPED:
            send_report(self.sync_args["url"], self.model, self.sync_args["dir"], self.sync_args["token"])
        if self.send_photos and result.status != STOPPED:
            field_photos.send_photos(self.sync_args["url"], self.model, self.sync_args["dir"], self.sync_args["token"])
        if result.status == STOPPED or result.ok:
            self.failures = 0
            return self.interval_s
        self.failures += 1
        delay = min(self.backoff_max_s, self.FIRST_BACKOFF_S * 2 ** (self.failures - 1))
        delay *= random.uniform(0.8, 1.2)  # jitter: a fleet that failed together must not retry together
        log.info("model %s: next try in %.1fs (failure %d in a row)", self.model, delay, self.failures)
        return delay

    def shutdown(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        log.info("stopped watching model %s; version %s is current", self.model, current_version(self.folder))

    def _take_announcement(self) -> bool:
        """True when a notice named a version other than the current one since the last look."""
        announced, self.announced = self.announced, None
        return announced is not None and announced != current_version(self.folder)

    def _on_notice(self, version: int) -> None:  # paho's thread: hand over and wake the loop, nothing more
        self.announced = version
        self.wake.set()

    def _handle_exit(self, sig: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(sig).name)
        self.should_exit.set()
        self.wake.set()
