"""Devices' reports: what the wire accepts and refuses, and how the store counts them (once each), on both backends."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port, rejection_notices, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_helpers import fields

from daemon.distribution.http import DownloadApi, HttpServer
from daemon.ingest.telemetry import bucket_of, device_digest, parse_report
from daemon.registry.versions import Registry
from daemon.store.examples import Store
from daemon.store.field import versions_in_field
from daemon.store.location import StoreLocation
from daemon.store.reader import open_reader
from daemon.store.reader import stats as stats_of
from daemon.store.records import FieldReport, Reason, Rejection
from daemon.tools.feeder import Publisher
from edge.fetch import ModelServer
from edge.telemetry import FieldLog, Sent


def counts(version: int, predictions: int = 10, **kw: object) -> dict[str, object]:
    bins = [0] * 10
    bins[9] = predictions - predictions // 5
    bins[2] = predictions // 5  # a fifth unsure
    return {
        "version": version,
        "loads": 1,
        "load_failures": 0,
        "predictions": predictions,
        "confidence_sum": 0.95 * bins[9] + 0.25 * bins[2],
        "confidence_bins": bins,
        "corrections": 1 if predictions else 0,
        "latency_ms_sum": 20.0 * predictions,
        **kw,
    }


def report(device: str, seq: int, *versions: dict[str, object], **kw: object) -> bytes:
    return json.dumps({"device": device, "seq": seq, "versions": list(versions), **kw}).encode()


def test_a_report_is_read_and_the_device_id_is_kept_only_as_a_digest():
    r = parse_report(report("phone-1", 3, counts(7, 40), counts(6, 0, loads=0, load_failures=2)), 100.0)
    assert isinstance(r, FieldReport)
    assert r.device == device_digest("phone-1") and "phone-1" not in repr(r)
    assert r.bucket == bucket_of(r.device) and 0 <= r.bucket < 10_000
    assert (r.seq, r.received_at, [v.version for v in r.versions]) == (3, 100.0, [7, 6])
    assert r.versions[0].confidence_bins[9] == 32 and r.versions[1].load_failures == 2
    extra = parse_report(report("phone-1", 4, {**counts(7), "battery": 0.5}, app="2.1"))  # unknown fields: ignored
    assert isinstance(extra, FieldReport)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (report("", 1, counts(1)), "'device' must be"),
        (report("a\nb", 1, counts(1)), "'device' must be"),
        (report("x" * 129, 1, counts(1)), "'device' must be"),
        (report("p", 0, counts(1)), "'seq' must be an integer from 1"),
        (report("p", True, counts(1)), "'seq' must be"),
        (report("p", 1), "'versions' must be a list of 1 to 32"),
        (report("p", 1, *[counts(v) for v in range(1, 34)]), "'versions' must be a list of 1 to 32"),
        (report("p", 1, counts(2), counts(2)), "names a version twice"),
        (report("p", 1, counts(0)), r"versions\[0\].version must be"),
        (report("p", 1, counts(1, loads=-1)), r"versions\[0\].loads must be a count"),
        (report("p", 1, {**counts(1), "predictions": 2.5}), r"versions\[0\].predictions must be a count"),
        (report("p", 1, counts(1, confidence_sum="high")), r"versions\[0\].confidence_sum must be a number"),
        (report("p", 1, counts(1, confidence_bins=[1, 2])), r"confidence_bins must be 10 counts"),
        (report("p", 1, {**counts(1), "predictions": 11}), r"confidence_bins add up to 10, not predictions = 11"),
        (report("p", 1, counts(1, confidence_sum=10.5)), "confidence_sum exceeds predictions"),
        (report("p", 1, counts(1, corrections=11)), "corrections exceed predictions"),
        (b'{"device": "p", "seq": 1, "versions": [{"version": 1, "latency_ms_sum": NaN}]}', "not valid JSON"),
        (b'{"device": "p", "seq": 1' + b"9" * 40 + b', "versions": []}', "not valid JSON"),
        (b"[" * 200 + b"]" * 200, "nests more than"),
        (b" " * 70_000, "exceeds 65536"),
    ],
)
def test_a_bad_report_is_rejected_saying_which_field(payload: bytes, says: str):
    r = parse_report(payload, 5.0)
    assert isinstance(r, Rejection) and r.reason is Reason.BAD_TELEMETRY and r.received_at == 5.0
    assert r.example_id is None and re.search(says, r.detail), r.detail


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_no_document_makes_the_parser_raise(doc):
    payload = json.dumps({"device": "p", "seq": 1, "versions": [doc]}, allow_nan=True).encode()
    assert isinstance(parse_report(payload), FieldReport | Rejection)
    assert isinstance(parse_report(json.dumps(doc, allow_nan=True).encode()), Rejection)


def test_the_store_counts_each_report_once_and_adds_them_up_per_version(store_location: StoreLocation):
    store = Store(store_location)
    first = [parse_report(report(f"phone-{i}", 1, counts(7, 10), counts(6, 5)), 10.0 + i) for i in range(3)]
    assert all(isinstance(r, FieldReport) for r in first)
    result = store.commit([], [], first)  # type: ignore[arg-type]
    assert (result.reports, result.resent_reports) == (3, 0)
    # phone-0 resends its report (a redelivery: the same seq), then sends its next one; phone-1 an older one.
    later = [
        parse_report(report("phone-0", 1, counts(7, 10)), 20.0),
        parse_report(report("phone-0", 2, counts(7, 30)), 21.0),
        parse_report(report("phone-1", 1, counts(7, 99)), 22.0),
    ]
    result = store.commit([], [], later)  # type: ignore[arg-type]
    assert (result.reports, result.resent_reports) == (1, 2)
    v7, v6 = versions_in_field(open_reader(store_location))
    assert (v7.version, v7.devices, v7.predictions, v7.loads, v7.corrections) == (7, 3, 60, 4, 4)
    assert v7.confidence_bins[9] == 8 * 3 + 24 and v7.confidence_bins[2] == 2 * 3 + 6
    assert v7.share_below(0.5) == pytest.approx(12 / 60) and v7.share_below(0.2) == 0
    assert v7.mean_confidence == pytest.approx((0.95 * 48 + 0.25 * 12) / 60)
    assert v7.mean_latency_ms == pytest.approx(20.0) and v7.correction_share == pytest.approx(4 / 60)
    assert v7.load_failure_share == 0 and v7.last_seen == 21.0
    assert (v6.version, v6.devices, v6.predictions) == (6, 3, 15)
    assert [v.version for v in versions_in_field(open_reader(store_location), since=15.0)] == [7]
    # Counters not added to since a time are forgotten, with the devices not heard from since: phone-1 then
    # starts afresh, its seq 1 counted again.
    assert store.forget_reports(older_than=15.0) == 5
    (v7,) = versions_in_field(open_reader(store_location))
    assert (v7.devices, v7.predictions) == (1, 40)
    again = parse_report(report("phone-1", 1, counts(7, 5)), 30.0)
    assert isinstance(again, FieldReport) and store.commit([], [], [again]).reports == 1


def test_a_daemon_takes_reports_over_mqtt_and_http_and_shows_them(broker, daemon_factory, registry: Registry):
    registry.publish(os.urandom(8192), fields())  # version 1 of "leaves", which the devices report on
    d = daemon_factory(broker.url).start()
    base = f"http://127.0.0.1:{d.http_port}"
    with rejection_notices(broker.port) as notices:
        with Publisher(broker.url) as pub:
            pub.publish_raw("sprout/leaves/telemetry", report("phone-a", 1, counts(1, 20)))
            pub.publish_raw("sprout/leaves/telemetry", report("phone-a", 1, counts(1, 20)))  # a resend
            pub.publish_raw("sprout/leaves/telemetry", report("phone-b", 1, counts(1, 10, corrections=0)))
            pub.publish_raw("sprout/leaves/telemetry", b'{"device": "phone-c", "seq": 1}')
            assert pub.wait_all_acked(10)
        wait_for(lambda: len(notices) == 1, 10, "the bad report's notice")
    assert notices[0]["reason"] == "bad_telemetry" and "'versions' must be a list" in notices[0]["detail"]
    with httpx.Client(base_url=base, timeout=10) as client:
        url = "/v1/models/leaves/telemetry"
        sent = client.post(url, content=report("phone-c", 5, counts(1, 30), counts(2, 0, loads=0, load_failures=1)))
        assert (sent.status_code, sent.json()) == (202, {"counted": True})
        again = client.post(url, content=report("phone-c", 5, counts(1, 30)))
        assert again.status_code == 200 and again.json()["counted"] is False and "seq 5" in again.json()["why"]
        bad = client.post(url, content=report("phone-d", 1, {**counts(1), "corrections": 99}))
        assert bad.status_code == 400 and bad.json()["reason"] == "bad_telemetry"
        assert "versions[0].corrections exceed predictions" in bad.json()["error"]
        assert client.post(url, content=b"{" + b" " * 70_000 + b"}").status_code == 413
        assert client.post("/v1/models/maize/telemetry", content=report("p", 1, counts(1))).status_code == 404

        def shown() -> dict[str, float]:
            text = client.get("/metrics").text
            return {m[0]: float(m[1]) for m in re.findall(r'^(sprout_field_\w+\{version="1"\}) (\S+)$', text, re.M)}

        wait_for(lambda: shown().get('sprout_field_devices{version="1"}') == 3, 25, "the three devices in the metrics")
        figures = shown()
        assert figures['sprout_field_predictions{version="1"}'] == 60
        assert figures['sprout_field_correction_ratio{version="1"}'] == pytest.approx(2 / 60)
        assert figures['sprout_field_unsure_ratio{version="1"}'] == pytest.approx(12 / 60)
        metrics = client.get("/metrics").text
        assert 'sprout_field_load_failure_ratio{version="2"} 1.0' in metrics
        for line in (
            'sprout_field_reports_total{outcome="counted",via="mqtt"} 2.0',
            'sprout_field_reports_total{outcome="resent",via="mqtt"} 1.0',
            'sprout_field_reports_total{outcome="counted",via="http"} 1.0',
            'sprout_field_reports_total{outcome="rejected",via="http"} 1.0',
        ):
            assert line in metrics
        page = client.get("/").text
        assert '<section id="field">' in page and "<td>1</td><td>3</td><td>60</td>" in page
    stats = stats_of(open_reader(d.state / "examples.db"))
    assert stats["rejected"] == {"bad_telemetry": 2} and stats["total"] == 0  # reports are no examples
    assert d.stop() == 0


def test_a_device_keeps_its_counts_until_a_report_carrying_them_is_answered(registry: Registry, tmp_path: Path):
    """sprout-edge's side: counted in the model folder, a report in flight sent again with its seq until answered."""
    registry.publish(os.urandom(4096), fields())
    phone = tmp_path / "phone"
    log = FieldLog(phone)
    with log.counting() as c:
        c.loaded(1)
        for score in (0.95, 0.35, 1.0):
            c.predicted(1, score, 12.0)
        c.corrected(1)
        c.predicted(1, float("nan"), 1.0)  # not a prediction to count
    assert log.read()["pending"]["1"]["confidence_bins"] == [0, 0, 0, 1, 0, 0, 0, 0, 0, 2]
    away = ModelServer(f"http://127.0.0.1:{free_port()}", "leaves")
    kept = log.send(away, "phone-x")
    assert (kept.status, kept.seq) == ("kept", 1) and log.read()["in_flight"]["seq"] == 1
    with log.counting() as c:  # while report 1 waits, more counts pile up for report 2
        c.predicted(2, 0.8, 10.0)
    store = Store(tmp_path / "examples.db")
    counted: list[FieldReport] = []

    def sink(item: FieldReport | Rejection) -> bool:
        assert isinstance(item, FieldReport)
        counted.append(item)
        return store.commit([], [], [item]).reports == 1

    server = HttpServer("127.0.0.1", 0, None, DownloadApi(registry.root, None, ("leaves", sink)))
    server.start()
    try:
        here = ModelServer(f"http://{server.address}", "leaves")
        assert log.send(here, "phone-x") == Sent("counted", 1, "")
        assert log.send(here, "phone-x").status == "counted" and log.read()["in_flight"] is None
        assert log.send(here, "phone-x").status == "nothing"
    finally:
        server.stop(time.monotonic() + 5)
    assert [r.seq for r in counted] == [1, 2] and counted[0].device == device_digest("phone-x")
    v2, v1 = versions_in_field(open_reader(tmp_path / "examples.db"))
    assert (v1.loads, v1.predictions, v1.corrections, v1.latency_ms_sum) == (1, 3, 1, 36.0)
    assert v1.confidence_sum == pytest.approx(2.3) and (v2.version, v2.predictions) == (2, 1)


def test_a_broker_refusing_the_telemetry_topic_leaves_the_feed_working_and_says_so(caplog):
    """Brokers that refuse a subscription their ACL denies (EMQX, HiveMQ: SUBACK 0x87; Mosquitto 2.0 grants it
    and delivers nothing): the examples' subscription is what the feed needs."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from daemon.common.settings import Settings
    from daemon.ingest.feed import Feed

    s = Settings.load(None)
    feed = Feed(s.mqtt, s.store, "leaves", "test-feed", telemetry=True)
    granted, refused = ReasonCode(PacketTypes.SUBACK, identifier=1), ReasonCode(PacketTypes.SUBACK, identifier=0x87)
    feed._on_subscribe(None, None, 1, [granted, refused], None)
    assert feed.subscribed.is_set() and feed.failure is None
    assert "devices' reports are not taken over MQTT" in caplog.text and "sprout/leaves/telemetry" in caplog.text
    feed.subscribed.clear()
    feed._on_subscribe(None, None, 2, [refused, granted], None)
    assert not feed.subscribed.is_set() and "refused the subscription to sprout/leaves/examples" in caplog.text
