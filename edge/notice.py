"""Hearing of a new model at once: the retained MQTT notice on ``<prefix>/<model>/models/latest``.

On every publish and rollback the daemon puts the latest manifest on that
topic, retained, QoS 1; a subscriber receives the current one as soon as it
subscribes, then every change. The notice only says that something changed:
the model still comes over HTTP and is verified there, so a notice needs no
trust (a forged one costs one conditional GET).

paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``, MQTT v5. paho's own thread
reconnects with a growing delay, and the subscription is made in
``on_connect``, so every reconnect renews it. The callbacks only decode and
hand the version over; the sync runs on the caller's thread.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("sprout.edge.notice")


def notice_topic(prefix: str, model: str) -> str:
    return f"{prefix}/{model}/models/latest"


class NoticeListener:
    """Calls ``on_version(version)`` for each notice about ``model`` (from paho's network thread)."""

    def __init__(self, broker_url: str, model: str, on_version: Callable[[int], None], prefix: str = "sprout"):
        parts = urllib.parse.urlsplit(broker_url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL {broker_url!r} must look like mqtt://host:port or mqtts://host:port")
        self.host = parts.hostname
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.model = model
        self.topic = notice_topic(prefix, model)
        self.on_version = on_version
        self.connected = False
        self._stopping = False
        # A fresh id per run: two devices (or two runs) with one id would keep kicking each other off.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sprout-edge-{os.getpid()}-{os.urandom(3).hex()}",
            protocol=mqtt.MQTTv5,
        )
        if parts.scheme == "mqtts":
            self._client.tls_set()  # the system's CAs
        if parts.username:
            self._client.username_pw_set(
                urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password) if parts.password else None
            )
        self._client.reconnect_delay_set(min_delay=1, max_delay=60)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> NoticeListener:
        """Connect in the background; an unreachable broker is retried by paho, never fatal (polling goes on)."""
        # clean_start: the retained notice brings the state on every connect, so no session needs keeping.
        self._client.connect_async(self.host, self.port, keepalive=60, clean_start=True)
        self._client.loop_start()
        return self

    def stop(self) -> None:
        self._stopping = True  # the disconnect that follows is ours: nothing to warn about
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        self.connected = True
        client.subscribe(self.topic, qos=1)
        log.info("listening for model notices on %s at %s:%d", self.topic, self.host, self.port)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.warning(
                    "broker refused the subscription to %s: %s; only polling will find new models", self.topic, code
                )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._stopping:
            self.connected = False
            return
        if self.connected:
            log.warning("lost the broker %s:%d (%s); reconnecting, polling goes on", self.host, self.port, reason_code)
        self.connected = False

    def _on_message(self, client, userdata, message) -> None:
        try:
            notice = json.loads(message.payload)
            version = notice["version"]
            model = notice.get("model")
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("ignored a notice on %s that is not a manifest (%d bytes)", message.topic, len(message.payload))
            return
        if isinstance(version, bool) or not isinstance(version, int) or version < 1 or model != self.model:
            log.warning("ignored a notice on %s for model %r version %r", message.topic, model, version)
            return
        self.on_version(version)
