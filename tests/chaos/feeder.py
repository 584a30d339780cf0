"""A sender that outlives broker restarts and knows, id by id, what the broker acknowledged.

Sprout's promise covers exactly the examples the broker acknowledged (a PUBACK
with a success code), so that set, not what was sent, is "published". Across
a broker restart a PUBLISH may be lost before its PUBACK; like a phone would,
the feeder sends every un-acknowledged id again after each reconnect and after
a while without an answer. The daemon stores a resent id once.
"""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from helpers import colour_jpeg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

NO_MATCHING_SUBSCRIBERS = 16
CLASSES = 3


def example(example_id: str, n: int) -> tuple[bytes, str]:
    """A learnable example: a noisy colour per class, so that exports pass their accuracy gates."""
    c = n % CLASSES
    return colour_jpeg(c, n), f"colour-{c}"


class Feeder(threading.Thread):
    """Publishes ``count`` examples at ``rate`` per second at QoS 1 until the broker has acknowledged every one."""

    def __init__(self, broker_url: str, model: str, count: int, rate: float, resend_after_s: float = 5.0):
        super().__init__(name="chaos-feeder", daemon=True)
        parts = urlsplit(broker_url)
        assert parts.hostname is not None and parts.port is not None, f"{broker_url}: no host and port"
        self.host, self.port = parts.hostname, parts.port
        self.topic = f"sprout/{model}/examples"
        self.ids = [f"chaos-{n:06d}" for n in range(count)]
        self.rate = rate
        self.resend_after_s = resend_after_s
        self.acked: set[str] = set()
        self.sends = 0  # PUBLISH calls, resends included
        self.resends = 0
        self.no_subscribers = 0  # PUBACKs saying the broker dropped it; resent later
        self.connects = 0
        self.last_ack_at = time.monotonic()
        self.error: BaseException | None = None
        self._sent_at: dict[str, float] = {}  # id -> last send, while un-acknowledged
        self._mids: dict[int, str] = {}
        self._early: dict[int, int] = {}  # PUBACKs that beat the recording of their mid
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._stopping = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"chaos-feed-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.max_inflight_messages_set(64)
        # paho annotates whole seconds, but only adds the delays to time.monotonic(): fractions work.
        self._client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish

    # Control from the harness.

    def pause(self) -> None:
        """Stop sending new ids (before a broker SIGKILL: see :meth:`Chaos.restart_broker`)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stopping.set()
        self._running.set()

    @property
    def done(self) -> bool:
        with self._lock:
            return len(self.acked) == len(self.ids)

    def acked_ids(self) -> set[str]:
        with self._lock:
            return set(self.acked)

    # The thread.

    def run(self) -> None:
        try:
            self._client.connect_async(self.host, self.port, keepalive=10, clean_start=True)
            self._client.loop_start()
            started = time.monotonic()
            seen_connects = 0
            for n, example_id in enumerate(self.ids):
                if self._stopping.is_set():
                    return
                self._running.wait()
                delay = started + n / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                seen_connects = self._resend_if_due(seen_connects)
                self._send(example_id, n)
            while not self._stopping.is_set() and not self.done:
                self._stopping.wait(0.2)
                self._running.wait()
                seen_connects = self._resend_if_due(seen_connects)
        except BaseException as err:
            self.error = err
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def _resend_if_due(self, seen_connects: int) -> int:
        """Send again what is un-acknowledged after a reconnect, or for longer than resend_after_s."""
        connects = self.connects
        now = time.monotonic()
        with self._lock:
            due = [i for i, at in self._sent_at.items() if connects != seen_connects or now - at > self.resend_after_s]
        for example_id in due:
            self.resends += 1
            self._send(example_id, int(example_id.rsplit("-", 1)[1]))
        return connects

    def _send(self, example_id: str, n: int) -> None:
        payload, label = example(example_id, n)
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "image/jpeg"
        props.UserProperty = [("label", label), ("example_id", example_id)]
        with self._lock:
            self._sent_at[example_id] = time.monotonic()
        # Not under our lock: paho calls on_publish holding its own lock (see daemon/tools/feeder.py).
        # While the broker is down paho queues the message and sends it on reconnect (rc NO_CONN).
        info = self._client.publish(self.topic, payload, qos=1, properties=props)
        self.sends += 1
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._mids[info.mid] = example_id
        if early is not None:
            self._answer(example_id, early)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self.connects += 1

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        code = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        with self._lock:
            example_id = self._mids.pop(mid, None)
            if example_id is None:
                self._early[mid] = code
                return
        self._answer(example_id, code)

    def _answer(self, example_id: str, code: int) -> None:
        with self._lock:
            if code < 0x80 and code != NO_MATCHING_SUBSCRIBERS:
                self.acked.add(example_id)
                self.last_ack_at = time.monotonic()
                self._sent_at.pop(example_id, None)
            elif code == NO_MATCHING_SUBSCRIBERS:
                self.no_subscribers += 1
