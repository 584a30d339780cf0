"""What goes wrong with a store, by whether a restart can help: a full disk may clear; a bad state folder will not."""

from __future__ import annotations

import errno
import sqlite3


class StoreError(Exception):
    """The store cannot be opened or written; the message says what to check."""


class StateDirError(StoreError):
    """The state folder cannot hold a store (missing rights, not Sprout's) or holds a newer Sprout's:
    restarting cannot fix it (the daemon exits 78, daemon/common/exits.py)."""


def is_disk_full(err: BaseException) -> bool:
    """SQLite's "database or disk is full", or a file write that hit ENOSPC / a quota."""
    if isinstance(err, sqlite3.Error):
        return (getattr(err, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL  # primary code of an extended one
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
