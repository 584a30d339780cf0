"""``sprout feed``: publish real labelled images to a broker in Sprout's wire format.

A message counts as sent only when the broker's PUBACK for it arrives, so the
printed count is the broker's count. A PUBACK that says "no matching
subscribers" means the broker dropped it: start ``sprout run`` once first so
the broker holds a session for it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tqdm import tqdm

from daemon.common.exits import Exit
from daemon.common.settings import StoreSettings
from daemon.tools.datasets import DatasetError, Sample, arrange, fashion_mnist_samples, folder_samples, iter_encoded

log = logging.getLogger("sprout.feeder")

NO_MATCHING_SUBSCRIBERS = 16  # MQTT v5 reason code on a PUBACK


@dataclass
class FeedReport:
    published: int = 0  # PUBLISH sent
    acked: int = 0  # PUBACK with a success code: the broker has it for at least one subscriber
    no_subscribers: int = 0  # PUBACK "no matching subscribers": the broker dropped it
    failed: int = 0  # PUBACK with an error code, or no PUBACK before the end
    skipped_too_large: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "published": self.published,
            "acked": self.acked,
            "no_subscribers": self.no_subscribers,
            "failed": self.failed,
            "skipped_too_large": self.skipped_too_large,
            "failure_reasons": self.reasons,
        }


def without_password(url: str) -> str:
    """``url`` fit for a message: a password in it is shown as '***'."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class Publisher:
    """A QoS 1 publisher with a bounded window of un-acknowledged messages."""

    def __init__(
        self,
        broker: str,
        window: int = 256,
        client_id: str | None = None,
        max_bytes: int = StoreSettings.model_fields["max_image_bytes"].default,  # the daemon's default limit
        ca_file: Path | None = None,
    ):
        parts = urlsplit(broker)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker must look like mqtt://host:port, not {broker!r}")
        self.report = FeedReport()
        self.max_bytes = max_bytes
        self._window = threading.Semaphore(window)
        self._pending: set[int] = set()
        self._early: dict[int, object] = {}  # PUBACKs that arrived before publish() recorded their mid
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sprout-feed-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.max_inflight_messages_set(window)
        if parts.scheme == "mqtts":
            # Verified against ca_file, else the system CAs; there is no unverified mode.
            self._client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        elif ca_file is not None:
            raise ValueError(f"a CA file was given but {broker!r} is plaintext: use mqtts://")
        if parts.username:
            self._client.username_pw_set(parts.username, parts.password)
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish
        self._host, self._port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    def __enter__(self) -> Publisher:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout_s: float = 10.0) -> None:
        self._client.connect(self._host, self._port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self._client.loop_stop()
            raise ConnectionError(self._refused or f"no CONNACK from mqtt://{self._host}:{self._port} in {timeout_s}s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(
        self,
        topic: str,
        payload: bytes,
        label: str | None = None,
        content_type: str | None = None,
        example_id: str | None = None,
        split: str | None = None,
        extra_properties: Iterable[tuple[str, str]] = (),
    ) -> bool:
        """Send one example at QoS 1; blocks while the window is full. False when it is too large to send."""
        if len(payload) > self.max_bytes:
            # An oversized PUBLISH under MQTT v5 makes the broker drop the connection, and paho
            # reconnect forever: refuse it here instead.
            self.report.skipped_too_large += 1
            return False
        props = Properties(PacketTypes.PUBLISH)
        if content_type is not None:
            props.ContentType = content_type
        user = [(k, v) for k, v in (("label", label), ("example_id", example_id), ("split", split)) if v is not None]
        user.extend(extra_properties)
        if user:
            props.UserProperty = user
        self.publish_raw(topic, payload, props)
        return True

    def publish_raw(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """Send any payload and properties at QoS 1, counted like :meth:`publish` (tests send malformed ones)."""
        self._window.acquire()
        # Not under self._lock: paho calls on_publish while holding its own lock, so taking ours
        # around client.publish would invert the lock order and deadlock.
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho resends on reconnect
            self._window.release()
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            self.report.published += 1
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending.add(info.mid)
        if early is not None:  # the PUBACK beat us here
            self._count(early)

    def wait_all_acked(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.02)
        with self._lock:
            self.report.failed += len(self._pending)
            if self._pending:
                self.report.reasons["no PUBACK"] = self.report.reasons.get("no PUBACK", 0) + len(self._pending)
            self._pending.clear()
        return False

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._pending)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"broker refused the connection: {reason_code}"
            return
        maximum = getattr(properties, "MaximumPacketSize", None)
        if maximum:
            self.max_bytes = min(self.max_bytes, maximum - 1024)  # room for topic and properties
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid not in self._pending:
                self._early[mid] = reason_code
                return
            self._pending.discard(mid)
        self._count(reason_code)

    def _count(self, reason_code) -> None:
        code = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        with self._lock:
            if code == NO_MATCHING_SUBSCRIBERS:
                self.report.no_subscribers += 1
            elif code >= 0x80:
                self.report.failed += 1
                name = str(reason_code)
                self.report.reasons[name] = self.report.reasons.get(name, 0) + 1
            else:
                self.report.acked += 1
        self._window.release()


def feed(
    publisher: Publisher,
    topic: str,
    items: Iterable[tuple[Sample, bytes, str]],
    total: int,
    rate: float = 0.0,
    progress: bool | None = None,
    split: str | None = None,
) -> FeedReport:
    """Publish encoded samples at ``rate`` per second (0 = as fast as acks allow), then wait for every PUBACK.

    ``split`` goes on every message; without it each sample's own (a folder's train/ or holdout/), if any.
    """
    started = time.monotonic()
    # disable=None: a bar on a terminal, nothing when piped.
    bar = tqdm(total=total, unit="ex", desc="acked", disable=None if progress is None else not progress)
    shown = 0
    for i, (sample, payload, content_type) in enumerate(items):
        if rate > 0:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if not publisher.publish(topic, payload, sample.label, content_type, sample.example_id, split or sample.split):
            log.warning(
                "skipped %s: %d bytes is over the %d-byte limit", sample.example_id, len(payload), publisher.max_bytes
            )
        done = publisher.report.acked + publisher.report.no_subscribers
        if done > shown:
            bar.update(done - shown)
            shown = done
    publisher.wait_all_acked(timeout_s=60.0)
    bar.update(publisher.report.acked + publisher.report.no_subscribers - shown)
    bar.close()
    return publisher.report


def run_feed(args) -> int:
    """The ``sprout feed`` command."""
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        samples = fashion_mnist_samples(args.part) if args.dataset else folder_samples(args.dir)
        samples = arrange(samples, args.order, classes, args.seed, args.limit)
    except DatasetError as err:
        print(f"sprout feed: {err}", file=sys.stderr)
        return Exit.NOINPUT
    topic = f"{args.topic_prefix}/{args.model}/examples"
    try:
        with Publisher(args.broker, window=args.window, ca_file=args.ca_file) as publisher:
            report = feed(
                publisher,
                topic,
                iter_encoded(samples, args.size, args.format),
                len(samples),
                args.rate,
                split=args.split,
            )
    except (ConnectionError, OSError) as err:
        print(f"sprout feed: cannot reach {without_password(args.broker)}: {err}", file=sys.stderr)
        return Exit.UNAVAILABLE
    except ValueError as err:  # a bad broker URL or a CA file for a plaintext broker
        print(f"sprout feed: {err}", file=sys.stderr)
        return Exit.USAGE
    print(json.dumps(report.as_dict()))
    if report.no_subscribers:
        print(
            f"sprout feed: the broker dropped {report.no_subscribers} examples because nothing subscribes to {topic}: "
            "start 'sprout run' once first so the broker keeps a session for it",
            file=sys.stderr,
        )
    return 0 if report.acked == report.published and not report.skipped_too_large else 1
