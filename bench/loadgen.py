"""A lean MQTT v5 QoS 1 load generator for the ingest benchmark.

paho's publish path costs ~600 us of Python per 30 KB message (it re-packs
properties and copies the payload several times), so a paho publisher on the
same 2-core machine measures itself, not Sprout. This one writes the PUBLISH
packets of the wire format (Content Type, user properties 'label' and
'example_id') straight to a socket, keeps a window of un-acked packet ids,
and counts PUBACKs as they come back: the same protocol, the same broker,
a fraction of the CPU.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from collections.abc import Sequence


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read_exact(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return header, _read_exact(sock, length)


class LoadGenerator:
    def __init__(self, host: str, port: int, window: int = 1000):
        self.window = window
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_id = f"sprout-loadgen-{uuid.uuid4().hex[:8]}"
        variable = _utf8("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + _varint(0)
        body = variable + _utf8(client_id)
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        header, payload = _read_packet(self.sock)
        if header != 0x20 or payload[1] != 0:
            raise ConnectionError(f"broker refused the connection (CONNACK reason {payload[1]:#x})")
        self.acked = 0
        self.failed = 0
        self._slots = threading.Semaphore(min(window, 65535))
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    def _read_acks(self) -> None:
        try:
            while True:
                header, payload = _read_packet(self.sock)
                if header >> 4 == 4:  # PUBACK
                    reason = payload[2] if len(payload) > 2 else 0
                    if reason >= 0x80 or reason == 0x10:  # error, or "no matching subscribers" (dropped)
                        self.failed += 1
                    else:
                        self.acked += 1
                    self._slots.release()
        except (ConnectionError, OSError):
            return

    def publish_all(
        self, topic: str, messages: Sequence[tuple[str, str, bytes]], content_type: str = "image/jpeg"
    ) -> None:
        """Send (example_id, label, payload) triples at QoS 1, then wait for every PUBACK."""
        answered_before = self.acked + self.failed  # the counters run on across calls
        topic_part = _utf8(topic)
        ct = b"\x03" + _utf8(content_type)
        label_cache: dict[str, bytes] = {}
        packet_id = 0
        for example_id, label, payload in messages:
            self._slots.acquire()
            packet_id = packet_id % 65535 + 1
            lab = label_cache.get(label)
            if lab is None:
                lab = label_cache[label] = b"\x26" + _utf8("label") + _utf8(label)
            props = ct + lab + b"\x26" + _utf8("example_id") + _utf8(example_id)
            variable = topic_part + struct.pack("!H", packet_id) + _varint(len(props)) + props
            self.sock.sendall(b"".join((b"\x32", _varint(len(variable) + len(payload)), variable, payload)))
        deadline = time.monotonic() + 120
        while self.acked + self.failed - answered_before < len(messages) and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()
