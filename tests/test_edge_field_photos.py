"""Photos for labelling from the device's side: sprout-edge's outbox (edge/field_photos.py) filled by
`classify --send-unsure`/`--send-samples` and `correct`, sent by `sync --send-photos` to the daemon's real
model API, wired to a real store as the daemon wires it, and what each of the server's answers does to it."""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, colour_jpeg, sprout_edge
from PIL import ExifTags, Image

from daemon.common.settings import Settings
from daemon.distribution.http import DownloadApi, HttpServer
from daemon.registry.versions import Registry
from daemon.service.daemon import _photo_limits, _photo_rules
from daemon.store import labelling
from daemon.store.examples import CommitResult, Store
from daemon.store.reader import open_reader
from daemon.store.records import FieldPhoto, Rejection
from daemon.tools.broker import free_port
from edge import cli
from edge.fetch import ModelServer
from edge.field_photos import DAY_S, Outbox, PhotoError, SentPhotos, send_photos
from edge.model import EdgeModel
from edge.sync import sync
from edge.telemetry import FieldLog
from edge.watch import Watcher

MODEL = "leaves"  # the registry fixture's (conftest.py)


# -- A model API that takes photos into a real store --------------------------------------------------------


@dataclass
class PhotoServer:
    url: str
    api: DownloadApi
    db: Path

    def queued(self) -> list[labelling.QueuedPhoto]:
        reader = open_reader(self.db)
        try:
            return labelling.queue(reader, 100)
        finally:
            reader.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., PhotoServer]]:
    """``serve(per_day=, photos=, failing=, root=, max_photo_bytes=)``: the daemon's model API on a free port, its
    photos committed as daemon/service/daemon.py's ``_take_photo`` commits them (``failing``: the store is down)."""
    started: list[HttpServer] = []
    stores: list[Store] = []

    def make(
        per_day: int = 20,
        photos: bool = True,
        failing: bool = False,
        root: Path | None = None,
        max_photo_bytes: int = 1_000_000,
    ) -> PhotoServer:
        limits = {"photos": photos, "photos_per_device_per_day": per_day, "max_photo_bytes": max_photo_bytes}
        settings = Settings(field=limits)
        db = tmp_path / f"examples-{len(started)}.db"
        store = Store(db)
        stores.append(store)

        def take(item: FieldPhoto | Rejection) -> CommitResult:
            if failing:
                raise OSError("disk full")
            if isinstance(item, Rejection):
                return store.commit([], [item])
            return store.commit([], [], [], [item], _photo_rules(settings))

        if root is None:  # the API answers for a model once its registry folder exists (its first publish)
            root = tmp_path / "registry"
            (root / MODEL).mkdir(parents=True, exist_ok=True)
        api = DownloadApi(root, None, None, (MODEL, take), _photo_limits(settings))
        server = HttpServer("127.0.0.1", 0, None, api)
        server.start()
        started.append(server)
        return PhotoServer(f"http://{server.address}", api, db)

    yield make
    for server in started:
        server.stop(time.monotonic() + 5)
    for store in stores:
        store.close()


@dataclass
class Clock:
    """A phone's clock that the test sets."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


def small_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def sideways_phone_jpeg() -> bytes:
    """A 2000x1500 photo as a phone's sensor stores it: sideways, with EXIF saying to turn it (orientation 6:
    90 degrees clockwise), which phone took it and where. Upright it is 1500x2000, red at the top, green below."""
    upright = Image.new("RGB", (1500, 2000), (40, 200, 40))
    upright.paste((220, 40, 40), (0, 0, 1500, 300))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (52.0, 30.0, 0.0)}
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def sent_image(path: Path) -> tuple[dict, bytes]:
    document = json.loads(path.read_bytes())
    return document, base64.b64decode(document["image"], validate=True)


GUESSES = [("rust", 0.41), ("blight", 0.33), ("healthy", 0.26)]


# -- What goes into the outbox -------------------------------------------------------------------------------


def test_a_sideways_phone_photo_is_kept_upright_at_640_pixels_without_its_exif(tmp_path: Path):
    original = tmp_path / "leaf.jpg"
    original.write_bytes(sideways_phone_jpeg())
    with Image.open(original) as img:  # the photo as it left the camera
        assert img.size == (2000, 1500) and img.getexif()[ExifTags.Base.Orientation] == 6
    outbox = Outbox(tmp_path / "phone")
    assert outbox.add(original, "unsure", 7, GUESSES) is True
    [path] = outbox.photos()
    document, jpeg = sent_image(path)
    assert path.name == f"{document['photo_id']}.photo.json" and path.parent == tmp_path / "phone" / "outbox"
    assert "device" not in document  # added at send time
    assert (document["kind"], document["version"], document["content_type"]) == ("unsure", 7, "image/jpeg")
    assert document["guesses"] == [{"label": label, "score": score} for label, score in GUESSES]
    assert b"PhoneMaker" not in jpeg and b"Exif" not in jpeg
    with Image.open(io.BytesIO(jpeg)) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (480, 640))
        assert len(img.getexif()) == 0
        pixels = np.asarray(img)
    (r, g, _), (r2, g2, _) = pixels[20, 240], pixels[600, 240]
    assert r > 180 and g < 90 and g2 > 160 and r2 < 90  # upright: red at the top, green below

    small = Image.new("RGBA", (300, 200), (10, 20, 30, 0))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    assert outbox.add(buf.getvalue(), "correction", 7, GUESSES[:1], label=" blight ")
    document, jpeg = sent_image(outbox.photos()[-1])
    assert document["label"] == "blight" and document["guesses"] == [{"label": "rust", "score": 0.41}]
    with Image.open(io.BytesIO(jpeg)) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (300, 200))  # never enlarged

    with pytest.raises(PhotoError, match="not an image"):
        outbox.add(b"not a photo", "unsure", 7, GUESSES)
    with pytest.raises(ValueError, match="label is 1-128 printable"):
        outbox.add(small_jpeg(1), "correction", 7, GUESSES, label="rust\nblight")
    with pytest.raises(ValueError, match="kind must be one of"):
        outbox.add(small_jpeg(1), "wrong", 7, GUESSES)
    assert len(outbox.photos()) == 2


def test_the_device_queues_at_most_its_daily_cap_and_keeps_at_most_its_bound(tmp_path: Path):
    clock = Clock()
    outbox = Outbox(tmp_path / "phone", clock=clock)
    assert all(outbox.add(small_jpeg(i), "unsure", 3, GUESSES) for i in range(20))
    assert outbox.add(small_jpeg(20), "unsure", 3, GUESSES) is False  # the 21st of the UTC day
    assert len(outbox.photos()) == 20
    clock.now += DAY_S
    assert outbox.add(small_jpeg(21), "unsure", 3, GUESSES) is True
    assert len(outbox.photos()) == 21

    bounded = Outbox(tmp_path / "offline", per_day=100, keep=3)
    names = []
    for i in range(5):
        assert bounded.add(small_jpeg(i), "sample", 3, GUESSES)
        names.append(bounded.photos()[-1].name)
    assert [p.name for p in bounded.photos()] == names[2:]  # the oldest two dropped


# -- What the server's answers do to it ----------------------------------------------------------------------


def test_sent_photos_are_queued_once_on_the_server_and_leave_the_outbox(serve, tmp_path: Path):
    server = serve()
    outbox = Outbox(tmp_path / "phone")
    assert outbox.add(sideways_phone_jpeg(), "unsure", 4, GUESSES)
    assert outbox.add(small_jpeg(1), "correction", 4, GUESSES, label="blight")
    first = outbox.photos()[0]
    copy = first.read_bytes()

    sent = outbox.send(ModelServer(server.url, MODEL), "phone-1")
    assert sent == SentPhotos(queued=2, resent=0, refused=0, kept=0, wait_until=None)
    assert outbox.photos() == []
    queued = sorted(server.queued(), key=lambda p: p.kind.value)
    assert [(p.kind.value, p.version, p.user_label) for p in queued] == [
        ("correction", 4, "blight"),
        ("unsure", 4, None),
    ]
    assert [(g.label, g.score) for g in queued[1].guesses] == GUESSES
    assert (queued[1].width, queued[1].height, queued[0].width, queued[0].height) == (480, 640, 64, 48)

    first.write_bytes(copy)  # its answer was lost: the phone sends it again
    again = outbox.send(ModelServer(server.url, MODEL), "phone-1")
    assert (again.queued, again.resent, again.kept) == (0, 1, 0) and outbox.photos() == []
    assert len(server.queued()) == 2 and server.api.photo_outcomes["resent"] == 1


def test_over_the_servers_daily_cap_a_photo_waits_in_the_outbox_until_retry_after(serve, tmp_path: Path):
    server = serve(per_day=2)
    clock = Clock()
    outbox = Outbox(tmp_path / "phone", clock=clock)
    for i in range(3):
        assert outbox.add(small_jpeg(i), "unsure", 1, GUESSES)
    third = outbox.photos()[2]

    sent = outbox.send(ModelServer(server.url, MODEL), "phone-1")
    assert (sent.queued, sent.kept, outbox.photos()) == (2, 1, [third])
    next_utc_day = (time.time() // DAY_S + 1) * DAY_S
    assert sent.wait_until is not None and abs(sent.wait_until - next_utc_day) < 5  # the server's Retry-After
    assert "429" in sent.detail and server.api.photo_outcomes["capped"] == 1

    for later in (outbox, Outbox(tmp_path / "phone", clock=clock)):  # another process reads the wait too
        clock.now += 60
        waiting = later.send(ModelServer(server.url, MODEL), "phone-1")
        assert waiting == SentPhotos(kept=1, wait_until=sent.wait_until)
    assert server.api.photo_outcomes["capped"] == 1  # nothing was sent before Retry-After

    clock.now = sent.wait_until + 1
    outbox.send(ModelServer(server.url, MODEL), "phone-1")
    assert server.api.photo_outcomes["capped"] == 2 and outbox.photos() == [third]  # tried again after it


def test_a_photo_the_server_refuses_is_dropped_saying_why_and_the_rest_are_sent(serve, tmp_path: Path, caplog):
    # Photos of 10 kB at most: a document that says it holds more is read whole and answered 413 (one far larger
    # is answered before it is read, and the server's close cuts the upload short: no answer the device can read).
    server = serve(max_photo_bytes=10_000)
    outbox = Outbox(tmp_path / "phone")
    for i in range(4):
        assert outbox.add(small_jpeg(i), "unsure", 1, GUESSES)
    bad_label, too_large, not_json, good = outbox.photos()
    document = json.loads(bad_label.read_bytes())
    document["guesses"][0]["label"] = "rust\nblight"
    bad_label.write_text(json.dumps(document))
    larger = {**json.loads(too_large.read_bytes()), "image": base64.b64encode(bytes(12_000)).decode()}
    too_large.write_text(json.dumps(larger))
    not_json.write_bytes(b'{"photo_id": "cut sh')

    with caplog.at_level(logging.WARNING, logger="sprout_edge.field_photos"):
        sent = outbox.send(ModelServer(server.url, MODEL), "phone-1")
    assert (sent.queued, sent.refused, sent.kept) == (1, 3, 0) and outbox.photos() == []
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"refused photo {bad_label.name}" in said and "guesses[0].label must be a label" in said
    assert f"refused photo {too_large.name}" in said and "413" in said
    assert f"{not_json} is unreadable" in said
    assert len(server.queued()) == 1 and server.api.photo_outcomes["rejected"] == 2


def test_a_server_that_cannot_take_photos_now_leaves_every_photo_for_later(serve, tmp_path: Path):
    clock = Clock()
    outbox = Outbox(tmp_path / "phone", clock=clock)
    for i in range(2):
        assert outbox.add(small_jpeg(i), "unsure", 1, GUESSES)
    photos = outbox.photos()

    unreachable = outbox.send(ModelServer(f"http://127.0.0.1:{free_port()}", MODEL), "phone-1")
    assert (unreachable.kept, unreachable.wait_until) == (2, None) and "cannot reach" in unreachable.detail
    not_taken = outbox.send(ModelServer(serve(photos=False).url, MODEL), "phone-1")
    assert (not_taken.kept, not_taken.wait_until) == (2, clock.now + 3600) and "404" in not_taken.detail  # an hour
    clock.now += 3601
    failing = outbox.send(ModelServer(serve(failing=True).url, MODEL), "phone-1")
    assert (failing.kept, failing.wait_until) == (2, clock.now + 300) and "503" in failing.detail  # its Retry-After
    assert outbox.photos() == photos

    # send_photos, as `sync --send-photos` calls it: never raises, and waits out that Retry-After too.
    server = serve()
    assert send_photos(server.url, MODEL, tmp_path / "phone") == SentPhotos(kept=2, wait_until=failing.wait_until)
    clock.now -= 3 * DAY_S  # a wait further off than any server asks: the phone's clock was set back since
    assert outbox.send(ModelServer(server.url, MODEL), "phone-1") == SentPhotos(queued=2)


# -- The command line, end to end on a real model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[bytes, list[str]]:
    """The tiny network trained on three colours, exported once at 32 pixels (float32 weights)."""
    from learning_helpers import learn_all, make_learner, stream

    from daemon.export.converter import convert, snapshot

    learner, reader = make_learner(tmp_path_factory.mktemp("learner"), stream([0, 1, 2], 20, seed=21, order="iid"))
    learn_all(learner, reader)
    model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
    return convert(model, "none", 32), list(learner.labels)


def test_classify_and_correct_queue_photos_and_sync_sends_them(
    serve, tiny_model, registry: Registry, public_key: Path, tmp_path: Path
):
    from registry_helpers import fields

    tflite, labels = tiny_model
    shape = {"shape": [1, 32, 32, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]}
    registry.publish(tflite, fields(labels, input=shape, quantization="none", metrics={}))
    server = serve(root=registry.root)
    device = tmp_path / "device"
    assert sync(server.url, MODEL, device, public_key).current == 1
    images = []
    for name, data in (("colour.jpg", colour_jpeg(0, 900, size=48)), ("grey.jpg", small_jpeg(5))):
        images.append(tmp_path / name)
        images[-1].write_bytes(data)
    model = EdgeModel.load(device)
    top1 = [model.predict(image, 1)[0][1] for image in images]
    assert top1[0] != top1[1]
    below = sum(top1) / 2  # one image above it, one below

    classified = edge_cli("classify", "--dir", device, *images, "--json", "--send-unsure", below)
    results = json.loads(classified.stdout)["results"]
    assert [r["queued_for_labelling"] for r in results] == [score < below for score in top1]
    assert all(len(r["top"]) == 3 for r in results)
    assert "queued as 'class-2'" in edge_cli("correct", "--dir", device, images[0], "--label", "class-2").stdout
    counted = FieldLog(device).read()["pending"]["1"]
    assert (counted["loads"], counted["predictions"], counted["corrections"]) == (1, 1, 1)  # classify: no --report
    assert len(Outbox(device).photos()) == 2

    synced = edge_cli(
        "sync", "--url", server.url, "--model", MODEL, "--dir", device, "--public-key", public_key, "--send-photos"
    )
    assert "2 photos queued for labelling" in synced.stderr and Outbox(device).photos() == []
    queued = {p.kind.value: p for p in server.queued()}
    assert sorted(queued) == ["correction", "unsure"] and queued["correction"].user_label == "class-2"
    assert [g.label for g in queued["unsure"].guesses] == [e["label"] for e in results[top1.index(min(top1))]["top"]]

    # --send-samples 1 draws every image; a watch round sends the outbox as the one-off sync did.
    assert "queued for labelling" in edge_cli("classify", "--dir", device, images[0], "--send-samples", "1").stdout
    Watcher(server.url, MODEL, device, public_key, runtime=None, send_photos=True).on_tick()
    assert Outbox(device).photos() == [] and "sample" in {p.kind.value for p in server.queued()}


def edge_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """``sprout-edge`` in a process of its own, as a device runs it; it must succeed."""
    done = subprocess.run(sprout_edge(*args), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


def test_the_photo_flags_refuse_what_would_be_misread(capsys):
    for argv, says in (
        (["classify", "--dir", "d", "--send-unsure", "leaf.jpg"], "put the flag after the images"),
        (["classify", "--dir", "d", "leaf.jpg", "--send-unsure", "1.5"], "at most 1"),
        (["classify", "--dir", "d", "leaf.jpg", "--send-samples", "0"], "at least 1"),
        (["correct", "--dir", "d", "leaf.jpg", "--label", "rust\nblight"], "printable characters on one line"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == cli.EXIT_USAGE and says in capsys.readouterr().err
