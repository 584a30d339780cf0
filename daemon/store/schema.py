"""The example store's schema as numbered migrations, each written for SQLite and for PostgreSQL.

A store records the migrations applied to it: SQLite in ``meta.schema_version``, PostgreSQL in the
``schema_migrations`` table (version, summary, when). :func:`migrate` applies the missing ones in
order, each in its own transaction; on PostgreSQL under an advisory lock, so several nodes starting
at once apply each migration once. A store at a version this Sprout does not know is refused
(exit 78): it was migrated by a newer Sprout.

To change the schema, append a :class:`Migration` with the next version, in both dialects; never
edit one that has shipped. ``sprout store migrate`` applies the pending ones (an operator may do
so before upgrading the daemons, with ``store.migrate_on_start = false``).

SQLite's first version predates this list: the ``label_changes`` table came after stores at version 1
existed, so its script is written to run again (``IF NOT EXISTS``) and does, on every open of a
store at version 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.store.database import MIGRATION_LOCK, Database, PostgresDatabase
from daemon.store.errors import StateDirError, StoreError


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    summary: str
    sqlite: str
    postgresql: str

    def script(self, dialect: str) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


_SQLITE_1 = """
CREATE TABLE IF NOT EXISTS examples (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    example_id   TEXT    NOT NULL UNIQUE,
    label        TEXT    NOT NULL,
    split        TEXT    NOT NULL CHECK (split IN ('train', 'holdout')),
    content_type TEXT    NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    received_at  REAL    NOT NULL,
    image        BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_label_split ON examples (label, split);
CREATE TABLE IF NOT EXISTS rejections (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS label_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL    NOT NULL,
    action     TEXT    NOT NULL CHECK (action IN ('rename', 'merge', 'delete')),
    label      TEXT    NOT NULL,
    into_label TEXT
);
"""

# seq: an identity column never hands out a number twice. The (label, split, seq) index answers the
# learner's "oldest seq of this class" (SQLite's index holds the rowid, which is seq, by itself).
# STORAGE EXTERNAL: photos do not compress, so PostgreSQL is told not to try before moving them out of
# line. store_usage, kept by statement triggers on whoever inserts or deletes, is what store.max_mb
# bounds: a sum over the table at every commit would read every row.
_POSTGRESQL_1 = """
CREATE TABLE examples (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    example_id   TEXT             NOT NULL UNIQUE,
    label        TEXT             NOT NULL,
    split        TEXT             NOT NULL CHECK (split IN ('train', 'holdout')),
    content_type TEXT             NOT NULL,
    width        INTEGER          NOT NULL,
    height       INTEGER          NOT NULL,
    received_at  DOUBLE PRECISION NOT NULL,
    image        BYTEA            NOT NULL
);
ALTER TABLE examples ALTER COLUMN image SET STORAGE EXTERNAL;
CREATE INDEX examples_label_split ON examples (label, split, seq);
CREATE TABLE rejections (
    reason TEXT   PRIMARY KEY,
    count  BIGINT NOT NULL
);
CREATE TABLE label_changes (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         DOUBLE PRECISION NOT NULL,
    action     TEXT             NOT NULL CHECK (action IN ('rename', 'merge', 'delete')),
    label      TEXT             NOT NULL,
    into_label TEXT
);
CREATE TABLE store_usage (
    one         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    examples    BIGINT  NOT NULL,
    image_bytes BIGINT  NOT NULL
);
INSERT INTO store_usage (examples, image_bytes) VALUES (0, 0);
CREATE FUNCTION sprout_examples_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE store_usage SET examples = examples + counted.n, image_bytes = image_bytes + counted.bytes
    FROM (SELECT count(*) AS n, COALESCE(sum(length(image)), 0) AS bytes FROM added) AS counted;
    RETURN NULL;
END $$;
CREATE FUNCTION sprout_examples_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE store_usage SET examples = examples - counted.n, image_bytes = image_bytes - counted.bytes
    FROM (SELECT count(*) AS n, COALESCE(sum(length(image)), 0) AS bytes FROM removed) AS counted;
    RETURN NULL;
END $$;
CREATE TRIGGER examples_added AFTER INSERT ON examples
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION sprout_examples_added();
CREATE TRIGGER examples_removed AFTER DELETE ON examples
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION sprout_examples_removed();
"""

# A photo in the blob folder (store.blob_dir) leaves an empty image in its row, the file's name in blob and
# its size in blob_bytes, which retention and store.max_mb count as the image's. SQLite's used_bytes is its
# pages plus blob_usage, kept by row triggers that only fire for such rows.
_SQLITE_2 = """
ALTER TABLE examples ADD COLUMN blob TEXT;
ALTER TABLE examples ADD COLUMN blob_bytes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE blob_usage (
    one   INTEGER PRIMARY KEY CHECK (one = 1),
    bytes INTEGER NOT NULL
);
INSERT INTO blob_usage (one, bytes) VALUES (1, 0);
CREATE TRIGGER examples_blob_added AFTER INSERT ON examples WHEN NEW.blob_bytes > 0
BEGIN
    UPDATE blob_usage SET bytes = bytes + NEW.blob_bytes;
END;
CREATE TRIGGER examples_blob_removed AFTER DELETE ON examples WHEN OLD.blob_bytes > 0
BEGIN
    UPDATE blob_usage SET bytes = bytes - OLD.blob_bytes;
END;
"""

# ADD COLUMN with a constant default rewrites no row (PostgreSQL 11 and later): instant on a large table.
_POSTGRESQL_2 = """
ALTER TABLE examples ADD COLUMN blob TEXT, ADD COLUMN blob_bytes BIGINT NOT NULL DEFAULT 0;
CREATE OR REPLACE FUNCTION sprout_examples_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE store_usage SET examples = examples + counted.n, image_bytes = image_bytes + counted.bytes
    FROM (SELECT count(*) AS n, COALESCE(sum(length(image) + blob_bytes), 0) AS bytes FROM added) AS counted;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION sprout_examples_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE store_usage SET examples = examples - counted.n, image_bytes = image_bytes - counted.bytes
    FROM (SELECT count(*) AS n, COALESCE(sum(length(image) + blob_bytes), 0) AS bytes FROM removed) AS counted;
    RETURN NULL;
END $$;
"""

# Devices' reports (daemon/ingest/telemetry.py): one row per device, with the last report's seq (a resent
# report is counted once), and one row of counters per (version, device), which each report adds to.
# conf_0 .. conf_9: how many top-1 scores fell in each tenth. Both dialects alike (REAL is a double in both).
_FIELD = """
CREATE TABLE field_devices (
    device    TEXT             PRIMARY KEY,
    bucket    INTEGER          NOT NULL,
    last_seq  BIGINT           NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
CREATE TABLE field_counts (
    version        BIGINT           NOT NULL,
    device         TEXT             NOT NULL,
    loads          BIGINT           NOT NULL,
    load_failures  BIGINT           NOT NULL,
    predictions    BIGINT           NOT NULL,
    confidence_sum DOUBLE PRECISION NOT NULL,
    corrections    BIGINT           NOT NULL,
    latency_ms_sum DOUBLE PRECISION NOT NULL,
    first_seen     DOUBLE PRECISION NOT NULL,
    last_seen      DOUBLE PRECISION NOT NULL,
    BINS,
    PRIMARY KEY (version, device)
);
""".replace("BINS", ", ".join(f"conf_{i} BIGINT NOT NULL" for i in range(10)))

# Photos devices sent back for labelling (daemon/store/labelling.py). day: UTC days since the epoch, for the
# per-device daily cap; the (device, day) index counts a device's photos of a day. state: queued until someone
# answers (labelled: the answer is an example now, example_id names it; skipped: not a photo to learn from) or
# the queue's bound drops it; an answered or dropped row keeps no image. priority orders the queue, most
# useful first: the model's uncertainty, plus how unlike the stored photos it is (novelty, once measured from the
# backbone's embedding, kept as float16 for the drift test: daemon/learning/field_scout.py).
_PHOTOS = """
CREATE TABLE field_photos (
    id           ID_COLUMN,
    photo_key    TEXT             NOT NULL UNIQUE,
    device       TEXT             NOT NULL,
    day          INTEGER          NOT NULL,
    kind         TEXT             NOT NULL CHECK (kind IN ('unsure', 'correction', 'sample')),
    version      BIGINT           NOT NULL,
    guesses      TEXT             NOT NULL,
    user_label   TEXT,
    content_type TEXT             NOT NULL,
    width        INTEGER          NOT NULL,
    height       INTEGER          NOT NULL,
    received_at  DOUBLE PRECISION NOT NULL,
    image        BLOB_TYPE        NOT NULL,
    uncertainty  DOUBLE PRECISION NOT NULL,
    embedding    BLOB_TYPE,
    novelty      DOUBLE PRECISION,
    priority     DOUBLE PRECISION NOT NULL,
    state        TEXT             NOT NULL CHECK (state IN ('queued', 'labelled', 'skipped', 'dropped')),
    answer       TEXT,
    answered_at  DOUBLE PRECISION,
    answered_by  TEXT,
    example_id   TEXT
);
CREATE INDEX field_photos_device_day ON field_photos (device, day);
CREATE INDEX field_photos_queue ON field_photos (state, priority);
CREATE INDEX field_photos_kind ON field_photos (kind, received_at);
"""

MIGRATIONS = (
    Migration(1, "examples, rejection counts, label changes", _SQLITE_1, _POSTGRESQL_1),
    Migration(2, "photos as files in store.blob_dir", _SQLITE_2, _POSTGRESQL_2),
    Migration(3, "devices' reports of how each model version does", _FIELD, _FIELD),
    Migration(
        4,
        "photos devices sent back for labelling",
        _PHOTOS.replace("ID_COLUMN", "INTEGER PRIMARY KEY AUTOINCREMENT").replace("BLOB_TYPE", "BLOB     "),
        _PHOTOS.replace("ID_COLUMN", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY").replace(
            "BLOB_TYPE", "BYTEA    "
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_POSTGRESQL_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER     PRIMARY KEY,
    summary    TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def version(db: Database) -> int:
    """The store's schema version; 0 for a database Sprout has not set up yet."""
    if db.dialect == "sqlite":
        if not db.has_table("meta"):
            return 0
        return int(db.scalar("SELECT value FROM meta WHERE key = 'schema_version'") or 0)
    if not db.has_table("schema_migrations"):
        return 0
    return int(db.scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))


def pending(db: Database) -> list[Migration]:
    """The migrations this store lacks; raises :class:`StateDirError` for a store from a newer Sprout."""
    current = version(db)
    if current > SCHEMA_VERSION:
        raise StateDirError(f"{db.where}: store schema {current}, this Sprout reads {SCHEMA_VERSION}: upgrade Sprout")
    return [m for m in MIGRATIONS if m.version > current]


def migrate(db: Database) -> list[Migration]:
    """Apply the migrations this store lacks, in order; returns them."""
    if isinstance(db, PostgresDatabase):
        with db.session_lock(MIGRATION_LOCK):
            db.apply(_POSTGRESQL_LEDGER)
            todo = pending(db)
            for m in todo:
                db.apply(
                    m.postgresql
                    + f";\nINSERT INTO schema_migrations (version, summary) VALUES ({m.version:d}, {_quoted(m.summary)})"
                )
            return todo
    todo = pending(db)
    if version(db) == 1:
        db.apply(_SQLITE_1)  # a version-1 store from before label_changes gets the table
    for m in todo:
        db.apply(
            m.sqlite + f"\nINSERT INTO meta (key, value) VALUES ('schema_version', '{m.version:d}') "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value;"
        )
    return todo


def check(db: Database) -> None:
    """Raise :class:`StoreError` unless the store is at this Sprout's schema (for readers, which never migrate)."""
    todo = pending(db)
    if todo:
        raise StoreError(
            f"{db.where}: no example store here yet (schema {version(db)}, this Sprout needs {SCHEMA_VERSION}): "
            "start `sprout run` or run `sprout store migrate` first"
        )


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
