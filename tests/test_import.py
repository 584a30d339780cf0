"""`sprout store import`: a folder of labelled images into the store, as the MQTT path would store them."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

from helpers import LEARNING, SPROUT, colour_jpeg, jpeg, metrics, png, stored_ids, wait_for

from daemon import cli
from daemon.common.settings import Settings
from daemon.ingest import wire
from daemon.ingest.folders import content_id
from daemon.ingest.importer import Progress, import_folder
from daemon.ingest.wire import holdout_split
from daemon.store.examples import Store
from daemon.tools.feeder import Publisher


def rows(state: Path) -> dict[str, tuple[str, str, str]]:
    """example_id -> (label, split, content_type) of every stored example."""
    db = sqlite3.connect(state / "examples.db")
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT example_id, label, split, content_type FROM examples")}
    finally:
        db.close()


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def sprout(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SPROUT, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def import_in_process(capsys, folder: Path, state: Path) -> tuple[int, dict, str]:
    code = cli.main(["store", "import", str(folder), "--state", str(state)])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def test_split_folders_labels_and_bad_files(tmp_path):
    photos = tmp_path / "photos"
    expected: dict[str, tuple[str, str, str]] = {}
    seed = 0
    for split_dir, split in (("train", "train"), ("holdout", "holdout"), ("val", "holdout")):
        for label in ("Tomato___Late_blight", "Tomato___healthy"):
            for i in range(3):
                seed += 1
                data = write(photos / split_dir / label / f"{i}.jpg", jpeg(seed))
                expected[content_id(data)] = (label, split, "image/jpeg")
    # Nested one deeper, and a PNG named .jpg: the bytes decide the type, the label folder the label.
    data = write(photos / "train" / "Tomato___healthy" / "day2" / "looks-like.jpg", png(7))
    expected[content_id(data)] = ("Tomato___healthy", "train", "image/png")
    bad = photos / "train" / "Tomato___Late_blight"
    write(bad / "notes.jpg", b"this is a text file, not a photo\n")
    write(bad / "cut.jpg", jpeg(8, size=64)[:400])
    write(bad / "empty.png", b"")
    write(bad / ".DS_Store", b"\0\0\0\1Bud1")  # hidden: passed over
    write(bad / "._0.jpg", b"\0\5\26\7AppleDouble")  # macOS's resource twin of 0.jpg: hidden too
    write(bad / "labels.csv", b"file,label\n")  # not named like an image: ignored, counted

    out = sprout("store", "import", str(photos), "--state", str(tmp_path / "state"))
    assert out.returncode == 65, out.stderr  # some files skipped: the rest are stored, the script is told
    assert json.loads(out.stdout) | {"seconds": 0} == {
        "stored": 19,
        "duplicates": 0,
        "skipped": 3,
        "skipped_by_reason": {"empty_image": 1, "not_an_image": 1, "truncated_image": 1},
        "ignored": 1,
        "pruned": 0,
        "seconds": 0,
    }
    for name, reason in (("notes.jpg", "not_an_image"), ("cut.jpg", "truncated_image"), ("empty.png", "empty_image")):
        assert f"skipped {bad / name}: {reason}: " in out.stderr
    assert "DS_Store" not in out.stderr and "._0.jpg" not in out.stderr and "labels.csv" not in out.stderr
    assert rows(tmp_path / "state") == expected
    stats = json.loads(sprout("store", "stats", "--state", str(tmp_path / "state")).stdout)
    assert stats["total"] == 19
    assert stats["per_split"] == {"train": 7, "holdout": 12}
    assert stats["per_label"] == {"Tomato___Late_blight": 9, "Tomato___healthy": 10}


def test_without_split_folders_the_daemons_hash_rule_splits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPROUT_STORE__HOLDOUT_FRACTION", "0.5")
    for i in range(40):
        write(tmp_path / "photos" / ("rust" if i % 2 else "healthy") / f"{i}.jpg", jpeg(i))
    code, summary, _ = import_in_process(capsys, tmp_path / "photos", tmp_path / "state")
    assert code == 0 and summary["stored"] == 40
    stored = rows(tmp_path / "state")
    # The same rule on the same id as an MQTT message without a split property.
    assert all(split == holdout_split(example_id, 0.5) for example_id, (_, split, _) in stored.items())
    assert {split for _, split, _ in stored.values()} == {"train", "holdout"}


def test_importing_twice_adds_nothing(tmp_path, capsys):
    for i in range(12):
        write(tmp_path / "photos" / f"class-{i % 3}" / f"{i}.jpg", jpeg(i))
    code, first, _ = import_in_process(capsys, tmp_path / "photos", tmp_path / "state")
    assert code == 0 and (first["stored"], first["duplicates"]) == (12, 0)
    before = stored_ids(tmp_path / "state")
    code, again, _ = import_in_process(capsys, tmp_path / "photos", tmp_path / "state")
    assert code == 0 and (again["stored"], again["duplicates"]) == (0, 12)
    assert stored_ids(tmp_path / "state") == before  # not even a new seq


def test_the_same_photo_under_two_names_is_stored_once(tmp_path, capsys):
    photo = jpeg(1)
    write(tmp_path / "photos" / "train" / "rust" / "IMG_0001.jpg", photo)
    write(tmp_path / "photos" / "train" / "rust" / "IMG_0001 (copy).JPG", photo)
    # Also in holdout: stored once, so the gates never score a photo the learner trained on.
    write(tmp_path / "photos" / "holdout" / "rust" / "again.jpeg", photo)
    write(tmp_path / "photos" / "holdout" / "rust" / "other.jpg", jpeg(2))
    code, summary, _ = import_in_process(capsys, tmp_path / "photos", tmp_path / "state")
    assert code == 0 and (summary["stored"], summary["duplicates"]) == (2, 2)
    # Where it is found first, in name order (holdout/ before train/), is where it is stored.
    assert rows(tmp_path / "state")[content_id(photo)] == ("rust", "holdout", "image/jpeg")


def test_exit_66_when_there_is_nothing_to_import(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    write(tmp_path / "flat" / "a.jpg", jpeg(1))  # images, but not in a label folder
    write(tmp_path / "mixed" / "train" / "rust" / "a.jpg", jpeg(1))
    write(tmp_path / "mixed" / "rust" / "b.jpg", jpeg(2))  # 'train' a class or a split? refused, not guessed
    write(tmp_path / "no-images" / "rust" / "notes.txt", b"x")
    for folder, says in (
        ("missing", "not a directory"),
        ("flat", "no label folders"),
        ("mixed", "beside other folders"),
        ("no-images", "files in its label folders"),
    ):
        code, summary, err = import_in_process(capsys, tmp_path / folder, tmp_path / "state")
        assert (code, summary) == (66, {}) and says in err, (folder, err)
    assert not (tmp_path / "state").exists()  # nothing was created for a typo


def test_retention_applies_to_imports(tmp_path, capsys, monkeypatch):
    """Past store.max_mb an import prunes the oldest examples, as intake does after its commits."""
    # 3 MB: an empty SQLite store is ~20 pages of 64 KiB (its tables and indexes).
    monkeypatch.setenv("SPROUT_STORE__MAX_MB", "3")
    monkeypatch.setenv("SPROUT_STORE__COMMIT_MAX_EXAMPLES", "8")
    for i in range(150):
        write(tmp_path / "photos" / "train" / "rust" / f"{i:03d}.jpg", jpeg(i, size=96, quality=95))
    code, summary, _ = import_in_process(capsys, tmp_path / "photos", tmp_path / "state")
    assert code == 0 and summary["stored"] == 150 and summary["pruned"] > 0
    store = Store(tmp_path / "state" / "examples.db")
    assert store.used_bytes() <= 3 * 1024 * 1024
    assert store.stats()["total"] == 150 - summary["pruned"]
    store.close()


def test_import_while_the_daemon_runs_and_learns(broker, daemon_factory, tmp_path):
    """Both writers at once, neither fails the other; the learner learns the imported examples too."""
    d = daemon_factory(broker.url, env=LEARNING).start()
    photos = tmp_path / "photos"
    imported = set()
    for i in range(240):
        c = i % 3
        imported.add(content_id(write(photos / f"colour-{c}" / f"{i}.jpg", colour_jpeg(c, 10_000 + i))))
    sent: list[str] = []
    imported_all = threading.Event()

    def publish() -> None:  # from before the import until after it, whatever either takes
        with Publisher(broker.url) as pub:
            while not imported_all.is_set() or len(sent) < 20:
                i = len(sent)
                sent.append(f"mqtt-{i}")
                pub.publish("sprout/leaves/examples", colour_jpeg(i % 3, i), f"colour-{i % 3}", "image/jpeg", sent[-1])
                time.sleep(0.01)
            assert pub.wait_all_acked(30)

    feeder = threading.Thread(target=publish)
    feeder.start()
    wait_for(lambda: len(stored_ids(d.state)) >= 10, 30, "the first MQTT examples")
    # Small batches: many import commits between intake's.
    out = sprout(
        "store",
        "import",
        str(photos),
        "--state",
        str(d.state),
        "--model",
        "leaves",
        env={"SPROUT_STORE__COMMIT_MAX_EXAMPLES": "8"},
    )
    imported_all.set()
    feeder.join(60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stored"] == 240
    total = 240 + len(sent)
    wait_for(lambda: len(stored_ids(d.state)) == total, 30, "every example from both paths")
    order = stored_ids(d.state)
    assert len(set(order)) == total and set(order) == imported | set(sent)
    # The two writers really interleaved: MQTT examples were committed between the import's first and last.
    positions = [i for i, example_id in enumerate(order) if example_id in imported]
    assert any(example_id in sent for example_id in order[positions[0] : positions[-1]])
    db = sqlite3.connect(d.state / "examples.db")
    train = db.execute("SELECT COUNT(*) FROM examples WHERE split = 'train'").fetchone()[0]
    db.close()
    learned = wait_for(
        lambda: (m := metrics(d.http_port))[("sprout_examples_learned_total", ())] >= train and m,
        120,
        f"the learner to learn all {train} train examples (log: {d.log_path})",
    )
    assert learned[("sprout_examples_learned_total", ())] == train
    assert learned[("sprout_learner_backlog", ())] == 0
    assert "database is locked" not in d.log() and "cannot commit" not in d.log()
    assert d.stop() == 0


def test_feed_dir_split_holdout_and_import_dedupe_against_each_other(broker, daemon_factory, tmp_path):
    d = daemon_factory(broker.url).start()
    photos = tmp_path / "photos"
    ids = {content_id(write(photos / ("rust" if i % 2 else "healthy") / f"{i}.jpg", jpeg(i))) for i in range(20)}
    out = sprout("feed", "--broker", broker.url, "--model", "leaves", "--dir", str(photos), "--split", "holdout")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(stored_ids(d.state)) == 20, 30, "the folder's 20 images")
    assert {example_id: split for example_id, (_, split, _) in rows(d.state).items()} == dict.fromkeys(ids, "holdout")
    # The same folder imported: the ids are the same content ids, so nothing is stored twice.
    out = sprout("store", "import", str(photos), "--state", str(d.state), "--model", "leaves")
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["stored"], json.loads(out.stdout)["duplicates"]) == (0, 20)
    assert d.stop() == 0


def test_memory_stays_flat_however_many_files(tmp_path):
    files = [
        write(tmp_path / "photos" / f"class-{i % 4}" / f"{i:03d}.jpg", jpeg(i, size=96, quality=95)) for i in range(300)
    ]
    total = sum(len(f) for f in files)
    settings = Settings.load(None, {"state_dir": str(tmp_path / "state"), "store": {"commit_max_examples": 16}})
    store = Store(settings.state_dir / "examples.db")
    tracemalloc.start()
    try:
        report = import_folder(
            tmp_path / "photos", store, settings.store, wire.limits(settings.store), Progress(io.StringIO(), 300)
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    assert report.stored == 300
    # One batch of 16 files (~1/19 of them) and one being checked; holding every file would be > total.
    assert peak < total / 5, (peak, total)
