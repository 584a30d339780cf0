"""The labelling queue: devices' photos checked, stored once within the daily cap, the most useful first, and each
answer a training example (daemon/ingest/field_photos.py, daemon/store/labelling.py, `sprout label`)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import SPROUT, colour_jpeg, rejection_notices, wait_for
from registry_helpers import fields

from daemon.ingest.field_photos import PhotoLimits, parse_field_photo
from daemon.ingest.telemetry import device_digest
from daemon.registry.versions import Registry
from daemon.store.examples import Store
from daemon.store.labelling import AnswerError, PhotoRules
from daemon.store.location import StoreLocation
from daemon.store.reader import StoreReader, open_reader, stats
from daemon.store.records import FieldPhoto, PhotoKind, Reason, Rejection
from daemon.tools.feeder import Publisher

LIMITS = PhotoLimits(max_photo_bytes=100_000, max_image_pixels=50_000_000, max_full_decode_pixels=50_000_000,
                     max_label_chars=64)  # fmt: skip
RULES = PhotoRules(per_device_per_day=3, max_queued=100)


def document(device: str = "phone-1", photo_id: str = "p1", top1: float = 0.4, **changes: object) -> dict:
    doc = {
        "device": device,
        "photo_id": photo_id,
        "kind": "unsure",
        "version": 7,
        "guesses": [{"label": "rust", "score": top1}, {"label": "blight", "score": top1 / 2}],
        "content_type": "image/jpeg",
        "image": base64.b64encode(colour_jpeg(0, seed=hash(photo_id) % 1000, size=48)).decode(),
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def parsed(**fields: Any) -> FieldPhoto | Rejection:
    return parse_field_photo(json.dumps(document(**fields)).encode(), LIMITS, received_at=1_800_000_000.0)


def photo(**fields: Any) -> FieldPhoto:
    item = parsed(**fields)
    assert isinstance(item, FieldPhoto), item
    return item


def test_a_photo_is_checked_and_its_device_id_is_not_kept():
    p = photo(top1=0.3)
    assert p.device == device_digest("phone-1") and "phone-1" not in repr(p)
    assert (p.kind, p.version, p.width, p.height) == (PhotoKind.UNSURE, 7, 48, 48)
    assert [g.label for g in p.guesses] == ["rust", "blight"] and p.uncertainty == pytest.approx(0.7)
    assert photo(photo_id="p2").photo_key != p.photo_key  # a photo_id names a photo among its device's
    assert photo(device="phone-2").photo_key != p.photo_key
    correction = photo(kind="correction", label="healthy")
    assert correction.user_label == "healthy" and correction.uncertainty == 1.0


@pytest.mark.parametrize(
    ("fields", "reason", "says"),
    [
        ({"kind": "maybe"}, Reason.BAD_FIELD_PHOTO, "'kind' must be"),
        ({"kind": "correction"}, Reason.BAD_LABEL, "a correction's 'label'"),
        ({"version": 0}, Reason.BAD_FIELD_PHOTO, "'version'"),
        ({"guesses": []}, Reason.BAD_FIELD_PHOTO, "'guesses'"),
        (
            {"guesses": [{"label": "a", "score": 0.2}, {"label": "b", "score": 0.5}]},
            Reason.BAD_FIELD_PHOTO,
            "best first",
        ),
        ({"guesses": [{"label": "a\nb", "score": 0.2}]}, Reason.BAD_LABEL, "guesses[0].label"),
        ({"guesses": [{"label": "a", "score": 1.5}]}, Reason.BAD_FIELD_PHOTO, "0 to 1"),
        ({"photo_id": ""}, Reason.BAD_FIELD_PHOTO, "'photo_id'"),
        ({"device": None}, Reason.BAD_FIELD_PHOTO, "'device'"),
        ({"content_type": "image/gif"}, Reason.UNSUPPORTED_CONTENT_TYPE, "image/jpeg"),
        ({"image": "not base64!"}, Reason.BAD_BASE64, "base64"),
        ({"image": base64.b64encode(b"hello, not a photo").decode()}, Reason.NOT_AN_IMAGE, ""),
        ({"image": base64.b64encode(colour_jpeg(1, 1, 48)[:-200]).decode()}, Reason.TRUNCATED_IMAGE, "truncated"),
        ({"image": base64.b64encode(b"\xff" * 120_000).decode()}, Reason.TOO_LARGE, "field.max_photo_bytes"),
    ],
)
def test_what_is_wrong_with_a_photo_is_said(fields: dict, reason: Reason, says: str):
    item = parsed(**fields)
    assert isinstance(item, Rejection) and item.reason is reason, item
    assert says in item.detail


def test_documents_that_are_no_photo_are_refused_without_a_traceback():
    for payload in (b"", b"[]", b"{" * 50, b"\xff\xfe", b'{"device": 1e999}', b"x" * 200_000):
        item = parse_field_photo(payload, LIMITS)
        assert isinstance(item, Rejection) and item.reason in (Reason.BAD_FIELD_PHOTO, Reason.TOO_LARGE), payload[:20]


def test_photos_are_stored_once_within_the_daily_cap_and_queued_most_unsure_first(store_location: StoreLocation):
    store = Store(store_location)
    try:
        first = store.commit(
            [], [], [], [photo(photo_id=f"p{i}", top1=t) for i, t in enumerate((0.45, 0.2, 0.35))], RULES
        )
        assert (first.photos.queued, first.photos.resent, first.rejected) == (3, 0, 0)
        again = store.commit([], [], [], [photo(photo_id="p1", top1=0.2), photo(photo_id="p9")], RULES)
        assert (again.photos.queued, again.photos.resent, again.rejected) == (0, 1, 1)  # a resend; one over the cap
        assert (
            again.photos.refused[0].reason is Reason.PHOTO_CAP
            and "photos_per_device_per_day = 3" in again.photos.refused[0].detail
        )
        other = store.commit(
            [], [], [], [photo(device="phone-2", photo_id="p1", kind="correction", label="healthy")], RULES
        )
        assert other.photos.queued == 1  # another device's day
        queue, counts = store.labelling_queue(10)
        # The correction first (the model was wrong, as its user says), then the least sure.
        assert [p.guesses[0].score for p in queue] == [0.4, 0.2, 0.35, 0.45]
        assert queue[0].kind is PhotoKind.CORRECTION and queue[0].suggestions() == ["healthy", "rust", "blight"]
        assert counts == {"queued": 4, "labelled": 0, "skipped": 0, "dropped": 0}
        assert stats(open_reader(store_location))["rejected"] == {"photo_cap": 1}
    finally:
        store.close()


def test_the_queue_keeps_its_bound_by_dropping_the_oldest(tmp_path: Path):
    store = Store(tmp_path / "examples.db")
    rules = PhotoRules(per_device_per_day=100, max_queued=3)
    for i in range(5):
        result = store.commit([], [], [], [photo(photo_id=f"p{i}")], rules)
        assert result.photos.dropped == (1 if i >= 3 else 0)
    queue, counts = store.labelling_queue(10)
    assert sorted(p.id for p in queue) == [3, 4, 5] and counts["dropped"] == 2
    assert store.labelling_image(1) is None  # a dropped photo keeps no image
    assert store.commit([], [], [], [photo(photo_id="p0")], rules).photos.resent == 1  # and is still known
    store.close()


def test_an_answer_is_a_training_example_and_a_photo_is_answered_once(store_location: StoreLocation):
    store = Store(store_location)
    try:
        store.commit([], [], [], [photo(photo_id="a"), photo(photo_id="b")], RULES)
        (first, second), _ = store.labelling_queue(10)
        content_type, image = store.labelling_image(first.id) or ("", b"")
        answered = store.answer_photo(first.id, "blight", "agronomist", 64)
        assert answered.example_id is not None and answered.example_id.startswith("field-")
        reader = StoreReader(store_location)
        (example,) = reader.after(0, 10)
        assert (example.label, example.split, example.image) == ("blight", "train", image)  # never the holdout
        reader.close()
        with pytest.raises(AnswerError, match=r"is labelled 'blight' by agronomist already"):
            store.answer_photo(first.id, "rust", "someone else", 64)
        assert store.answer_photo(second.id, None, "agronomist", 64).example_id is None  # skipped: not learned
        with pytest.raises(AnswerError, match="no photo 99"):
            store.answer_photo(99, "rust", "x", 64)
        with pytest.raises(AnswerError, match="printable"):
            store.answer_photo(first.id, " padded", "x", 64)
        queue, counts = store.labelling_queue(10)
        assert queue == [] and counts == {"queued": 0, "labelled": 1, "skipped": 1, "dropped": 0}
        assert store.totals().examples == 1 and content_type == "image/jpeg"
    finally:
        store.close()


def test_sprout_label_answers_the_queue_in_a_terminal(tmp_path: Path):
    state = tmp_path / "var"
    store = Store(state / "examples.db")
    store.commit(
        [], [], [], [photo(photo_id="a", top1=0.3), photo(photo_id="b", top1=0.45), photo(photo_id="c")], RULES
    )
    store.close()
    listed = subprocess.run(
        [*SPROUT, "label", "list", "--state", state, "--json"], capture_output=True, text=True, check=True
    )
    queue = json.loads(listed.stdout)["queue"]
    assert [p["guesses"][0]["score"] for p in queue] == [0.3, 0.4, 0.45]
    # 2: the second guess; a new class typed twice; then the input ends (as q does).
    session = subprocess.run(
        [*SPROUT, "label", "--state", state, "--save", tmp_path / "shown"],
        input="2\ncurl\ncurl\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert session.returncode == 0, session.stderr
    assert f"photo {queue[0]['id']} labelled 'blight'" in session.stdout
    assert "'curl' is no class yet" in session.stdout and "(a new class" in session.stdout
    assert "stopped (2 answered here, 1 still queued)" in session.stdout
    assert sorted(p.name for p in (tmp_path / "shown").iterdir()) == sorted(f"photo-{p['id']}.jpeg" for p in queue)
    refused = subprocess.run([*SPROUT, "label", "answer", str(queue[0]["id"]), "rust", "--state", state],
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 65 and "already" in refused.stderr
    skipped = subprocess.run(
        [*SPROUT, "label", "skip", str(queue[2]["id"]), "--state", state], capture_output=True, text=True
    )
    assert skipped.returncode == 0 and "skipped" in skipped.stdout
    reader = StoreReader(state / "examples.db")
    assert sorted(e.label for e in reader.after(0, 10)) == ["blight", "curl"]
    reader.close()


def test_a_daemon_queues_photos_from_mqtt_and_http_and_its_page_turns_answers_into_examples(
    broker, daemon_factory, registry: Registry
):
    registry.publish(os.urandom(8192), fields())  # version 1 of "leaves": what devices send photos back from
    d = daemon_factory(broker.url, env={"SPROUT_FIELD__PHOTOS_PER_DEVICE_PER_DAY": "2"}).start()
    base = f"http://127.0.0.1:{d.http_port}"
    with rejection_notices(broker.port) as notices:
        with Publisher(broker.url) as pub:
            for i, top1 in enumerate((0.3, 0.45, 0.2)):  # the third over phone-a's cap of 2
                pub.publish_raw("sprout/leaves/field-photos", json.dumps(document("phone-a", f"m{i}", top1)).encode())
            pub.publish_raw("sprout/leaves/field-photos", json.dumps(document("phone-a", "m0", 0.3)).encode())  # again
            pub.publish_raw("sprout/leaves/field-photos", b'{"device": "phone-b"}')
            assert pub.wait_all_acked(10)
        wait_for(lambda: len(notices) == 2, 10, "the notices of the capped and the bad photo")
    assert sorted(n["reason"] for n in notices) == ["bad_field_photo", "photo_cap"]
    with httpx.Client(base_url=base, timeout=10) as client:
        url = "/v1/models/leaves/field-photos"
        correction = document("phone-b", "h1", 0.6, kind="correction", label="healthy")
        sent = client.post(url, content=json.dumps(correction))
        assert (sent.status_code, sent.json()) == (202, {"queued": True})
        again = client.post(url, content=json.dumps(correction))
        assert again.status_code == 200 and again.json()["queued"] is False
        client.post(url, content=json.dumps(document("phone-b", "h2", 0.5)))
        capped = client.post(url, content=json.dumps(document("phone-b", "h3", 0.5)))
        assert capped.status_code == 429 and 0 < int(capped.headers["retry-after"]) <= 86401
        bad = client.post(url, content=json.dumps(document("phone-c", "x", 0.5, version="7")))
        assert (
            bad.status_code == 400 and bad.json()["reason"] == "bad_field_photo" and "'version'" in bad.json()["error"]
        )
        assert client.post(url, content=b"{" + b" " * 1_500_000 + b"}").status_code == 413

        def queued() -> float:
            found = re.search(r'^sprout_labelling_photos\{state="queued"\} (\S+)$', client.get("/metrics").text, re.M)
            return float(found.group(1)) if found else -1

        wait_for(lambda: queued() == 4, 25, "four queued photos in the metrics")
        metrics = client.get("/metrics").text
        for line in (
            'sprout_field_photos_total{outcome="queued",via="mqtt"} 2.0',
            'sprout_field_photos_total{outcome="resent",via="mqtt"} 1.0',
            'sprout_field_photos_total{outcome="capped",via="mqtt"} 1.0',
            'sprout_field_photos_total{outcome="queued",via="http"} 2.0',
            'sprout_field_photos_total{outcome="capped",via="http"} 1.0',
        ):
            assert line in metrics
        assert '<a href="/label">4 photos wait for a label</a>' in client.get("/").text
        page = client.get("/label").text
        ids = [int(i) for i in re.findall(r'<form class="card" method="post" action="/label/(\d+)">', page)]
        assert len(ids) == 4 and "the user says <b>healthy</b>" in page  # the correction first
        token = re.search(r'name="token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        photo = client.get(f"/label/photo/{ids[0]}")
        assert photo.headers["content-type"] == "image/jpeg" and photo.content[:2] == b"\xff\xd8"
        forged = client.post(f"/label/{ids[0]}", data={"label": "healthy", "token": "guessed"})
        assert forged.status_code == 403
        answered = client.post(f"/label/{ids[0]}", data={"label": "healthy", "token": token})
        assert answered.status_code == 303 and "labelled" in client.get(answered.headers["location"]).text
        typed = client.post(f"/label/{ids[1]}", data={"new": "leaf-curl", "use": "1", "token": token})
        assert typed.status_code == 303
        skipped = client.post(f"/label/{ids[2]}", data={"new": "ignored", "skip": "1", "token": token})
        assert skipped.status_code == 303
        twice = client.post(f"/label/{ids[0]}", data={"label": "rust", "token": token}, follow_redirects=True)
        assert "already" in twice.text
        assert client.get(f"/label/photo/{ids[0]}").status_code == 404  # answered: the example holds the photo now
    reader = StoreReader(d.state / "examples.db")
    assert sorted((e.label, e.split) for e in reader.after(0, 10)) == [("healthy", "train"), ("leaf-curl", "train")]
    reader.close()
    assert stats(open_reader(d.state / "examples.db"))["rejected"] == {"bad_field_photo": 2, "photo_cap": 2}
    assert d.stop() == 0
