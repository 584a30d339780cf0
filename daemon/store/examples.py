"""The example store: one row per example id, durable before anything is acked.

SQLite in WAL mode in the state folder by default; a PostgreSQL database with ``store.url``, where
several intake processes may write and several machines read (docs/scale.md). The same SQL runs on
both (daemon/store/database.py); the schema is a list of migrations (daemon/store/schema.py).

``seq`` numbers examples in commit order (strictly increasing, with gaps
where a duplicate was ignored); the learner reads forward from its high-water
mark. A redelivered duplicate (same ``example_id``) is ignored, so
an example is stored exactly once however often the broker sends it.

Retention (:meth:`Store.prune`): past ``store.max_mb`` of used pages (PostgreSQL:
of stored image bytes), the
oldest ``train`` examples are deleted, down to ``PRUNE_TO`` of the limit so
that pruning runs in chunks rather than after every commit; holdout examples
go first only where they exceed ``HOLDOUT_SHARE`` of it, otherwise only when
no train example is left. Freed pages are reused by later
commits, so the file stops growing near the limit (no VACUUM: it would
rewrite the whole file and needs as much free space again; PostgreSQL's
autovacuum frees the rows' space for reuse in the same way). A pruned id is
forgotten: should its sender publish it again, it is stored as a new example.

Totals (:meth:`Store.totals`: examples stored, messages rejected) are the
store's, whoever wrote them and whenever: kept up to date by this writer's own
commits and prunes, and counted again at most every ``RECOUNT_S`` for what
another writer (``sprout store import``) added.

Label changes (``sprout labels``, :mod:`daemon.store.labels`) are rows of
``label_changes``; examples keep the label they were sent with, and every
reader returns it resolved through the changes (daemon/store/reader.py).
In SQLite the table came after schema 1 without changing it: the writer
creates it where missing, and a reader finding none reads a store with no change.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.store import schema
from daemon.store.blobs import BlobFolder, blob_key, folder_for
from daemon.store.database import Database, connect
from daemon.store.errors import StateDirError
from daemon.store.field import add_reports, forget_reports
from daemon.store.labelling import (
    AnswerError,
    PhotoCounts,
    PhotoRules,
    QueuedPhoto,
    add_photos,
    field_embeddings,
    forget_photos,
    image,
    queue,
    score,
    states,
    unscored,
)
from daemon.store.labels import Action, LabelChange, LabelMap
from daemon.store.location import StoreLocation
from daemon.store.reader import read_label_changes, stats
from daemon.store.records import Example, FieldPhoto, FieldReport, Rejection

log = logging.getLogger(__name__)

# Pruning goes down to this share of store.max_mb: one prune frees room for many commits.
PRUNE_TO = 0.9
# Most of the pruned store that holdout examples may keep; beyond it their oldest go first.
HOLDOUT_SHARE = 0.25
# How stale the totals may be about another process's writes; a count reads the whole (label, split) index.
RECOUNT_S = 60.0


@dataclass(frozen=True, slots=True)
class CommitResult:
    stored: int  # new rows
    duplicates: int  # ids already present (redeliveries, resends)
    rejected: int
    reports: int = 0  # devices' reports counted (daemon/store/field.py)
    resent_reports: int = 0  # reports counted before: a device's resend, adding nothing
    photos: PhotoCounts = PhotoCounts()  # devices' photos for labelling (daemon/store/labelling.py)


@dataclass(frozen=True, slots=True)
class Answered:
    """A photo of the labelling queue answered: the example it became (None when skipped)."""

    photo_id: int
    label: str | None
    example_id: str | None


@dataclass(frozen=True, slots=True)
class StoreTotals:
    examples: int  # stored now: every writer's, less what retention deleted
    rejected: int  # messages rejected, ever


class Store:
    """One writer (intake, or an import); readers open their own connections (daemon/store/reader.py).

    ``location``: a :class:`StoreLocation`, or the path of a SQLite file. ``migrate``: apply the schema's
    pending migrations (daemon/store/schema.py); False refuses a store that has any.

    >>> import tempfile, pathlib
    >>> s = Store(pathlib.Path(tempfile.mkdtemp()) / "examples.db")
    >>> s.stats()["total"]
    0
    >>> s.totals()
    StoreTotals(examples=0, rejected=0)
    """

    def __init__(self, location: StoreLocation | Path, migrate: bool = True, application_name: str = "sprout"):
        self.location = location if isinstance(location, StoreLocation) else StoreLocation(sqlite_path=Path(location))
        self.path = self.location.sqlite_path  # the SQLite file; None when the store is a PostgreSQL database
        self.where = str(self.location)
        self.blobs = BlobFolder(self.location.blob_dir) if self.location.blob_dir is not None else None
        if self.blobs is not None:
            self.blobs.prepare()
        self._db = self._open(migrate, application_name)
        self._lock = threading.Lock()
        self.pruned = 0  # examples deleted by retention since this process opened the store
        self.reports_counted = 0  # devices' reports this process counted (daemon/store/field.py)
        self.photos_changed = 0  # photos this process queued, dropped or answered (daemon/store/labelling.py)
        self.used = self._db.used_bytes()  # as of the last commit's prune: what the metrics show
        self._closed = False
        self._counted_at = -RECOUNT_S
        self._totals = self._count()

    def _open(self, migrate: bool, application_name: str) -> Database:
        errors: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)
        if self.location.is_postgres:
            import psycopg

            errors = (psycopg.Error,)
        elif self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StateDirError(f"{self.path.parent}: cannot create the state directory: {err.strerror}") from None
        db: Database | None = None
        try:
            db = connect(self.location, application_name=application_name)
            todo = schema.pending(db)
            if todo and not migrate:
                raise StateDirError(
                    f"{self.where}: the example store lacks schema migration(s) "
                    f"{', '.join(str(m.version) for m in todo)}: run `sprout store migrate`, "
                    "or set store.migrate_on_start = true"
                )
            self.applied: list[schema.Migration] = schema.migrate(db) if migrate else []
            for m in self.applied:
                log.info("store %s: applied schema migration %d (%s)", self.where, m.version, m.summary)
        except StateDirError:
            if db is not None:
                db.close()
            raise
        except errors as err:
            if db is not None:
                db.close()
            why = " ".join(str(err).split())
            if self.location.is_postgres:
                raise StateDirError(
                    f"{self.where}: cannot set up the example store: {why} (the store's user needs to own the "
                    "database, or have CREATE on it: docs/scale.md)"
                ) from None
            raise StateDirError(
                f"{self.where}: cannot open the example store: {why} (is it a Sprout state directory?)"
            ) from None
        return db

    @property
    def image_folder(self) -> Path | None:
        """The folder whose disk the photos fill (intake's store.min_free_mb watches it); None where that is
        a PostgreSQL server's, which says itself when it is full."""
        if self.blobs is not None:
            return self.blobs.root
        return self.path.parent if self.path is not None else None

    @property
    def schema_version(self) -> int:
        with self._lock:
            return schema.version(self._db)

    def totals(self) -> StoreTotals:
        """Examples stored and messages rejected in this store, cheap enough for every status read.

        Never waits for the writer: a commit's fsync or a prune may hold the lock for seconds on a slow disk,
        and the main loop reads this every few seconds. While the lock is taken, the totals as of the last
        commit are the answer (that commit updates them itself).
        """
        if time.monotonic() - self._counted_at >= RECOUNT_S and self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._totals = self._count()
            finally:
                self._lock.release()
        return self._totals

    def _count(self) -> StoreTotals:
        self._counted_at = time.monotonic()
        examples = self._db.scalar("SELECT COUNT(*) FROM examples")
        rejected = self._db.scalar("SELECT COALESCE(SUM(count), 0) FROM rejections")
        return StoreTotals(int(examples), int(rejected))

    def commit(
        self,
        examples: Iterable[Example],
        rejections: Iterable[Rejection] = (),
        reports: Iterable[FieldReport] = (),
        photos: Iterable[FieldPhoto] = (),
        photo_rules: PhotoRules | None = None,
    ) -> CommitResult:
        """Write examples, rejection counts, devices' reports and their photos for labelling (by ``photo_rules``)
        in one transaction; returns once it is durable (fsynced), the photos too where they are files
        (store.blob_dir). Photos over their device's daily cap come back as rejections, counted as such."""
        examples, photos = list(examples), list(photos)
        if photos and photo_rules is None:
            raise ValueError("photos for labelling are stored by rules: pass photo_rules")
        reasons: dict[str, int] = {}
        for r in rejections:
            reasons[r.reason.value] = reasons.get(r.reason.value, 0) + 1
        with self._lock:
            rows = self._rows(examples)
            with self._db.writing():
                stored = self._db.run_many(
                    "INSERT INTO examples (example_id, label, split, content_type, width, height, received_at, image, "
                    "blob, blob_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (example_id) DO NOTHING",
                    rows,
                )
                queued = add_photos(self._db, photos, photo_rules) if photos and photo_rules else PhotoCounts()
                for r in queued.refused:
                    reasons[r.reason.value] = reasons.get(r.reason.value, 0) + 1
                self._db.run_many(
                    "INSERT INTO rejections (reason, count) VALUES (?, ?) "
                    "ON CONFLICT (reason) DO UPDATE SET count = rejections.count + excluded.count",
                    list(reasons.items()),
                )
                counted, resent = add_reports(self._db, reports)
            rejected = sum(reasons.values())
            self.reports_counted += counted
            self.photos_changed += queued.queued + queued.dropped
            # Under the lock: a recount in totals() between the commit and this line would count it twice.
            self._totals = StoreTotals(self._totals.examples + stored, self._totals.rejected + rejected)
        return CommitResult(stored, len(rows) - stored, rejected, counted, resent, queued)

    def labelling_queue(self, limit: int) -> tuple[list[QueuedPhoto], dict[str, int]]:
        """The first ``limit`` photos of the labelling queue, most useful first, and how many are in each state."""
        with self._lock:
            return queue(self._db, limit), states(self._db)

    def labelling_image(self, photo_id: int) -> tuple[str, bytes] | None:
        """A queued photo's content type and bytes; None once it is answered, dropped, or was never there."""
        with self._lock:
            return image(self._db, photo_id)

    def unscored_photos(self, limit: int) -> list[tuple[int, bytes]]:
        """Queued photos whose embedding is not measured yet (daemon/learning/field_scout.py): (id, image)."""
        with self._lock:
            return unscored(self._db, limit)

    def score_photos(self, scored: list[tuple[int, bytes | None, float]]) -> None:
        """Record measured photos' embeddings and novelty (daemon/store/labelling.py, ``score``)."""
        with self._lock, self._db.writing():
            score(self._db, scored)
            self.photos_changed += len(scored)

    def field_embeddings(self, since: float, limit: int) -> list[bytes]:
        """The newest sample photos' embeddings received after ``since`` (daemon/store/labelling.py)."""
        with self._lock:
            return field_embeddings(self._db, since, limit)

    def answer_photo(self, photo_id: int, label: str | None, by: str, max_label_chars: int) -> Answered:
        """Answer a queued photo (daemon/store/labelling.py): with a label it becomes a training example, committed
        as intake commits one; None skips it (not a photo to learn from). Raises :class:`AnswerError` saying why
        not: no such photo, answered already, a label the store's rules refuse."""
        if label is not None and (
            not 0 < len(label) <= max_label_chars or label != label.strip() or not label.isprintable()
        ):
            raise AnswerError(f"label must be 1-{max_label_chars} printable characters without surrounding spaces")
        with self._lock, self._db.writing():
            row = self._db.one(
                "SELECT state, answer, answered_by, photo_key, content_type, width, height, image FROM field_photos "
                "WHERE id = ?",
                (photo_id,),
            )
            if row is None:
                raise AnswerError(f"no photo {photo_id} in the labelling queue (`sprout label list` shows it)")
            state, answer, answered_by, key, content_type, width, height, image = row
            if state != "queued":
                said = f" {answer!r}" if answer else ""
                by_whom = f" by {answered_by}" if answered_by else ""
                raise AnswerError(f"photo {photo_id} is {state}{said}{by_whom} already")
            now = time.time()
            example_id = None
            if label is not None:
                example_id = f"field-{key}"
                example = Example(example_id, label, "train", content_type, width, height, bytes(image), now)
                self._db.run_many(
                    "INSERT INTO examples (example_id, label, split, content_type, width, height, received_at, image, "
                    "blob, blob_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (example_id) DO NOTHING",
                    self._rows([example]),
                )
            self._db.run(
                "UPDATE field_photos SET state = ?, answer = ?, answered_at = ?, answered_by = ?, example_id = ?, "
                "image = ? WHERE id = ?",
                ("labelled" if label is not None else "skipped", label, now, by, example_id, b"", photo_id),
            )
            if label is not None:
                self._totals = StoreTotals(self._totals.examples + 1, self._totals.rejected)
            self.photos_changed += 1
        return Answered(photo_id, label, example_id)

    def _rows(self, examples: list[Example]) -> list[tuple[object, ...]]:
        """The rows to insert; with a blob folder, the photos written there first (durably), except those of
        ids already stored: a redelivery must not replace the stored photo with whatever it carries."""
        if self.blobs is None or not examples:
            return [_row(e, e.image, None) for e in examples]
        stored: set[str] = set()
        ids = list({e.example_id for e in examples})
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            stored.update(
                r[0] for r in self._db.query(f"SELECT example_id FROM examples WHERE example_id IN ({marks})", chunk)
            )
        keys = {e.example_id: blob_key(e.example_id) for e in examples}
        fresh: dict[str, bytes] = {}
        for e in examples:
            if e.example_id not in stored:
                fresh.setdefault(keys[e.example_id], e.image)  # the first of a commit's duplicates is the one stored
        self.blobs.write(fresh.items())
        return [_row(e, b"", keys[e.example_id]) for e in examples]

    def stats(self) -> dict[str, object]:
        with self._lock:
            return stats(self._db)

    def change_label(
        self, action: Action, label: str, into: str | None, max_label_chars: int, outputs: Iterable[str] = ()
    ) -> LabelChange:
        """Record a label change (:mod:`daemon.store.labels`), or raise :class:`daemon.store.labels.LabelError` saying why not.

        ``outputs``: the learner's classes, which count as known even when retention has deleted all their
        examples. Checked and written in one write transaction, so two changes at once cannot both pass
        checks that only one of them would pass after the other.
        """
        with self._lock, self._db.writing():
            labels = LabelMap.replay(read_label_changes(self._db, 0))
            stored = {labels.name(row[0]) for row in self._db.query("SELECT DISTINCT label FROM examples")}
            labels.check(action, label, into, stored | set(outputs), max_label_chars)
            at = time.time()
            row = self._db.one(
                "INSERT INTO label_changes (at, action, label, into_label) VALUES (?, ?, ?, ?) RETURNING id",
                (at, action.value, label, into),
            )
        assert row is not None  # an INSERT ... RETURNING gives its row
        return LabelChange(int(row[0]), at, action, label, into)

    def used_bytes(self) -> int:
        """What ``store.max_mb`` bounds: the SQLite file's pages in use, or PostgreSQL's stored image bytes."""
        return self._db.used_bytes()

    def prune(self, max_bytes: int) -> int:
        """Past ``max_bytes``, delete the oldest examples down to ``PRUNE_TO`` of it; returns how many.

        Holdout first only beyond ``HOLDOUT_SHARE`` of the target, then train, oldest first; holdout
        again only when no train example is left. Each round deletes the oldest rows whose images add
        up to the excess, then measures again: deleting rows frees whole SQLite pages only as SQLite
        merges the emptied ones.
        """
        deleted = 0
        with self._lock:
            used = self.used = self._db.used_bytes()
            if used <= max_bytes:
                return 0
            target = int(max_bytes * PRUNE_TO)
            # Without its own bound the holdout, never pruned while train examples remain, would fill
            # the store in the end; the gates and the learner only use its most recent examples anyway.
            holdout_share = int(HOLDOUT_SHARE * target)
            deleted += self._delete_oldest("holdout", lambda: self._holdout_bytes() - holdout_share)
            used = self._db.used_bytes()
            while used > target:
                has_train = self._db.one("SELECT 1 FROM examples WHERE split = 'train' LIMIT 1")
                n = self._delete_oldest("train" if has_train else "holdout", lambda: self._db.used_bytes() - target)
                if n == 0:
                    break  # nothing left to delete: the tables' own pages exceed the limit
                deleted += n
                used = self._db.used_bytes()
            self.pruned += deleted
            self.used = used
            self._totals = StoreTotals(self._totals.examples - deleted, self._totals.rejected)
        return deleted

    def _holdout_bytes(self) -> int:
        return int(
            self._db.scalar("SELECT COALESCE(SUM(length(image) + blob_bytes), 0) FROM examples WHERE split = 'holdout'")
        )

    def _delete_oldest(self, split: str, excess: Callable[[], int]) -> int:
        """Delete the oldest examples of a split whose images add up to ``excess()`` bytes (none when it is
        not positive, else at least one). The excess is measured in the deleting transaction: another
        writer of a shared store may have pruned it meanwhile."""
        n = 0
        with self._db.writing():
            nbytes = excess()
            if nbytes <= 0:
                return 0
            last = None
            files: list[str] = []
            # length() of a blob reads the record header (SQLite) or the TOAST pointer (PostgreSQL), not the image.
            for seq, size, blob in self._db.query(
                "SELECT seq, length(image) + blob_bytes, blob FROM examples WHERE split = ? ORDER BY seq LIMIT 10000",
                (split,),
            ):
                last, nbytes = seq, nbytes - size
                if blob is not None:
                    files.append(blob)
                if nbytes <= 0:
                    break
            if last is not None:
                if files:  # before the rows go: daemon/store/blobs.py says why in this order
                    folder_for(self.location.blob_dir, self.where).remove(files)
                n = self._db.run("DELETE FROM examples WHERE split = ? AND seq <= ?", (split, last))
        return n

    def forget_reports(self, older_than: float) -> int:
        """Forget devices' counters last added to before ``older_than`` (daemon/store/field.py), and their answered
        photos received before then (daemon/store/labelling.py); returns how many counters."""
        with self._lock, self._db.writing():
            forget_photos(self._db, older_than)
            return forget_reports(self._db, older_than)

    def high_water_mark(self) -> int:
        return int(self._db.scalar("SELECT COALESCE(MAX(seq), 0) FROM examples"))

    def close(self) -> None:
        with self._lock:
            self._closed = True  # the totals stay readable, as last counted
            self._db.close()


def _row(e: Example, image: bytes, blob: str | None) -> tuple[object, ...]:
    """An examples row: the photo's bytes in ``image``, or none there and the name of its file in ``blob``."""
    size = len(e.image) if blob is not None else 0
    return (e.example_id, e.label, e.split, e.content_type, e.width, e.height, e.received_at, image, blob, size)
