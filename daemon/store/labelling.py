"""The labelling queue: photos devices sent back (daemon/ingest/field_photos.py), the most useful first, until
someone answers.

A photo is stored once (by its key), at most ``PhotoRules.per_device_per_day`` a device and UTC day, and
queued. The queue keeps ``PhotoRules.max_queued`` photos: past that the oldest are dropped (their rows stay,
without the image, so that a resend is still known and still counted against its day). The most useful
come first: ``priority`` is how unsure the model was (one less its top-1 score; a correction, where the user
says it was wrong, counts as fully unsure) plus how unlike the stored photos it is, once that is measured
(``novelty``, 0-1).

An answer (``sprout label``, the status site's labelling page) turns the photo into a training example
through the store's own commit (:meth:`daemon.store.examples.Store.answer_photo`): always in the train
split, never the holdout, whose examples the agronomists sent on purpose. A correction's label is the user's
word, not an agronomist's: it is shown as the first suggestion and learned only once someone confirms it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from daemon.store.database import Database
from daemon.store.records import FieldPhoto, Guess, PhotoKind, Reason, Rejection

DAY_S = 86400
STATES = ("queued", "labelled", "skipped", "dropped")


class AnswerError(ValueError):
    """An answer that cannot be taken (the photo is gone, or was answered already); the message says why."""


@dataclass(frozen=True, slots=True)
class PhotoRules:
    per_device_per_day: int  # field.photos_per_device_per_day
    max_queued: int  # field.max_queued_photos


@dataclass(frozen=True, slots=True)
class PhotoCounts:
    queued: int = 0  # new photos in the queue
    resent: int = 0  # stored before: a device's resend
    refused: tuple[Rejection, ...] = ()  # over their device's daily cap
    dropped: int = 0  # the oldest queued, dropped for the new ones past max_queued


@dataclass(frozen=True, slots=True)
class QueuedPhoto:
    """One photo of the queue, as ``sprout label`` and the labelling page show it (the image apart)."""

    id: int
    kind: PhotoKind
    version: int
    guesses: tuple[Guess, ...]
    user_label: str | None
    content_type: str
    width: int
    height: int
    received_at: float
    uncertainty: float
    novelty: float | None
    priority: float
    state: str
    answer: str | None

    def suggestions(self) -> list[str]:
        """The labels to offer first: a correction's, then the model's guesses."""
        first = [self.user_label] if self.user_label else []
        return first + [g.label for g in self.guesses if g.label != self.user_label]


_COLUMNS = (
    "id, kind, version, guesses, user_label, content_type, width, height, received_at, uncertainty, novelty, "
    "priority, state, answer"
)


def _queued(row: tuple[object, ...]) -> QueuedPhoto:
    (
        id_,
        kind,
        version,
        guesses,
        user_label,
        content_type,
        width,
        height,
        at,
        unsure,
        novelty,
        priority,
        state,
        answer,
    ) = row
    return QueuedPhoto(
        int(id_),  # type: ignore[call-overload]
        PhotoKind(kind),
        int(version),  # type: ignore[call-overload]
        tuple(Guess(label, float(score)) for label, score in json.loads(str(guesses))),
        user_label,  # type: ignore[arg-type]
        str(content_type),
        int(width),  # type: ignore[call-overload]
        int(height),  # type: ignore[call-overload]
        float(at),  # type: ignore[arg-type]
        float(unsure),  # type: ignore[arg-type]
        None if novelty is None else float(novelty),  # type: ignore[arg-type]
        float(priority),  # type: ignore[arg-type]
        str(state),
        answer,  # type: ignore[arg-type]
    )


def add_photos(db: Database, photos: Iterable[FieldPhoto], rules: PhotoRules) -> PhotoCounts:
    """Store and queue each photo not stored before, within its device's daily cap, inside the caller's write
    transaction; then drop the oldest queued past ``rules.max_queued``."""
    queued = resent = 0
    refused: list[Rejection] = []
    for p in photos:
        if db.one("SELECT 1 FROM field_photos WHERE photo_key = ?", (p.photo_key,)) is not None:
            resent += 1
            continue
        day = int(p.received_at // DAY_S)
        today = int(db.scalar("SELECT COUNT(*) FROM field_photos WHERE device = ? AND day = ?", (p.device, day)))
        if today >= rules.per_device_per_day:
            refused.append(
                Rejection(
                    Reason.PHOTO_CAP,
                    f"this device sent {today} photos today, field.photos_per_device_per_day = "
                    f"{rules.per_device_per_day}: keep the rest for tomorrow (UTC), or drop them",
                    None,
                    p.received_at,
                )
            )
            continue
        db.run(
            "INSERT INTO field_photos (photo_key, device, day, kind, version, guesses, user_label, content_type, "
            "width, height, received_at, image, uncertainty, priority, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
            (
                p.photo_key,
                p.device,
                day,
                p.kind.value,
                p.version,
                json.dumps([[g.label, g.score] for g in p.guesses]),
                p.user_label,
                p.content_type,
                p.width,
                p.height,
                p.received_at,
                p.image,
                p.uncertainty,
                p.uncertainty,
            ),
        )
        queued += 1
    dropped = 0
    if queued:
        excess = int(db.scalar("SELECT COUNT(*) FROM field_photos WHERE state = 'queued'")) - rules.max_queued
        if excess > 0:
            oldest = db.query("SELECT id FROM field_photos WHERE state = 'queued' ORDER BY id LIMIT ?", (excess,))
            dropped = db.run_many(
                "UPDATE field_photos SET state = 'dropped', image = ? WHERE id = ?", [(b"", r[0]) for r in oldest]
            )
    return PhotoCounts(queued, resent, tuple(refused), dropped)


def queue(db: Database, limit: int = 20) -> list[QueuedPhoto]:
    """The queued photos, most useful first (highest priority, then oldest)."""
    rows = db.query(
        f"SELECT {_COLUMNS} FROM field_photos WHERE state = 'queued' ORDER BY priority DESC, id LIMIT ?", (limit,)
    )
    return [_queued(r) for r in rows]


def photo(db: Database, photo_id: int) -> QueuedPhoto | None:
    row = db.one(f"SELECT {_COLUMNS} FROM field_photos WHERE id = ?", (photo_id,))
    return None if row is None else _queued(row)


def image(db: Database, photo_id: int) -> tuple[str, bytes] | None:
    """The photo's content type and bytes, while it is queued (an answered or dropped one keeps none)."""
    row = db.one("SELECT content_type, image FROM field_photos WHERE id = ? AND state = 'queued'", (photo_id,))
    return None if row is None else (str(row[0]), bytes(row[1]))


def states(db: Database) -> dict[str, int]:
    """How many photos are in each state, every state named."""
    counts = dict.fromkeys(STATES, 0)
    for state, n in db.query("SELECT state, COUNT(*) FROM field_photos GROUP BY state"):
        counts[str(state)] = int(n)
    return counts


def unscored(db: Database, limit: int) -> list[tuple[int, bytes]]:
    """Queued photos whose embedding is not measured yet, oldest first: (id, image)."""
    rows = db.query(
        "SELECT id, image FROM field_photos WHERE state = 'queued' AND embedding IS NULL ORDER BY id LIMIT ?", (limit,)
    )
    return [(int(r[0]), bytes(r[1])) for r in rows]


def score(db: Database, scored: Iterable[tuple[int, bytes | None, float]]) -> int:
    """Record each photo's embedding (float16 bytes; empty where the photo does not decode) and novelty, which
    moves it up the queue; inside the caller's write transaction."""
    return db.run_many(
        "UPDATE field_photos SET embedding = ?, novelty = ?, priority = uncertainty + ? WHERE id = ?",
        [(emb if emb is not None else b"", nov, nov, id_) for id_, emb, nov in scored],
    )


def field_embeddings(db: Database, since: float, limit: int) -> list[bytes]:
    """The embeddings of the newest ``sample`` photos received after ``since`` (a random share of what devices
    classify: the field as it is), whatever became of them since."""
    rows = db.query(
        "SELECT embedding FROM field_photos WHERE kind = 'sample' AND received_at >= ? AND embedding IS NOT NULL "
        "ORDER BY received_at DESC LIMIT ?",
        (since, limit),
    )
    return [bytes(r[0]) for r in rows if r[0]]


def forget_photos(db: Database, older_than: float) -> int:
    """Delete answered and dropped photos received before ``older_than`` (they hold no image, only an embedding; the
    daily cap only needs today's); inside the caller's write transaction. Queued ones stay until answered or
    dropped."""
    return db.run("DELETE FROM field_photos WHERE state <> 'queued' AND received_at < ?", (older_than,))
