"""Reading the example store from another thread or process: the learner's view, totals, label changes.

Every reader opens its own read-only connection (SQLite's WAL lets it read while intake writes;
PostgreSQL's readers never block writers) and returns
labels resolved through the label changes (daemon/store/labels.py): :class:`StoreReader` with the
changes its learner has applied, :func:`stats` with all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.store import schema
from daemon.store.blobs import BlobFolder, folder_for
from daemon.store.database import Database, connect
from daemon.store.labels import Action, LabelChange, LabelMap
from daemon.store.location import StoreLocation


def open_reader(location: StoreLocation | Path, application_name: str = "sprout-reader") -> Database:
    """A read-only connection for another thread or process (stats, the learner); ``location`` as for
    :class:`daemon.store.examples.Store`. Raises :class:`StoreError` where there is no store yet."""
    if not isinstance(location, StoreLocation):
        location = StoreLocation(sqlite_path=Path(location))
    db = connect(location, read_only=True, application_name=application_name)
    if location.is_postgres:
        try:
            schema.check(db)
        except BaseException:
            db.close()
            raise
    return db


def stats(db: Database) -> dict[str, object]:
    """Totals as JSON-ready data: examples, per label (as named now: ``sprout labels``), per split, rejected by reason."""
    labels = LabelMap.replay(read_label_changes(db, 0))
    per_label: dict[str, int] = {}
    per_split: dict[str, int] = {"train": 0, "holdout": 0}
    total = 0
    for label, split, count in db.query("SELECT label, split, COUNT(*) FROM examples GROUP BY label, split"):
        label = labels.name(label)
        per_label[label] = per_label.get(label, 0) + int(count)
        per_split[split] += int(count)
        total += int(count)
    rejected = {reason: int(n) for reason, n in db.query("SELECT reason, count FROM rejections ORDER BY reason")}
    return {
        "total": total,
        "per_label": dict(sorted(per_label.items())),
        "per_split": per_split,
        "rejected": rejected,
        "rejected_total": sum(rejected.values()),
    }


def read_label_changes(db: Database, after: int) -> list[LabelChange]:
    """The label changes after id ``after``, in order. A read-only connection to a SQLite store that no Sprout
    with label changes has opened yet has no such table: no change was ever made there."""
    if db.dialect == "sqlite" and not db.has_table("label_changes"):
        return []
    rows = db.query("SELECT id, at, action, label, into_label FROM label_changes WHERE id > ? ORDER BY id", (after,))
    return [LabelChange(id_, at, Action(action), label, into) for id_, at, action, label, into in rows]


@dataclass(frozen=True, slots=True)
class StoredExample:
    seq: int
    label: str
    split: str
    image: bytes


@dataclass(frozen=True, slots=True)
class LabelCount:
    train: int = 0
    holdout: int = 0


class StoreReader:
    """The learner's read-only view of the store, on its own connection (WAL lets it read while intake writes).

    Labels come back as :attr:`labels` resolves them: the learner advances it as it applies label changes,
    so every row it reads agrees with its outputs, whatever a ``sprout labels`` command commits meanwhile.
    """

    def __init__(self, location: StoreLocation | Path):
        self._db = open_reader(location, "sprout-learner")
        self.labels = LabelMap()
        self._blob_dir = location.blob_dir if isinstance(location, StoreLocation) else None
        self._blobs: BlobFolder | None = None
        self.photos_gone = 0  # rows whose photo file was gone when read: retention was deleting them

    def _example(self, seq: int, label: str, split: str, image: bytes, blob: str | None) -> StoredExample | None:
        """The row as an example, its photo read from the blob folder where it is a file; None when that file
        is gone (retention unlinks it just before deleting the row)."""
        if blob is not None:
            if self._blobs is None:
                self._blobs = folder_for(self._blob_dir, self._db.where)
            photo = self._blobs.read(blob)
            if photo is None:
                self.photos_gone += 1
                return None
            image = photo
        return StoredExample(seq, self.labels.name(label), split, image)

    def label_changes(self, after: int = 0) -> list[LabelChange]:
        """The label changes recorded after id ``after``, oldest first."""
        return read_label_changes(self._db, after)

    def label_counts(self) -> dict[str, LabelCount]:
        """Stored examples per class (retired ones included), by split."""
        counts: dict[str, dict[str, int]] = {}
        for label, split, n in self._db.query("SELECT label, split, COUNT(*) FROM examples GROUP BY label, split"):
            by_split = counts.setdefault(self.labels.name(label), {})
            by_split[split] = by_split.get(split, 0) + n
        return {label: LabelCount(**by_split) for label, by_split in sorted(counts.items())}

    def after(self, seq: int, limit: int) -> list[StoredExample]:
        """The next examples in commit order, both splits, retired classes' too (the learner moves past them)."""
        rows = self._db.query(
            "SELECT seq, label, split, image, blob FROM examples WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        )
        return [e for row in rows if (e := self._example(*row)) is not None]

    def rows_after(self, seq: int, limit: int) -> list[StoredExample]:
        """As :meth:`after`, without the image bytes: what a trainer group's planner needs to share the round."""
        rows = self._db.query("SELECT seq, label, split FROM examples WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [StoredExample(seq, self.labels.name(label), split, b"") for seq, label, split in rows]

    def stored(self, seqs: list[int]) -> set[int]:
        """Which of ``seqs`` the store still holds (retention deletes the oldest)."""
        found: set[int] = set()
        for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(row[0] for row in self._db.query(f"SELECT seq FROM examples WHERE seq IN ({marks})", chunk))
        return found

    def by_seq(self, seqs: list[int]) -> list[StoredExample]:
        """Examples by seq, in the order asked (replay, holdout)."""
        if not seqs:
            return []
        found: dict[int, StoredExample] = {}
        for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.query(
                f"SELECT seq, label, split, image, blob FROM examples WHERE seq IN ({marks})", chunk
            ):
                if (e := self._example(*row)) is not None:
                    found[e.seq] = e
        return [found[s] for s in seqs if s in found]

    def labels_up_to(self, seq: int, split: str) -> list[tuple[int, str]]:
        """(seq, label) of every example of a split up to seq, retired classes' left out: the index replay
        and holdout sample from."""
        rows = self._db.query("SELECT seq, label FROM examples WHERE split = ? AND seq <= ? ORDER BY seq", (split, seq))
        return [(s, name) for s, label in rows if (name := self.labels.resolve(label)) is not None]

    def high_water_mark(self) -> int:
        return int(self._db.scalar("SELECT COALESCE(MAX(seq), 0) FROM examples"))

    def retention_frontiers(self) -> dict[str, int]:
        """Per split, the oldest seq still stored: retention deletes each split oldest first, so every
        example of that split below it is gone and every one from it on is stored. A split with nothing
        stored gives the next seq (all of it is gone). Read from the (label, split) index, label by label."""
        labels = [row[0] for row in self._db.query("SELECT DISTINCT label FROM examples")]
        beyond = self.high_water_mark() + 1
        out = {}
        for split in ("train", "holdout"):
            firsts = [
                self._db.scalar("SELECT MIN(seq) FROM examples WHERE label = ? AND split = ?", (label, split))
                for label in labels
            ]
            out[split] = min((s for s in firsts if s is not None), default=beyond)
        return out

    def seqs_between(self, low: int, high: int) -> list[int]:
        """Stored seqs in [low, high), both splits."""
        return [
            row[0]
            for row in self._db.query("SELECT seq FROM examples WHERE seq >= ? AND seq < ? ORDER BY seq", (low, high))
        ]

    def close(self) -> None:
        self._db.close()
