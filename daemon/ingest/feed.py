"""The MQTT side of intake: a persistent MQTT v5 session that hands examples over, un-acked.

The network thread only parses and validates (:mod:`daemon.ingest.wire`) and puts a
:class:`Delivery` on a bounded queue; :mod:`daemon.ingest.intake` commits and then
calls :meth:`Feed.ack`. Un-acked messages stay in the broker's session
(``clean_start=False``, a session expiry interval) and come back, flagged
``dup``, after a crash or a reconnect.

Nothing raises out of a callback: paho re-raises it and its network thread
ends, after which nothing is received while the socket still looks connected.
A message the parser cannot read becomes a rejection (acked, so it never
comes back); any other failure in a callback is logged with its traceback and
marks the feed failed (:meth:`Feed.problem`), which /healthz, the watchdog,
the metrics and the main loop read, so that the daemon exits 70 and its
service manager restarts it.

The feed is one of the daemon's parts (:class:`daemon.common.lifecycle.Part`):
it is started before intake and stopped after it, since intake acks on its
session; intake's stop pauses it first (:meth:`Feed.pause`).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.common.lifecycle import left
from daemon.common.settings import MqttSettings, StoreSettings
from daemon.ingest import mqttfast, wire
from daemon.ingest.field_photos import PhotoLimits, parse_field_photo
from daemon.ingest.telemetry import parse_report
from daemon.ingest.wire import Example, Rejection, Unchecked, parse
from daemon.store.records import FieldPhoto, FieldReport

log = logging.getLogger("sprout.feed")


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that never raises: a failure is logged, counted and marks the feed failed."""

    @functools.wraps(callback)
    def run(self: Feed, *args: object) -> None:
        try:
            callback(self, *args)
        except Exception as err:
            self.callback_errors += 1
            if self.failure is None:
                self.failure = f"{callback.__name__.strip('_')} failed: {type(err).__name__}: {err}"
                self._failed_with = err
            log.exception("MQTT callback %s failed; the feed is marked failed", callback.__name__.strip("_"))

    return run


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received message, waiting for its commit."""

    mid: int
    qos: int
    connection: int  # which connection it came on; an ack is only valid on that one
    item: Example | Rejection | Unchecked | FieldReport | FieldPhoto  # Unchecked until intake has decoded its body
    size: int = 0  # payload bytes held for it in the feed's ByteBudget until intake gives them back


class ByteBudget:
    """Bytes of received payloads held in memory until they are committed.

    The broker sends up to mqtt.receive_maximum un-acked messages at once: 1,000 phone photos of 10 MB
    would be 10 GB in the daemon's memory. Past ``limit`` the network thread waits (the broker holds the
    rest, as when intake falls behind); one message larger than the limit passes when nothing else is held.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most ever held: what the budget bounded
        self._cond = threading.Condition()

    def take(self, size: int, keep_waiting: Callable[[], bool]) -> bool:
        """Hold ``size`` bytes, waiting for room; False when ``keep_waiting`` turned false first."""
        with self._cond:
            while self.used > 0 and self.used + size > self.limit:
                if not keep_waiting():
                    return False
                self._cond.wait(0.5)
            self.used += size
            self.peak = max(self.peak, self.used)
            return True

    def give_back(self, size: int) -> None:
        with self._cond:
            self.used -= size
            self._cond.notify_all()


class Feed:
    """The MQTT session; from ``store`` it takes the checks (reloadable, :meth:`reconfigure`) and the backlog's bounds."""

    name = "feed"

    def __init__(
        self,
        settings: MqttSettings,
        store: StoreSettings,
        model: str,
        client_id: str,
        subscribe: bool = True,
        telemetry: bool = False,
        photos: PhotoLimits | None = None,
    ):
        self.settings = settings
        self.subscribes = subscribe  # False: a session that publishes only (an exporter's notice)
        self.model = model
        # The topics subscribed to: the examples, devices' reports (daemon/ingest/telemetry.py) and their photos
        # for labelling (daemon/ingest/field_photos.py), each when taken.
        self.telemetry_topic = settings.telemetry_topic(model) if telemetry else None
        self.photos_topic = settings.field_photos_topic(model) if photos is not None else None
        self.photo_limits = photos
        self.filters = [settings.subscription(model)]
        for topic in (self.telemetry_topic, self.photos_topic):
            if topic is not None:
                self.filters.append(settings.subscription(model, topic))
        self.limits = wire.limits(store)
        self.deliveries: queue.Queue[Delivery] = queue.Queue(maxsize=store.backlog_max)
        self.budget = ByteBudget(store.backlog_max_mb * 1024 * 1024)
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set once the broker confirmed the subscription (SUBACK)
        self.received = 0
        self.connects = 0
        self.callback_errors = 0
        self.failure: str | None = None  # set by the first callback that failed; the feed does not recover
        self._failed_with: BaseException | None = None  # that callback's exception
        self._network: threading.Thread | None = None  # paho's network thread, once started
        # When paho's network loop last turned (it turns at least once a second while connected), and
        # whether the thread is waiting for room in the deliveries queue (backpressure: intake's to judge).
        self.last_loop = time.monotonic()
        self.waiting_for_intake = False
        self._accepting = True
        self._stopping = False
        # Bumped on every disconnect. Packet ids are per session and the broker may reuse an id
        # once it is acked, so an ack from an older connection could hit a newer message:
        # such acks are dropped and the broker's redelivery is acked instead.
        self._connection = 0
        self._ack_lock = threading.Lock()
        self._connect_failure: str | None = None  # the last reason a connection attempt failed, logged once
        self._connect_failure_logged_at = 0.0
        self._client = self._make_client(client_id)

    def _make_client(self, client_id: str) -> mqtt.Client:
        s = self.settings
        client = mqttfast.BurstClient(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        paho_log = logging.getLogger("sprout.paho")
        # paho's network thread may run one more loop after a clean disconnect(), and loops once per
        # retry after a failed connect, logging an ERROR "not connected" each time: on our own stop
        # that is noise, and after a failed connect _on_connect_fail has already said why.
        self._quiet_stop = lambda record: (
            not ((self._stopping or self._connect_failure is not None) and "not connected" in record.getMessage())
        )
        paho_log.addFilter(self._quiet_stop)
        client.enable_logger(paho_log)
        if s.username:
            client.username_pw_set(s.username, s.resolved_password())
        if s.tls:
            client.tls_set(
                ca_certs=str(s.tls_ca_file) if s.tls_ca_file else None,
                certfile=str(s.tls_cert_file) if s.tls_cert_file else None,
                keyfile=str(s.tls_key_file) if s.tls_key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        # paho annotates the delays int but sleeps any number of seconds; ours may be fractions of one.
        client.reconnect_delay_set(min_delay=s.reconnect_min_s, max_delay=s.reconnect_max_s)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_network_loop = self._on_loop
        return client

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.receive_maximum
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,  # keep the session: un-acked examples survive our restarts
            properties=props,
        )
        self._client.loop_start()
        self._network = self._client._thread  # paho clears its own reference when the thread ends

    def reconfigure(self, store: StoreSettings, photos: PhotoLimits | None = None) -> None:
        """Check every message from now on against ``store``'s limits (a reload), and photos against ``photos``
        where they are taken; the backlog keeps its bounds."""
        self.limits = wire.limits(store)
        if photos is not None and self.photos_topic is not None:
            self.photo_limits = photos

    def alive(self) -> bool:
        """Started, and able to receive (or to reconnect by itself): no callback failed, paho's thread lives."""
        return self._network is not None and not self._stopping and self.problem() is None

    @property
    def error(self) -> BaseException | None:
        """What ended the feed for good: the first failed callback's exception, or the end of paho's thread."""
        if self._failed_with is not None:
            return self._failed_with
        problem = self.problem()
        return ConnectionError(problem) if problem is not None else None

    def problem(self) -> str | None:
        """Why the feed cannot receive, when it cannot and will not recover by itself; None otherwise."""
        if self.failure is not None:
            return self.failure
        if self._network is not None and not self._stopping and not self._network.is_alive():
            return "the MQTT network thread has ended"
        return None

    def receiving(self) -> bool:
        """Connected, subscribed and able to receive: what /healthz and sprout_broker_connected report."""
        return self.subscribed.is_set() and self.problem() is None

    def pause(self) -> None:
        """Stop taking new messages; they stay un-acked in the broker's session for the next start."""
        self._accepting = False

    def stop(self, deadline: float) -> bool:
        """Disconnect cleanly; the session (and anything un-acked) stays on the broker for session_expiry_s.

        paho's thread ends within one turn of its loop (a second at most); True once it has.
        """
        if not self._stopping:
            self._stopping = True
            self._accepting = False
            self._client.disconnect()
            self._client.loop_stop()
            logging.getLogger("sprout.paho").removeFilter(self._quiet_stop)
            self.connected.clear()
            self.subscribed.clear()
        network = self._network
        if network is not None:
            network.join(left(deadline))
        return network is None or not network.is_alive()

    # -- used by intake ------------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> bool:
        """PUBACK one committed message; False when it came on an older connection (it will be redelivered)."""
        if delivery.qos == 0:
            return True
        with self._ack_lock:
            if delivery.connection != self._connection or not self.connected.is_set():
                return False
            self._client.ack(delivery.mid, delivery.qos)
            return True

    def report_rejection(self, rejection: Rejection) -> None:
        """Tell senders why, on <prefix>/<model>/rejected; never the image."""
        self._client.publish(
            self.settings.rejected_topic(self.model), json.dumps(rejection.notice()), qos=1, retain=False
        )

    def publish_retained(self, topic: str, payload: bytes, timeout_s: float = 10.0) -> bool:
        """Publish ``payload`` retained at QoS 1 on this session; True once the broker's PUBACK arrived."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):  # the link dropped while waiting: the caller tries again
            return False
        return info.is_published()

    # -- paho callbacks (network thread) -------------------------------------------------------

    @_guarded
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error(
                "broker %s refused the connection: %s (check mqtt.username, mqtt.password and the broker's ACL)",
                self.settings.broker,
                reason_code,
            )
            return
        self.connects += 1
        if self._connect_failure is not None:
            log.info("connected to %s after: %s", self.settings.broker, self._connect_failure)
            self._connect_failure = None
        if self.connects > 1 and not flags.session_present:
            log.warning(
                "broker %s kept no session for %s: examples published while the link was down may be lost; "
                "check the broker's persistence and session expiry",
                self.settings.broker,
                client._client_id.decode(),
            )
        if not self.subscribes:
            self.connected.set()
            self.subscribed.set()  # nothing to wait for: ready to publish
            log.info("connected to %s (publishing only)", self.settings.broker)
            return
        client.subscribe([(f, SubscribeOptions(qos=1)) for f in self.filters])
        self.connected.set()
        log.info("connected to %s, subscribed to %s", self.settings.broker, " and ".join(self.filters))

    @_guarded
    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its ``except OSError`` and only logs the failure at DEBUG:
        # the exception being handled says why (refused, unreachable, a certificate that does not verify).
        err = sys.exc_info()[1]
        reason = explain_connect_failure(err, self.settings)
        now = time.monotonic()
        # Once per distinct reason, and again every 10 minutes while it lasts: paho retries with backoff.
        if reason != self._connect_failure or now - self._connect_failure_logged_at >= 600:
            log.error("cannot connect to %s: %s; retrying", self.settings.broker, reason)
            self._connect_failure_logged_at = now
        self._connect_failure = reason

    @_guarded
    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = {f: rc for f, rc in zip(self.filters, reason_codes, strict=False) if rc.is_failure}
        if self.filters[0] in refused:
            log.error(
                "broker refused the subscription to %s: %s (check the broker's ACL for this user)",
                self.filters[0],
                refused[self.filters[0]],
            )
            return
        for topic, rc in refused.items():  # the devices' reports or photos: examples still come, so the feed works
            photos = self.photos_topic is not None and topic.endswith(self.photos_topic)
            log.warning(
                "broker refused the subscription to %s: %s; devices' %s not taken over MQTT (allow it in "
                "the broker's ACL, or set %s = false)",
                topic,
                rc,
                "photos for labelling are" if photos else "reports are",
                "field.photos" if photos else "field.telemetry",
            )
        self.subscribed.set()

    @_guarded
    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._ack_lock:
            self._connection += 1
            self.connected.clear()
            self.subscribed.clear()
        if not self._stopping:
            log.warning("lost the broker %s (%s); reconnecting", self.settings.broker, reason_code)

    @_guarded
    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if not self._accepting:
            return  # left un-acked: the broker redelivers it after our restart
        props = getattr(message, "properties", None)
        user_properties = getattr(props, "UserProperty", None)
        content_type = getattr(props, "ContentType", None)
        # Never raises. The body's decode is left to intake's threads (wire.check_body): here it would
        # cost the network thread 10-20 times the rest of the parse.
        payload = message.payload
        assert isinstance(payload, bytes), "paho decodes a received payload as bytes (bytearray is for sending)"
        item: Example | Rejection | Unchecked | FieldReport | FieldPhoto
        if self.telemetry_topic is not None and message.topic == self.telemetry_topic:
            item = parse_report(payload)
        elif self.photo_limits is not None and message.topic == self.photos_topic:
            item = parse_field_photo(payload, self.photo_limits)
        else:
            item = parse(payload, user_properties, content_type, self.limits, decode=False)
        size = len(payload) if isinstance(item, Unchecked | FieldPhoto) else 0  # a rejection keeps no image
        delivery = Delivery(message.mid, message.qos, self._connection, item, size)
        self.received += 1
        # Backpressure: when intake falls behind, in examples or in bytes, stop reading the socket; the
        # broker holds the rest.
        self.waiting_for_intake = True
        try:
            if not self.budget.take(size, lambda: self._accepting):
                return
            while True:
                try:
                    self.deliveries.put(delivery, timeout=0.5)
                    return
                except queue.Full:
                    if not self._accepting:
                        self.budget.give_back(size)
                        return
        finally:
            self.waiting_for_intake = False
            self.last_loop = time.monotonic()

    def _on_loop(self) -> None:
        self.last_loop = time.monotonic()


def explain_connect_failure(err: BaseException | None, settings: MqttSettings) -> str:
    """Why a connection attempt failed, in words that say what to check. Never contains a secret."""
    if isinstance(err, ssl.SSLCertVerificationError):
        ca = (
            f"mqtt.tls_ca_file ({settings.tls_ca_file})"
            if settings.tls_ca_file
            else "the system CAs (set mqtt.tls_ca_file)"
        )
        return (
            f"the broker's TLS certificate does not verify against {ca}: {err.verify_message or err.reason}; "
            "Sprout never falls back to plaintext"
        )
    if isinstance(err, ssl.SSLError):
        return (
            f"TLS handshake failed ({err.reason or err}): is port {settings.port} a TLS listener? "
            "Sprout never falls back to plaintext"
        )
    if isinstance(err, ConnectionResetError | ssl.SSLEOFError) and settings.tls:
        return (
            f"the broker closed the link during the TLS handshake: is port {settings.port} a TLS listener? "
            "Sprout never falls back to plaintext"
        )
    if isinstance(err, ConnectionRefusedError):
        return f"nothing listens on {settings.host}:{settings.port} (is the broker running?)"
    if isinstance(err, TimeoutError):
        return f"{settings.host}:{settings.port} did not answer in time"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve {settings.host}: {err.strerror}"
    if isinstance(err, OSError):
        return f"{err.strerror or err}"
    return "unknown error"
