"""A simulated fleet of 120 devices on the edge library: how each version does, the rollout it steers, and the
photos it sends back for labelling.

Each device is a model folder synced from the real download API, a real interpreter classifying photos
of the three colour classes, and a user who corrects every wrong answer; its counts go back as reports
(edge/telemetry.py) into a real store, and the rollout watch judges them. A version trained on shuffled
labels is halted at its canary stage from those figures alone and its devices go back; a good one moves
5% -> 25% -> 100%.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import PALETTE, colour_jpeg
from learning_helpers import learn_all, make_learner, stream
from PIL import Image
from registry_helpers import public_key_file, registry_signer

from daemon.common.settings import ModelSettings, RolloutSettings, TrainingSettings
from daemon.distribution.http import DownloadApi, HttpServer
from daemon.distribution.rollout_watch import RolloutWatch
from daemon.export.converter import convert, snapshot
from daemon.ingest.field_photos import PhotoLimits
from daemon.learning.learner import Learner
from daemon.registry.versions import Registry
from daemon.store.examples import CommitResult, Store
from daemon.store.labelling import PhotoRules
from daemon.store.reader import StoreReader
from daemon.store.records import FieldPhoto, FieldReport, Rejection
from edge.fetch import ModelServer
from edge.field_photos import Outbox
from edge.model import EdgeModel
from edge.modeldir import DEVICE_ID, ModelDir
from edge.sync import sync
from edge.telemetry import FieldLog

SIZE = 32
DEVICES = 120  # 6 of them in the first 5% of the buckets, 30 in the first 25%
PHOTOS = 10  # each device classifies this many between two reports
STAGES = [5.0, 25.0, 100.0]


@dataclass(frozen=True)
class Models:
    good: bytes
    good_labels: list[str]
    bad: bytes  # trained on shuffled labels: every class learned under another's name
    bad_labels: list[str]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    def trained(examples, where: str) -> tuple[bytes, list[str]]:
        learner, reader = make_learner(tmp_path_factory.mktemp(where), examples)
        learn_all(learner, reader)
        model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
        return convert(model, "none", SIZE), list(learner.labels)

    examples = stream([0, 1, 2], 20, seed=21, order="iid")
    shuffled = [dataclasses.replace(e, label=f"class-{(int(e.label[-1]) + 1) % 3}") for e in examples]
    return Models(*trained(examples, "good"), *trained(shuffled, "bad"))


def fields(labels: list[str]) -> dict:
    return {
        "base": "tiny",
        "labels": labels,
        "input": {"shape": [1, SIZE, SIZE, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
        "quantization": "none",
        "metrics": {},
        "runtimes_verified": [{"name": "ai-edge-litert", "version": "2.3.0"}],
    }


class Fleet:
    """The devices: a folder each, under ``root``, synced from ``url``."""

    def __init__(self, root: Path, url: str, key: Path):
        self.url, self.key = url, key
        self.folders = []
        for i in range(DEVICES):
            folder = root / f"device-{i}"
            folder.mkdir(parents=True)
            (folder / DEVICE_ID).write_text(f"sim-{i}")
            self.folders.append(folder)
        self.rng = np.random.default_rng(5)
        self.photos = {c: [colour_jpeg(c, 900_000 + c * 100 + k) for k in range(20)] for c in range(3)}

    def day(self) -> None:
        """Every device syncs, classifies PHOTOS photos (the user corrects the wrong answers) and reports."""
        for folder in self.folders:
            result = sync(self.url, "leaves", folder, public_key=self.key, runtime=None)
            assert result.ok, result
            log = FieldLog(folder)
            with log.counting() as counts:
                model = EdgeModel.load(folder)
                counts.loaded(model.version)
                for _ in range(PHOTOS):
                    truth = int(self.rng.integers(3))
                    started = time.perf_counter()
                    label, score = model.predict(self.photos[truth][int(self.rng.integers(20))], top=1)[0]
                    counts.predicted(model.version, score, (time.perf_counter() - started) * 1000)
                    if label != f"class-{truth}":
                        counts.corrected(model.version)
            server = ModelServer(self.url, "leaves")
            server.identify(ModelDir(folder).device_id(), model.version)
            assert log.send(server, ModelDir(folder).device_id()).status == "counted"

    def running(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for folder in self.folders:
            v = ModelDir(folder).require_current()
            out[v] = out.get(v, 0) + 1
        return out


@pytest.fixture
def field(registry: Registry, tmp_path: Path) -> Iterator[tuple[Fleet, RolloutWatch]]:
    store = Store(tmp_path / "field.db")

    def sink(item: FieldReport | Rejection) -> bool:
        assert isinstance(item, FieldReport), item
        return store.commit([], [], [item]).reports == 1

    server = HttpServer("127.0.0.1", 0, None, DownloadApi(registry.root, None, ("leaves", sink)))
    server.start()
    cfg = RolloutSettings(stages=STAGES, min_devices=5, min_predictions=50, min_stage_s=0)
    watch = RolloutWatch(lambda: registry, store.location, cfg)
    try:
        yield Fleet(tmp_path / "fleet", f"http://{server.address}", public_key_file(registry_signer(registry))), watch
    finally:
        server.stop(time.monotonic() + 5)
        store.close()


@pytest.mark.slow
def test_a_bad_version_is_halted_at_its_canary_stage_and_a_good_one_reaches_every_device(
    models: Models, registry: Registry, field: tuple[Fleet, RolloutWatch]
):
    fleet, watch = field
    registry.publish(models.good, fields(models.good_labels))  # version 1, to every device
    fleet.day()
    assert fleet.running() == {1: DEVICES}

    registry.publish(models.bad, fields(models.bad_labels), stages=STAGES)  # version 2: a canary of 5%
    for _ in range(3):
        fleet.day()
        if (verdict := watch.check()) is not None and verdict.action != "wait":
            break
    r = registry.rollout()
    assert r is not None and (r.version, r.state, r.percent) == (2, "halted", 5.0), (r, watch.last)
    halted = registry.events()[-1]
    assert halted["event"] == "rollout_halted" and (
        "users corrected" in halted["reason"] or "score" in halted["reason"]
    )
    assert 5 <= halted["figures"]["new"]["devices"] < 25  # judged on the canary's devices only
    fleet.day()
    assert fleet.running() == {1: DEVICES}  # the canary's devices went back to version 1

    registry.publish(models.good, fields(models.good_labels), stages=STAGES)  # version 3: good again
    reached = []
    for _ in range(8):
        fleet.day()
        watch.check()
        r = registry.rollout()
        assert r is not None and r.version == 3 and r.state != "halted", (r, watch.last)
        reached.append(r.percent)
        if r.state == "complete":
            break
    assert reached == sorted(reached) and reached[-1] == 100.0
    assert [e["percent"] for e in registry.events() if e["event"] in ("rollout_advanced", "rollout_complete")] == [
        25.0,
        100.0,
    ]
    fleet.day()
    assert fleet.running() == {3: DEVICES}


def colour_of(jpeg: bytes) -> int:
    """What the simulated agronomist sees in a photo: the palette colour nearest its mean."""
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    return int(np.argmin([np.linalg.norm(mean - np.array(c)) for c in PALETTE]))


@pytest.mark.slow
def test_the_fleets_unsure_and_corrected_photos_reach_the_queue_within_the_cap_and_the_answers_the_next_model(
    registry: Registry, tmp_path: Path
):
    """A fourth class (a new disease) shows up in the field. Devices send back the photos their model was unsure
    of and those their users corrected; the server queues at most its daily cap per device (the rest wait on the
    devices); an agronomist labels the queue, the learner learns the answers, and the next version knows the
    new class on the devices."""
    store = Store(tmp_path / "field.db")
    store.commit(stream([0, 1, 2], 20, seed=21, order="iid"))
    rules = PhotoRules(per_device_per_day=3, max_queued=10_000)

    def take_photo(item: FieldPhoto | Rejection) -> CommitResult:
        assert isinstance(item, FieldPhoto), item
        return store.commit([], [], [], [item], rules)

    server = HttpServer(
        "127.0.0.1",
        0,
        None,
        DownloadApi(
            registry.root,
            None,
            photos=("leaves", take_photo),
            photo_limits=PhotoLimits(1_000_000, 50_000_000, 50_000_000, 64),
        ),
    )
    server.start()
    reader = StoreReader(tmp_path / "field.db")
    settings = TrainingSettings(mode="head", device="cpu", batch_size=4, learning_rate=0.1)
    learner = Learner(ModelSettings(backbone="tiny", input_size=SIZE), settings, tmp_path, reader)
    try:
        learn_all(learner, reader)
        exported = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
        registry.publish(convert(exported, "none", SIZE), fields(list(learner.labels)))  # version 1: 3 classes
        fleet = Fleet(tmp_path / "fleet", f"http://{server.address}", public_key_file(registry_signer(registry)))
        fleet.photos[3] = [colour_jpeg(3, 900_300 + k) for k in range(20)]
        kept = 0
        for folder in fleet.folders:
            assert sync(fleet.url, "leaves", folder, public_key=fleet.key, runtime=None).ok
            model, outbox = EdgeModel.load(folder), Outbox(folder, per_day=6)
            for _ in range(PHOTOS):
                truth = int(fleet.rng.integers(4))
                photo = fleet.photos[truth][int(fleet.rng.integers(20))]
                top = model.predict(photo, top=3)
                if top[0][0] != f"class-{truth}":  # the user corrects it (always so for the new class)
                    outbox.add(photo, "correction", model.version, top, label=f"class-{truth}")
                elif top[0][1] < 0.5:
                    outbox.add(photo, "unsure", model.version, top)
            server_of = ModelServer(fleet.url, "leaves")
            server_of.identify(ModelDir(folder).device_id(), model.version)
            sent = outbox.send(server_of, ModelDir(folder).device_id())
            assert sent.queued <= 3 and sent.refused == 0, sent
            if sent.kept:  # over the server's cap: the rest wait on the device until the next UTC day
                assert sent.queued == 3 and sent.wait_until is not None and len(outbox.photos()) == sent.kept
                kept += sent.kept
        per_device = store._db.query("SELECT device, COUNT(*) FROM field_photos GROUP BY device")
        assert max(n for _, n in per_device) == 3 and len(per_device) >= DEVICES * 0.9
        assert kept > 0, "some devices had more than the cap to send"
        queue, counts = store.labelling_queue(10_000)
        assert counts["queued"] == sum(n for _, n in per_device) and queue[0].kind.value == "correction"

        for queued in queue:  # the agronomist labels what the photo shows
            found = store.labelling_image(queued.id)
            assert found is not None
            store.answer_photo(queued.id, f"class-{colour_of(found[1])}", "agronomist", 64)
        learn_all(learner, reader)
        assert "class-3" in learner.labels
        exported = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
        registry.publish(convert(exported, "none", SIZE), fields(list(learner.labels)))  # version 2

        right = 0
        for folder in fleet.folders[:20]:
            assert sync(fleet.url, "leaves", folder, public_key=fleet.key, runtime=None).ok
            model = EdgeModel.load(folder)
            assert model.version == 2
            right += sum(model.predict(p, top=1)[0][0] == "class-3" for p in fleet.photos[3][:5])
        assert right >= 0.8 * 100, f"the next model knows the new class on {right} of 100 photos"
        print(
            f"fleet: {counts['queued']} photos queued from {len(per_device)} devices (at most 3 each), {kept} kept on "
            f"devices past the cap; version 2 named the new class on {right} of 100 device photos"
        )
    finally:
        learner.close()
        reader.close()
        server.stop(time.monotonic() + 5)
        store.close()
