"""Example photos as files in a folder (``store.blob_dir``) instead of the store's database.

A photo is written, fsynced and renamed into place before the row that names it commits, so an acked
example's photo is as durable as its row. The file is named by the SHA-256 of the example id (the
store's unique key, so no two rows share a file), two levels of folders deep so that no folder holds
more than a few hundred thousand files at a billion photos: ``ab/cd/abcd...``.

Retention unlinks a row's file before the transaction that deletes the row: the other order, with a
second writer storing the same id again between the two steps, would unlink the new example's photo.
A crash between a photo's write and its row's commit, or between an unlink and the delete, leaves a
file without a row or a row without a file: readers skip the second (as if retention had deleted it a
moment sooner) and the first costs only its disk space (``sprout store stats`` counts neither).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from daemon.store.errors import StateDirError, StoreError

WRITERS = 8  # photos written and fsynced at once


def blob_key(example_id: str) -> str:
    """The file name of an example's photo.

    >>> blob_key("leaf-1")[:12]
    '4140bf0e8569'
    """
    return hashlib.sha256(example_id.encode("utf-8", "surrogatepass")).hexdigest()


class BlobFolder:
    """The photos of one store, in ``root`` (shared storage where several machines read the store)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._writers: ThreadPoolExecutor | None = None  # made at the first write: readers need none

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / key

    def prepare(self) -> None:
        """Create the folder, or raise :class:`StateDirError` (exit 78) naming the setting when it cannot be written."""
        probe = self.root / f".probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StateDirError(
                f"store.blob_dir = {self.root}: cannot write there: {err.strerror} (create it, writable by the "
                "daemon's user; under systemd add it to ReadWritePaths)"
            ) from None

    def write(self, photos: Iterable[tuple[str, bytes]]) -> None:
        """Write each (key, bytes) durably: the file fsynced, renamed into place, its folder fsynced. A file
        already there (left by a commit that crashed before its row) is replaced: the row about to name it
        is this write's. Several at once: the file system then joins their fsyncs into fewer journal commits
        (measured: 1.7 times the photos a second of one at a time, docs/benchmarks.md)."""
        if self._writers is None:
            self._writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="sprout-blob")
        folders = set(self._writers.map(lambda photo: self._write_one(*photo), photos))
        list(self._writers.map(_fsync_folder, folders))  # the renames durable, once per folder for the whole commit

    def _write_one(self, key: str, data: bytes) -> Path:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        return final.parent

    def read(self, key: str) -> bytes | None:
        """The photo, or None when its file is gone (retention is deleting its row)."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)


def folder_for(root: Path | None, where: str) -> BlobFolder:
    """The blob folder a reader needs for a row that names one; raises where the store's settings lack it."""
    if root is None:
        raise StoreError(
            f"{where}: this store keeps photos in a blob folder, and store.blob_dir is not set here: set it to the "
            "folder the intake processes write (the same shared storage, on every machine that reads the store)"
        )
    return BlobFolder(root)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
