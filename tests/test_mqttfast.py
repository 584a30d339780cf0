"""The fast property decoder must read exactly what paho's own decoder reads, and refuse what it refuses."""

from __future__ import annotations

import random
import time

import pytest
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, MQTTException, Properties

from daemon.ingest.mqttfast import FastProperties, install


def random_publish_properties(rng: random.Random) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    text = lambda: "".join(rng.choice("abcXYZ é漢🌱-_/ ") for _ in range(rng.randint(0, 40)))  # noqa: E731
    if rng.random() < 0.8:
        p.ContentType = rng.choice(["image/jpeg", "image/png", text()])
    if rng.random() < 0.5:
        p.PayloadFormatIndicator = rng.randint(0, 1)
    if rng.random() < 0.5:
        p.MessageExpiryInterval = rng.randint(0, 2**32 - 1)
    if rng.random() < 0.3:
        p.ResponseTopic = text() or "r"
    if rng.random() < 0.3:
        p.CorrelationData = rng.randbytes(rng.randint(0, 50))
    if rng.random() < 0.3:
        p.TopicAlias = rng.randint(1, 65535)
    if rng.random() < 0.3:
        p.SubscriptionIdentifier = [rng.randint(1, 268435455) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.9:
        p.UserProperty = [(text(), text()) for _ in range(rng.randint(1, 6))]
    return p


def test_decodes_exactly_what_paho_decodes():
    rng = random.Random(42)
    for _ in range(2000):
        packed = random_publish_properties(rng).pack() + rng.randbytes(rng.randint(0, 3000))  # payload follows
        theirs, their_len = Properties(PacketTypes.PUBLISH).unpack(packed)
        ours, our_len = FastProperties(PacketTypes.PUBLISH).unpack(packed)
        assert our_len == their_len
        assert ours.json() == theirs.json()
        assert str(ours) == str(theirs)
        assert ours.pack() == theirs.pack()


@pytest.mark.parametrize(
    "packed",
    [
        bytes([5, 3, 0, 9, ord("a")]),  # string longer than the properties
        bytes([3, 3, 0]),  # string length cut short
        bytes([4, 3, 0, 1, 0]),  # NUL in a string
        bytes([5, 3, 0, 2, 0xFF, 0xFE]),  # not UTF-8
        bytes([2, 0x7F, 0]),  # unknown identifier
        bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),  # variable byte integer too long
        bytes([50, 3, 0, 1, ord("a")]),  # length past the packet
        # Found by tests/test_fuzz.py: fixed-size values cut off by the properties' end (an IndexError once).
        bytes([1, 1]),  # a byte property with no byte
        bytes([1, 2]),  # a four-byte integer with none
        bytes([2, 35, 0]),  # a two-byte integer with one
        bytes([2, 1, 2]),  # a payload format indicator other than 0 or 1
    ],
)
def test_refuses_malformed_properties(packed):
    with pytest.raises((MalformedPacket, MQTTException)):
        FastProperties(PacketTypes.PUBLISH).unpack(packed)


def test_repeated_single_property_is_refused_like_paho():
    packed = bytes([4, 1, 0, 1, 1])  # PayloadFormatIndicator twice
    with pytest.raises(MQTTException):
        Properties(PacketTypes.PUBLISH).unpack(packed)
    with pytest.raises(MQTTException):
        FastProperties(PacketTypes.PUBLISH).unpack(packed)


def test_a_property_that_does_not_apply_to_publish_is_refused_like_paho():
    packed = bytes([5, 0x27, 0, 0, 0, 0])  # Maximum Packet Size: a CONNECT property (found by tests/test_fuzz.py)
    with pytest.raises(MQTTException, match="does not apply to packet type Publish"):
        Properties(PacketTypes.PUBLISH).unpack(packed)
    with pytest.raises(MQTTException, match="does not apply to packet type Publish"):
        FastProperties(PacketTypes.PUBLISH).unpack(packed)


def test_install_targets_publish_decoding():
    original = _packet.Properties
    try:
        assert install()
        assert _packet.Properties is FastProperties
    finally:
        _packet.Properties = original


def test_burst_client_reads_every_waiting_packet_per_wake_up(broker):
    from helpers import publish_examples
    from paho.mqtt import client as mqtt

    from daemon.ingest.mqttfast import BurstClient

    def connect(cls):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        c = cls(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id="burst",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        c.on_message = lambda client, userdata, m: (got.append(m.mid), client.ack(m.mid, m.qos))
        c.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        return c

    got: list[int] = []
    c = connect(BurstClient)
    c.subscribe("sprout/leaves/examples", qos=1)
    for _ in range(10):
        c.loop(0.05)
    c.disconnect()
    publish_examples(broker.url, "leaves", [f"b-{i}" for i in range(300)], ["rust"] * 300)
    c = connect(BurstClient)
    wake_ups = 0
    deadline = time.monotonic() + 20
    while len(got) < 300 and time.monotonic() < deadline:
        c.loop(1.0)
        wake_ups += 1
    c.disconnect()
    assert len(got) == 300
    assert wake_ups < 150  # paho's own loop_read needs one wake-up per packet
