"""The store: one row per example id, counts that add up, durable settings on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.ingest.wire import Example, Reason, Rejection
from daemon.store.errors import StoreError
from daemon.store.examples import Store
from daemon.store.reader import open_reader, stats


def example(i: int, label: str = "healthy", split: str = "train") -> Example:
    return Example(f"id-{i}", label, split, "image/jpeg", 8, 8, b"\xff\xd8" + bytes([i % 256]) * 10, 100.0 + i)


def test_duplicates_are_stored_once_and_counted(tmp_path: Path):
    store = Store(tmp_path / "examples.db")
    first = store.commit([example(1), example(2)])
    again = store.commit([example(2), example(3), example(3)])
    assert (first.stored, first.duplicates) == (2, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    assert store.stats()["total"] == 3
    rows = store._db.execute("SELECT seq, example_id FROM examples ORDER BY seq").fetchall()
    assert [r[1] for r in rows] == ["id-1", "id-2", "id-3"]
    assert store.high_water_mark() == rows[-1][0]


def test_stats_by_label_split_and_rejection_reason(tmp_path: Path):
    store = Store(tmp_path / "examples.db")
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


def test_rows_survive_reopening_and_are_readable_by_another_connection(tmp_path: Path):
    path = tmp_path / "examples.db"
    store = Store(path)
    store.commit([example(i) for i in range(10)])
    store.close()
    reader = open_reader(path)
    assert stats(reader)["total"] == 10
    row = reader.execute("SELECT example_id, label, image FROM examples WHERE seq = 4").fetchone()
    assert row == ("id-3", "healthy", example(3).image)
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Store(path).stats()["total"] == 10


def test_a_file_that_is_not_a_store_is_refused_with_a_clear_error(tmp_path: Path):
    path = tmp_path / "examples.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the example store"):
        Store(path)
    with pytest.raises(StoreError, match="no example store"):
        open_reader(tmp_path / "missing.db")


def photo(i: int, split: str = "train", size: int = 5000) -> Example:
    return Example(f"p-{i}", ("rust", "blight")[i % 2], split, "image/jpeg", 8, 8, bytes([i % 251]) * size, float(i))


def test_retention_prunes_the_oldest_train_examples_and_the_file_stops_growing(tmp_path: Path):
    cap = 2 * 2**20
    store = Store(tmp_path / "examples.db")
    sizes, n = [], 0
    for _ in range(40):  # 40 commits of 100 five-kB examples: ~20 MB offered to a 2 MB store
        batch = [photo(n + k, "holdout" if (n + k) % 10 == 0 else "train") for k in range(100)]
        n += 100
        store.commit(batch)
        store.prune(cap)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the pages into the file, to measure it
        sizes.append((tmp_path / "examples.db").stat().st_size)
    assert store.used <= cap and store.pruned > 3000
    assert max(sizes[20:]) <= max(sizes[:20]) <= cap + 100 * 2 * 5000  # bounded by the cap plus one commit
    ids = {row[0]: row[1] for row in store._db.execute("SELECT example_id, split FROM examples")}
    train = sorted(int(i[2:]) for i, split in ids.items() if split == "train")
    assert (
        train == [i for i in range(train[0], n) if i % 10] and train[0] > 0
    )  # a window of the newest: oldest went first
    total = store.stats()["total"]
    assert isinstance(total, int)
    assert f"p-{n - 1}" in ids and total + store.pruned == n


def test_retention_keeps_holdout_while_train_remains_within_its_share(tmp_path: Path):
    cap = 2 * 2**20
    store = Store(tmp_path / "examples.db")
    store.commit([photo(i, "holdout") for i in range(40)])  # 200 kB of holdout: under a quarter of the store
    for start in range(40, 1040, 100):
        store.commit([photo(i) for i in range(start, start + 100)])
        store.prune(cap)
    assert store.pruned > 0
    per_split = store.stats()["per_split"]
    assert isinstance(per_split, dict) and per_split["holdout"] == 40  # only train was pruned
    # Holdout alone past its share: its oldest go too, down to a quarter of the pruned store.
    store.commit([photo(i, "holdout") for i in range(2000, 2400)])
    store.prune(cap)
    holdout = [r[0] for r in store._db.execute("SELECT example_id FROM examples WHERE split = 'holdout' ORDER BY seq")]
    assert 0 < len(holdout) * 5000 <= 0.25 * 0.9 * cap and holdout[-1] == "p-2399" and "p-0" not in holdout
    per_split = store.stats()["per_split"]
    assert isinstance(per_split, dict) and per_split["train"] > 0


def test_a_store_under_its_limit_is_not_touched(tmp_path: Path):
    store = Store(tmp_path / "examples.db")
    store.commit([photo(i) for i in range(50)])
    assert store.prune(2**30) == 0 and store.stats()["total"] == 50 and store.pruned == 0
