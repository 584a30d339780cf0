"""Two measured speed-ups of paho-mqtt 2.2's receive path, for the intake's network thread.

1. Property decoding. Profiling the intake (bench/ingest.py, docs/benchmarks.md) showed paho's
``Properties.unpack`` taking ~250 us of a ~530 us per-message budget for a
30 KB example: it rebuilds its lookup tables for every packet, looks names up
by linear scans with ``str.replace``, and re-slices (copies) the rest of the
packet, payload included, after every field. This subclass decodes the same
bytes into the same attributes with shared tables and a zero-copy view.

paho's ``decode_publish`` builds the properties through the module-level name
``paho.mqtt._packet.Properties``; :func:`install` points that name at this
class. It only does so on the paho release it was checked against (pinned in
pyproject.toml); tests/test_mqttfast.py checks equivalence with paho's own
decoder field by field.

2. Reads per wake-up. paho's ``loop_read`` reads one packet per ``select()``
when nothing of its own is in flight, which is always the case for a
subscriber: a select, and its Python around it, for every 30 KB example.
:class:`BurstClient` reads every packet already waiting (up to a bound) per
wake-up: 150 -> 85-110 us of client CPU per message in a drain test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, MQTTException, Properties

log = logging.getLogger("sprout.feed")

CHECKED_PAHO_VERSION = "2.2.0"
READ_BURST = 256  # packets read per wake-up at most, so writes (acks) and pings still get their turn
_MULTIPLE = (11, 38)  # Subscription Identifier and User Property may repeat
# paho's type indices: Byte, Two Byte Integer, Four Byte Integer, Variable Byte Integer,
# Binary Data, UTF-8 Encoded String, UTF-8 String Pair.
_BYTE, _INT16, _INT32, _VARINT, _BINARY, _UTF8, _PAIR = range(7)


class FastProperties(Properties):
    _template = Properties(PacketTypes.PUBLISH)
    _names = _template.names
    _types = _template.types
    _kinds = _template.properties
    _attr = {ident: name.replace(" ", "") for name, ident in _template.names.items()}

    def __init__(self, packetType: int):
        # The same attributes paho's methods read, shared instead of rebuilt per packet.
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", self._types)
        object.__setattr__(self, "names", self._names)
        object.__setattr__(self, "properties", self._kinds)

    def unpack(self, buffer: bytes | bytearray) -> tuple[FastProperties, int]:
        view = memoryview(buffer)
        propslen, pos = _varint(view, 0)
        end = pos + propslen
        if end > len(view):
            raise MalformedPacket("properties longer than the packet")
        while pos < end:
            ident, pos = _varint(view, pos)
            spec = self._kinds.get(ident)
            if spec is None:
                raise MalformedPacket(f"unknown MQTT v5 property identifier {ident}")
            if self.packetType not in spec[1]:  # found by tests/test_fuzz.py: e.g. Maximum Packet Size on a PUBLISH
                raise MQTTException(
                    f"Property {self._attr[ident]} does not apply to packet type {PacketTypes.Names[self.packetType]}"
                )
            kind = spec[0]
            value: object
            size = _FIXED.get(kind, 0)
            if pos + size > end:  # found by tests/test_fuzz.py: a value cut off by the properties' end
                raise MalformedPacket(f"property {ident} runs past the properties length")
            if kind == _BYTE:
                value, pos = view[pos], pos + 1
            elif kind == _INT16:
                value, pos = int.from_bytes(view[pos : pos + 2], "big"), pos + 2
            elif kind == _INT32:
                value, pos = int.from_bytes(view[pos : pos + 4], "big"), pos + 4
            elif kind == _VARINT:
                value, pos = _varint(view, pos)
            elif kind == _BINARY:
                length = int.from_bytes(view[pos : pos + 2], "big")
                value, pos = bytes(view[pos + 2 : pos + 2 + length]), pos + 2 + length
            elif kind == _UTF8:
                value, pos = _utf8(view, pos, end)
            else:  # _PAIR
                key, pos = _utf8(view, pos, end)
                val, pos = _utf8(view, pos, end)
                value = (key, val)
            if pos > end:
                raise MalformedPacket("property runs past the properties length")
            if ident == _PAYLOAD_FORMAT_INDICATOR and value not in (0, 1):  # as paho checks (found by fuzzing)
                raise MQTTException("PayloadFormatIndicator property value must be 0 or 1")
            name = self._attr[ident]
            if ident in _MULTIPLE:
                object.__setattr__(self, name, [*self.__dict__.get(name, ()), value])
            elif name in self.__dict__:
                raise MQTTException(f"Property '{name}' must not exist more than once")
            else:
                object.__setattr__(self, name, value)
        return self, end


_FIXED = {_BYTE: 1, _INT16: 2, _INT32: 4}
_PAYLOAD_FORMAT_INDICATOR = 0x01  # bytes a fixed-size value takes (the others carry their length)


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= len(view):
            raise MalformedPacket("variable byte integer runs past the packet")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def _utf8(view: memoryview, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise MalformedPacket("Not enough data to read string length")
    length = int.from_bytes(view[pos : pos + 2], "big")
    start = pos + 2
    if start + length > end:
        raise MalformedPacket("Length delimited string too long")
    try:
        text = str(view[start : start + length], "utf-8")  # strict: rejects surrogates (MQTT-1.5.4-1)
    except UnicodeDecodeError as err:
        raise MalformedPacket(f"property string is not UTF-8: {err}") from None
    if "\x00" in text:
        raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
    # U+FEFF is a valid character that a receiver "MUST NOT skip over or strip off" (MQTT-1.5.4-3); paho
    # refuses it, drops the connection, and the broker redelivers the message for ever. It is the wire
    # format's to reject (a label is printable text), with the message acked.
    return text, start + length


class BurstClient(mqtt.Client):
    """A paho Client that reads all packets waiting on the socket per wake-up (see the module doc).

    ``on_network_loop``, when set, is called every time the network loop turns (at least once a
    second while connected), so that a loop that stopped turning can be told from an idle one.
    """

    on_network_loop: Callable[[], None] | None = None

    def loop_misc(self) -> mqtt.MQTTErrorCode:
        rc = super().loop_misc()
        if self.on_network_loop is not None:
            self.on_network_loop()
        return rc

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        if paho.mqtt.__version__ != CHECKED_PAHO_VERSION:
            return super().loop_read(max_packets)
        for _ in range(READ_BURST):
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:  # the socket is drained
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


def install() -> bool:
    """Use FastProperties for received PUBLISH packets; False (paho's own decoder stays) on other paho releases."""
    if paho.mqtt.__version__ != CHECKED_PAHO_VERSION:
        log.warning(
            "paho-mqtt %s is not the checked %s: using its own (slower) property decoder",
            paho.mqtt.__version__,
            CHECKED_PAHO_VERSION,
        )
        return False
    _packet.Properties = FastProperties  # type: ignore[misc]  # replacing paho's class is the point
    return True
