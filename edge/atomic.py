"""Files that a restart or another process reads: written whole under a temporary name, fsynced, renamed.

A reader (or a process killed mid-write) sees either the old file or the new
one, never half of either. Standard library only: the daemon's registry and
the device's model folder (edge/modeldir.py) both write through it. Temporaries are named ``.tmp-<name>-<pid>`` beside
the target, so their owner can find and remove the leftovers of a killed write.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_PREFIX = ".tmp-"


def temporary_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist: O_EXCL) with ``mode`` from the start, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one step, durably (the rename and the folder are fsynced too)."""
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)  # a leftover of this pid's killed predecessor: O_EXCL below needs it gone
    try:
        write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Make the bytes of a file written elsewhere (a download) durable before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
