"""What goes wrong with a store, by whether a restart can help: a full disk may clear; a bad state folder will not."""

from __future__ import annotations

import errno
import sqlite3


class StoreError(Exception):
    """The store cannot be opened or written; the message says what to check."""


class StoreUnavailable(StoreError):
    """The store's database server cannot be reached (down, refusing this user): a restart may find it back
    (the daemon exits 69, and systemd starts it again)."""


class StateDirError(StoreError):
    """The state folder cannot hold a store (missing rights, not Sprout's) or holds a newer Sprout's:
    restarting cannot fix it (the daemon exits 78, daemon/common/exits.py)."""


def is_database_error(err: BaseException) -> bool:
    """An error of the store's database driver: sqlite3's, or psycopg's (not imported for a SQLite store)."""
    return isinstance(err, sqlite3.Error) or any(c.__module__.partition(".")[0] == "psycopg" for c in type(err).__mro__)


def is_disk_full(err: BaseException) -> bool:
    """SQLite's "database or disk is full", PostgreSQL's disk_full, or a file write that hit ENOSPC / a quota."""
    if getattr(err, "sqlstate", None) == "53100":  # psycopg's errors.DiskFull: the server's disk
        return True
    if isinstance(err, sqlite3.Error):
        return (getattr(err, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL  # primary code of an extended one
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
