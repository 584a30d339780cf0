"""``sprout store import DIR``: a folder of labelled images into the example store, no broker needed.

An imported file becomes the same example it would be over MQTT, so the two paths agree:

- label and split from the folder layout (:func:`daemon.tools.datasets.folder_files`), ``DIR/<label>/`` or
  ``DIR/train|holdout/<label>/``; without a split folder the store's hash rule decides, on the same id;
- checked as a received MQTT v5 message is (:func:`daemon.ingest.wire.parse`), its content type read from its
  bytes, not its name;
- identified by its content (:func:`daemon.tools.datasets.content_id`), as ``sprout feed --dir`` sends it, so
  importing twice, the same photo under two names, or a folder both fed and imported, stores it once
  (the store ignores an id it holds).

Beside a running daemon: the store is SQLite in WAL mode, and each writer waits up to 30 s for the
other's transaction (busy_timeout), so neither fails the other; the learner polls the store for
examples past its high-water mark and learns imported ones like received ones. Retention runs after
each batch, as after each intake commit, and the batches keep intake's ``store.min_free_mb``. The
daemon's own counters (``sprout_examples_stored``, the status line) count what it received over MQTT;
``sprout store stats`` counts the store.

Memory stays flat however large the folder: files are read one at a time, committed in batches of at
most ``store.commit_max_examples`` and :data:`BATCH_MAX_BYTES`, and the walk holds one folder's names.
"""

from __future__ import annotations

import mimetypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from daemon.common import state_owner
from daemon.common.settings import Settings, StoreSettings
from daemon.ingest import wire
from daemon.ingest.folders import IMAGE_SUFFIXES, DatasetError, FolderFile, content_id, folder_files
from daemon.ingest.image_checks import sniffed_content_type
from daemon.ingest.wire import Example, Limits, Reason, Rejection, parse
from daemon.store.errors import StoreError, is_database_error, is_disk_full
from daemon.store.examples import Store
from daemon.store.location import StoreLocation

MB = 1024 * 1024
# commit_max_examples alone would let 512 phone photos (2-6 MB each) wait in memory for one commit;
# a batch also commits once it holds this many bytes, still plenty to amortise the commit's fsync.
BATCH_MAX_BYTES = 32 * MB
PROGRESS_EVERY_S = 0.2


@dataclass
class ImportReport:
    stored: int = 0  # new examples
    duplicates: int = 0  # already in the store: imported before, sent over MQTT, or the same bytes twice here
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # the wire format's rejection reasons
    ignored: int = 0  # files not named like images (.txt, .csv, .tif): never read
    pruned: int = 0  # examples retention deleted to keep the store under store.max_mb
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "stored": self.stored,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "ignored": self.ignored,
            "pruned": self.pruned,
            "seconds": round(self.seconds, 2),
        }


class ImportStopped(Exception):
    """The store took no more (disk full, an I/O error): what was committed stays, a rerun adds the rest."""

    def __init__(self, reason: str, report: ImportReport):
        super().__init__(reason)
        self.report = report


class Progress:
    """Files done of the total and what became of them, as one line rewritten on a terminal; skips always."""

    def __init__(self, stream: TextIO, total: int):
        self.stream = stream
        self.total = total
        self.done = 0
        self.live = stream.isatty()  # a redirected stderr gets the skip list only, not a line per update
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, report: ImportReport) -> None:
        self.done += 1
        if self.live and time.monotonic() - self._drawn_at >= PROGRESS_EVERY_S:
            self._draw(report)

    def skipped(self, path: Path, rejection: Rejection) -> None:
        clear = "\r\x1b[K" if self.live else ""  # the line goes above the bar, not into it
        print(f"{clear}skipped {path}: {rejection.reason.value}: {rejection.detail}", file=self.stream, flush=True)
        self._drawn_at = 0.0  # the line again at once, below the skip

    def finish(self, report: ImportReport) -> None:
        if self.live:
            self._draw(report)
            print(file=self.stream, flush=True)

    def _draw(self, report: ImportReport) -> None:
        self._drawn_at = now = time.monotonic()
        rate = self.done / max(now - self._started, 1e-6)
        print(
            f"\r{self.done}/{self.total} files, {report.stored} stored, {report.duplicates} duplicates, "
            f"{report.skipped} skipped, {rate:.0f} files/s",
            end="",
            file=self.stream,
            flush=True,
        )


def run_import(root: Path, settings: Settings, stderr: TextIO) -> ImportReport:
    """The whole command: count, open the store, import with progress on ``stderr``.

    Raises DatasetError when ``root`` is not a folder of label folders with images, StoreError when the
    store cannot be opened, ImportStopped when it stops taking examples.
    """
    try:
        total = sum(1 for f in folder_files(root) if f.image_name)  # names only: cheap next to reading the files
    except OSError as err:  # an unreadable folder, found before anything is stored
        raise DatasetError(f"{err.filename}: cannot read it: {err.strerror}") from None
    if not total:
        raise DatasetError(f"{root}: no {'/'.join(sorted(IMAGE_SUFFIXES))} files in its label folders")
    try:
        # Examples make the folder this model's, as the daemon's first start does: a later `sprout run`
        # under another name is refused instead of learning these labels as its own.
        state_owner.claim(settings.state_dir, settings.model.name)
    except OSError as err:
        raise StoreError(f"{settings.state_dir}: cannot write the state directory: {err.strerror}") from None
    store = Store(StoreLocation.of_settings(settings), settings.store.migrate_on_start, "sprout-import")
    try:
        print(f"sprout store import: {total} image files from {root} into {store.where}", file=stderr, flush=True)
        return import_folder(root, store, settings.store, wire.limits(settings.store), Progress(stderr, total))
    finally:
        store.close()


def import_folder(
    root: Path, store: Store, settings: StoreSettings, limits: Limits, progress: Progress
) -> ImportReport:
    """Check and store every image file under ``root``'s label folders; skipped files go to ``progress``."""
    report = ImportReport()
    started = time.monotonic()
    batch: list[Example] = []
    batch_bytes = 0
    try:
        for file in folder_files(root):
            if not file.image_name:
                report.ignored += 1
                continue
            item = _example(file, limits)
            if isinstance(item, Rejection):
                report.skipped_by_reason[item.reason.value] = report.skipped_by_reason.get(item.reason.value, 0) + 1
                progress.skipped(file.path, item)
            else:
                batch.append(item)
                batch_bytes += len(item.image)
                if len(batch) >= settings.commit_max_examples or batch_bytes >= BATCH_MAX_BYTES:
                    _commit(store, batch, batch_bytes, settings, report)
                    batch, batch_bytes = [], 0
            progress.advance(report)
        _commit(store, batch, batch_bytes, settings, report)
    finally:
        report.seconds = time.monotonic() - started
        progress.finish(report)
    return report


def _example(file: FolderFile, limits: Limits) -> Example | Rejection:
    """The file as the MQTT path would take it from a v5 message with these properties."""
    try:
        with open(file.path, "rb") as f:
            # One byte past the limit is enough for wire to refuse it: a video named .jpg is not read whole.
            # Never more than the file's size either: read(n) allocates n bytes before it reads.
            data = f.read(min(os.fstat(f.fileno()).st_size, limits.max_image_bytes) + 1)
    except OSError as err:  # no permission, removed since the walk: this file is skipped, not the import
        return Rejection(Reason.UNREADABLE, f"cannot read the file: {err.strerror}", None, time.time())
    # The bytes decide the type. When they show none accepted, the type the name claims lets wire name
    # the fault as it would for such a message (empty, not an image) rather than "no content type".
    content_type = sniffed_content_type(data) or mimetypes.guess_type(file.path.name)[0]
    properties = [("label", file.label), ("example_id", content_id(data))]
    if file.split is not None:
        properties.append(("split", file.split))
    return parse(data, properties, content_type, limits)


def _commit(
    store: Store, batch: list[Example], batch_bytes: int, settings: StoreSettings, report: ImportReport
) -> None:
    if not batch:
        return
    # A PostgreSQL store's disk is the server's: it says when that is full (below).
    folder = store.image_folder
    free = _free_bytes(folder) if folder is not None else 2**62
    if folder is not None and free - batch_bytes < settings.min_free_mb * MB:
        # Intake's floor: an import must not take the room the daemon's intake, checkpoints and exports need.
        raise ImportStopped(
            f"{folder} has {free / MB:.1f} MB free, below store.min_free_mb = "
            f"{settings.min_free_mb} MB plus this batch's {batch_bytes / MB:.1f} MB: free space "
            "or lower store.max_mb, then run the import again",
            report,
        )
    try:
        result = store.commit(batch)
        report.stored += result.stored
        report.duplicates += result.duplicates
        report.pruned += store.prune(settings.max_mb * MB)
    except Exception as err:
        if not (is_database_error(err) or isinstance(err, StoreError)):
            raise
        why = "the disk is full" if is_disk_full(err) else " ".join(str(err).split())
        raise ImportStopped(f"cannot write to {store.where}: {why}; run the import again once fixed", report) from None


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 2**62  # cannot tell: the commit itself finds out
    return st.f_bavail * st.f_frsize
