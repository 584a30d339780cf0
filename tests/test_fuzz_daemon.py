"""Fuzzing the whole message path: a real Mosquitto, the daemon as a real process, structure-aware messages.

tests/test_fuzz.py fuzzes the parsers in-process. An input can also go wrong
on its way there: in the broker, in paho's packet reader, in the property
decoder, in intake, in the store, in the rejection notice. Here the same
generators (driven by a seeded random.Random rather than hypothesis, whose
@given reruns a test per input: this one starts a daemon once and feeds it
thousands) publish their messages at QoS 1 to a running daemon, and every
message must be accounted for: stored, or rejected with the reason the
parser gives in-process, noticed on the rejected topic and counted in the
store, with /healthz at 200 throughout.

CI publishes 300 messages; `make fuzz` 20,000 (SPROUT_FUZZ_MESSAGES), with a
summary line of the outcomes. SPROUT_FUZZ_SEED draws another sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
from fuzz_messages import (
    DAEMON_LIMITS,
    GENERATORS,
    IMAGE_FAULTS,
    Message,
    Seeded,
    check,
    mismatch,
    mqtt_properties,
    oversized_message,
    verdict_matches,
)
from helpers import SPROUT, DaemonProcess, jpeg, stored_ids, wait_for

from daemon.ingest.wire import Example, Reason, Rejection, parse
from daemon.store.reader import open_reader
from daemon.tools.feeder import Publisher

MESSAGES = int(os.environ.get("SPROUT_FUZZ_MESSAGES", "300"))
SEED = int(os.environ.get("SPROUT_FUZZ_SEED", "1127"))
TOPIC = "sprout/leaves/examples"
HEALTH_EVERY = 25  # messages between two looks at /healthz while publishing
# Relative weights: well-formed examples often enough that storing is tested as hard as rejecting.
MIX = {
    "valid_example": 6,
    "image_damage": 6,
    "property_combination": 5,
    "long_strings": 3,
    "deep_json": 3,
    "huge_number": 3,
    "other_encoding": 2,
}
OVERSIZED_PER_MILLE = 2  # 8-11 MB each through the broker and the daemon: a few make the point


def corpus() -> list[Message]:
    """Inputs that once got through or stalled the daemon: the outside tester's, and what this fuzzer found."""
    photo = jpeg(3, 64)
    return [
        Message("corpus: 100,000 open brackets", b"[" * 100_000, None, None, frozenset({Reason.BAD_JSON})),
        Message(
            "corpus: a 4,400-digit integer",
            b'{"label": "rust", "image": "", "n": ' + b"7" * 4_400 + b"}",
            None,
            None,
            frozenset({Reason.BAD_JSON}),
        ),
        Message(
            "corpus: a JPEG cut to 200 bytes, end marker appended",
            photo[:200] + b"\xff\xd9",
            [("label", "rust")],
            "image/jpeg",
            IMAGE_FAULTS,
        ),
        Message(
            "corpus: a byte-order mark in the label property",
            jpeg(4),
            [("label", "rust\ufeff")],
            "image/jpeg",
            frozenset({Reason.BAD_LABEL}),
        ),
        oversized_message("v5"),
        oversized_message("json"),
    ]


def messages(chooser: Seeded, n: int):
    """The corpus, then generated messages, ``n`` in all, one at a time (thousands held at once take GBs)."""
    weighted = tuple(name for name, weight in MIX.items() for _ in range(weight))
    first = corpus()
    for i in range(n):
        if i < len(first):
            msg = first[i]
        elif chooser.integer(0, 999) < OVERSIZED_PER_MILLE:
            msg = GENERATORS["oversized"](chooser)
        else:
            msg = GENERATORS[chooser.choice(weighted)](chooser)
        yield msg, mqtt_properties(chooser, msg)


class Listener:
    """Collects the notices the daemon publishes on the rejected topic."""

    def __init__(self, port: int, topic: str):
        self.notices: list[dict] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_message = lambda c, u, m: self.notices.append(json.loads(m.payload))
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.connect("127.0.0.1", port)
        self._client.subscribe(topic, qos=1)
        self._client.loop_start()
        assert self._subscribed.wait(10), "the listener's subscription was not confirmed"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def store_counts(state: Path) -> tuple[int, dict[str, int]]:
    db = open_reader(state / "examples.db")
    try:
        total = db.scalar("SELECT count(*) FROM examples")
        return total, dict(db.query("SELECT reason, count FROM rejections"))
    finally:
        db.close()


def stored_rows(state: Path) -> dict[str, tuple]:
    db = open_reader(state / "examples.db")
    try:
        rows = db.query("SELECT example_id, label, split, content_type, width, height, image FROM examples")
        return {r[0]: (*r[1:6], hashlib.sha256(r[6]).hexdigest()) for r in rows}
    finally:
        db.close()


def comparable(detail: str) -> str:
    """A rejection's detail without what differs between two processes: Pillow names the buffer it could not
    identify by its address ("cannot identify image file <_io.BytesIO object at 0x7f...>")."""
    return re.sub(r" at 0x[0-9a-f]+", " at 0x...", detail)


def healthy(d: DaemonProcess, when: str) -> None:
    assert d.proc is not None and d.proc.poll() is None, f"the daemon exited ({when}):\n{d.log()[-3000:]}"
    status, parts = d.health()
    assert status == 200, f"/healthz {status} {parts} {when}; the daemon's log ends:\n{d.log()[-3000:]}"


def test_fuzzed_messages_through_a_running_daemon(broker, daemon_factory):
    started = time.monotonic()
    d = daemon_factory(broker.url).start()
    listener = Listener(broker.port, "sprout/leaves/rejected")
    accepted: dict[str, tuple] = {}  # example id -> the first accepted example with it: what the store must hold
    duplicates = 0
    rejected: Counter = Counter()  # (reason, shown example id, detail) of each in-process rejection
    by_kind: dict[str, Counter] = {}
    wrong: list[str] = []  # messages the parser judged against what their generator knows
    sent = 0
    with Publisher(broker.url, window=64) as pub:
        for i, (msg, props) in enumerate(messages(Seeded(SEED), MESSAGES)):
            # The daemon must agree with the parser run here, message for message.
            result = parse(msg.payload, msg.user_properties, msg.content_type, DAEMON_LIMITS, 0.0)
            check(result, DAEMON_LIMITS)
            if not verdict_matches(msg, result):
                wrong.append(mismatch(msg, result))
            if isinstance(result, Example):
                row = (
                    result.label,
                    result.split,
                    result.content_type,
                    result.width,
                    result.height,
                    hashlib.sha256(result.image).hexdigest(),
                )
                duplicates += result.example_id in accepted
                accepted.setdefault(result.example_id, row)
            else:
                rejected[(result.reason.value, result.example_id, comparable(result.detail))] += 1
            outcome = result.reason.value if isinstance(result, Rejection) else "accepted"
            by_kind.setdefault(msg.kind.split(":")[0], Counter())[outcome] += 1
            pub.publish_raw(TOPIC, msg.payload, props)
            sent += 1
            if i % HEALTH_EVERY == HEALTH_EVERY - 1:
                healthy(d, f"after {sent} messages, the last {msg.describe()}")
        assert pub.wait_all_acked(120), pub.report.as_dict()
    assert pub.report.acked == sent == MESSAGES, pub.report.as_dict()

    rejections = Counter()
    for (reason, _, _), count in rejected.items():
        rejections[reason] += count

    def accounted() -> bool:
        healthy(d, "while the daemon worked through the messages")
        total, counts = store_counts(d.state)
        return total == len(accepted) and sum(counts.values()) == rejections.total()

    try:
        wait_for(accounted, 60 + sent * 0.05, "every message stored or rejected", 0.5)
    finally:
        total, counts = store_counts(d.state)
        print(
            f"\nfuzz daemon: {sent} messages (seed {SEED}) in {time.monotonic() - started:.0f}s: "
            f"stored {total}, duplicates {duplicates}, rejected {sum(counts.values())} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + "); expected stored "
            f"{len(accepted)}, rejected {rejections.total()}"
        )
        for kind, seen in sorted(by_kind.items()):
            print(
                f"fuzz daemon: {kind}: {seen.total()} messages: "
                + ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
            )

    # Stored: exactly the accepted examples, each as the first message with its id carried it.
    assert stored_rows(d.state) == accepted
    assert dict(counts) == dict(rejections)
    assert total + sum(counts.values()) == sent - duplicates
    wait_for(lambda: len(listener.notices) >= rejections.total(), 30, "a notice for every rejection")
    time.sleep(0.5)  # a notice too many would arrive by now
    noticed = Counter((n["reason"], n["example_id"], comparable(n["detail"])) for n in listener.notices)
    assert noticed == rejected, f"notices unlike the rejections: {(noticed - rejected) or (rejected - noticed)}"
    assert all("image" not in n for n in listener.notices)
    stats = json.loads(
        subprocess.run(
            [*SPROUT, "store", "stats", "--state", str(d.state), "--model", d.model],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert (stats["total"], stats["rejected_total"]) == (len(accepted), rejections.total())

    # Still receiving: a good example after all that is stored.
    with Publisher(broker.url) as pub:
        pub.publish(TOPIC, jpeg(5), "rust", "image/jpeg", "after-the-fuzz")
        assert pub.wait_all_acked(10)
    wait_for(lambda: "after-the-fuzz" in stored_ids(d.state), 30, "a good example after the fuzzing")
    healthy(d, "at the end")
    log = d.log()
    for sign in ("Traceback", "MQTT callback", "lost the broker"):
        assert sign not in log, f"the daemon's log holds {sign!r}:\n" + log[max(0, log.find(sign) - 1500) :][:4000]
    listener.close()
    assert d.stop() == 0
    # Last, since the path above is checked whatever the parser decided: what the parser got wrong.
    assert len(wrong) == 0, f"{len(wrong)} of {sent} messages judged wrongly, e.g.:\n" + "\n".join(wrong[:5])
