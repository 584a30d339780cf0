"""Where the example store lives: a SQLite file in the state folder (the default) or a PostgreSQL database.

``store.url`` chooses the database: empty keeps the embedded SQLite file ``<state_dir>/examples.db``;
``postgresql://user@host:port/db`` puts the store in that database, where several machines can
share it (docs/scale.md). The password never travels in the URL: libpq reads it from
``store.password_file``, ``PGPASSWORD`` or ``~/.pgpass``. ``store.blob_dir`` keeps the photos as files in
a folder instead of rows of the database (daemon/store/blobs.py).

>>> str(StoreLocation.of(Path("/srv/sprout"), ""))
'/srv/sprout/examples.db'
>>> StoreLocation.of(Path("/srv/sprout"), "postgresql://sprout@db.lan/sprout").postgres_url
'postgresql://sprout@db.lan/sprout'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.common.settings import Settings

SQLITE_FILE = "examples.db"


@dataclass(frozen=True)
class StoreLocation:
    sqlite_path: Path | None = None
    postgres_url: str | None = None
    password_file: Path | None = None  # its first line is the database password (PostgreSQL only)
    blob_dir: Path | None = None  # where photos are files rather than rows (daemon/store/blobs.py)

    @classmethod
    def of(
        cls, state_dir: Path, url: str, password_file: Path | None = None, blob_dir: Path | None = None
    ) -> StoreLocation:
        if url:
            return cls(postgres_url=url, password_file=password_file, blob_dir=blob_dir)
        return cls(sqlite_path=Path(state_dir) / SQLITE_FILE, blob_dir=blob_dir)

    @classmethod
    def of_settings(cls, settings: Settings) -> StoreLocation:
        s = settings.store
        return cls.of(settings.state_dir, s.url, s.password_file, s.blob_dir)

    @property
    def is_postgres(self) -> bool:
        return self.postgres_url is not None

    def __str__(self) -> str:
        return self.postgres_url if self.postgres_url is not None else str(self.sqlite_path)
