"""The store: one row per example id, counts that add up, durable settings on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.store import Store, StoreError, open_reader, stats
from daemon.wire import Example, Reason, Rejection


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
