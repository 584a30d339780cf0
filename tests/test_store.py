"""The store: one row per example id, counts that add up, retention, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from daemon.ingest.wire import Example, Reason, Rejection
from daemon.store.errors import StoreError
from daemon.store.examples import Store
from daemon.store.location import StoreLocation
from daemon.store.reader import StoreReader, open_reader, stats


def example(i: int, label: str = "healthy", split: str = "train") -> Example:
    return Example(f"id-{i}", label, split, "image/jpeg", 8, 8, b"\xff\xd8" + bytes([i % 256]) * 10, 100.0 + i)


def test_duplicates_are_stored_once_and_counted(store_location: StoreLocation):
    store = Store(store_location)
    first = store.commit([example(1), example(2)])
    again = store.commit([example(2), example(3), example(3)])
    assert (first.stored, first.duplicates) == (2, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    assert store.stats()["total"] == 3
    rows = store._db.query("SELECT seq, example_id FROM examples ORDER BY seq")
    assert [r[1] for r in rows] == ["id-1", "id-2", "id-3"]
    assert store.high_water_mark() == rows[-1][0]


def test_stats_by_label_split_and_rejection_reason(store_location: StoreLocation):
    store = Store(store_location)
    store.commit(
        [example(1, "rust"), example(2, "rust", "holdout"), example(3, "blight")],
        [Rejection(Reason.BAD_LABEL, "x", None, 1.0), Rejection(Reason.BAD_LABEL, "x", None, 1.0)],
    )
    store.commit([], [Rejection(Reason.TOO_LARGE, "x", "a", 1.0)])
    assert store.stats() == {
        "total": 3,
        "per_label": {"blight": 1, "rust": 2},
        "per_split": {"train": 2, "holdout": 1},
        "rejected": {"bad_label": 2, "too_large": 1},
        "rejected_total": 3,
    }


def test_rows_survive_reopening_and_are_readable_by_another_connection(store_location: StoreLocation):
    store = Store(store_location)
    store.commit([example(i) for i in range(10)])
    store.close()
    reader = open_reader(store_location)
    assert stats(reader)["total"] == 10
    row = reader.one("SELECT example_id, label, image FROM examples WHERE seq = 4")
    assert row == ("id-3", "healthy", example(3).image)
    with pytest.raises(Exception, match="(?i)read.?only"):  # a reader cannot write, by mistake or not
        reader.run("DELETE FROM examples")
    assert Store(store_location).stats()["total"] == 10
    if not store_location.is_postgres:
        assert reader.scalar("PRAGMA journal_mode") == "wal"


def test_a_file_that_is_not_a_store_is_refused_with_a_clear_error(tmp_path: Path):
    path = tmp_path / "examples.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the example store"):
        Store(path)
    with pytest.raises(StoreError, match="no example store"):
        open_reader(tmp_path / "missing.db")


def photo(i: int, split: str = "train", size: int = 5000) -> Example:
    return Example(f"p-{i}", ("rust", "blight")[i % 2], split, "image/jpeg", 8, 8, bytes([i % 251]) * size, float(i))


def test_retention_prunes_the_oldest_train_examples_and_the_file_stops_growing(store_location: StoreLocation):
    cap = 4 * 2**20  # an empty SQLite store is ~20 pages of 64 KiB: its tables and indexes
    store = Store(store_location)
    sizes, n = [], 0
    for _ in range(40):  # 40 commits of 100 five-kB examples: ~20 MB offered to a 4 MB store
        batch = [photo(n + k, "holdout" if (n + k) % 10 == 0 else "train") for k in range(100)]
        n += 100
        store.commit(batch)
        store.prune(cap)
        if store.path is not None:
            store._db.query("PRAGMA wal_checkpoint(TRUNCATE)")  # the pages into the file, to measure it
            sizes.append(store.path.stat().st_size)
        else:  # PostgreSQL: the images' bytes, as the triggers count them, against the table's own
            assert store.used_bytes() == store._db.scalar("SELECT COALESCE(SUM(length(image)), 0) FROM examples")
            sizes.append(store.used_bytes())
    assert store.used <= cap and store.pruned > 3000
    assert max(sizes[20:]) <= max(sizes[:20]) <= cap + 100 * 2 * 5000  # bounded by the cap plus one commit
    ids = {row[0]: row[1] for row in store._db.query("SELECT example_id, split FROM examples")}
    train = sorted(int(i[2:]) for i, split in ids.items() if split == "train")
    assert (
        train == [i for i in range(train[0], n) if i % 10] and train[0] > 0
    )  # a window of the newest: oldest went first
    total = store.stats()["total"]
    assert isinstance(total, int)
    assert f"p-{n - 1}" in ids and total + store.pruned == n


def test_retention_keeps_holdout_while_train_remains_within_its_share(store_location: StoreLocation):
    cap = 4 * 2**20  # an empty SQLite store is ~20 pages of 64 KiB
    store = Store(store_location)
    store.commit([photo(i, "holdout") for i in range(40)])  # 200 kB of holdout: under a quarter of the store
    for start in range(40, 1640, 100):
        store.commit([photo(i) for i in range(start, start + 100)])
        store.prune(cap)
    assert store.pruned > 0
    per_split = store.stats()["per_split"]
    assert isinstance(per_split, dict) and per_split["holdout"] == 40  # only train was pruned
    # Holdout alone past its share: its oldest go too, down to a quarter of the pruned store.
    store.commit([photo(i, "holdout") for i in range(2000, 2600)])
    store.prune(cap)
    holdout = [r[0] for r in store._db.query("SELECT example_id FROM examples WHERE split = 'holdout' ORDER BY seq")]
    assert 0 < len(holdout) * 5000 <= 0.25 * 0.9 * cap and holdout[-1] == "p-2599" and "p-0" not in holdout
    per_split = store.stats()["per_split"]
    assert isinstance(per_split, dict) and per_split["train"] > 0


def test_a_store_under_its_limit_is_not_touched(store_location: StoreLocation):
    store = Store(store_location)
    store.commit([photo(i) for i in range(50)])
    assert store.prune(2**30) == 0 and store.stats()["total"] == 50 and store.pruned == 0


def test_readers_never_skip_an_example_while_two_writers_commit_at_once(store_location: StoreLocation):
    """The learner reads seq > its high-water mark: a seq made visible before a smaller one would be skipped
    for good. Two intake processes of a shared store (here two writers) commit concurrently."""
    first = Store(store_location)
    second = Store(store_location)
    reader = StoreReader(store_location)
    batches = 60

    def write(store: Store, name: str) -> None:
        for b in range(batches):
            store.commit(
                [
                    Example(f"{name}-{b}-{k}", "healthy", "train", "image/jpeg", 8, 8, b"\xff\xd8" * 50, 0.0)
                    for k in range(3)
                ]
            )

    writers = [threading.Thread(target=write, args=(s, n)) for s, n in ((first, "a"), (second, "b"))]
    for w in writers:
        w.start()
    seen: list[int] = []
    hwm = 0
    while any(w.is_alive() for w in writers) or hwm < reader.high_water_mark():
        for row in reader.after(hwm, 1000):
            seen.append(row.seq)
            hwm = row.seq
    for w in writers:
        w.join()
    stored = [row[0] for row in first._db.query("SELECT seq FROM examples ORDER BY seq")]
    assert len(stored) == 2 * batches * 3 and seen == stored  # every one read, in order, none skipped
