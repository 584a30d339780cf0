"""A folder of labelled photos, as agronomists keep them: one sub-folder per label, or per split and label.

``sprout store import`` reads it (daemon/ingest/importer.py) and ``sprout feed --dir``
sends it (daemon/tools/datasets.py). A file's example id is its content
(:func:`content_id`), so a folder fed over MQTT and imported from disk is stored once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif"}
# Top folders that name a split instead of a label (DIR/train/<label>/...); the usual names datasets ship.
SPLIT_FOLDERS = {
    "train": "train",
    "holdout": "holdout",
    "val": "holdout",
    "valid": "holdout",
    "validation": "holdout",
    "test": "holdout",
}


class DatasetError(Exception):
    """The data cannot be read; the message says how to get it."""


@dataclass(frozen=True, slots=True)
class FolderFile:
    """A file in a folder of labelled images, not yet read."""

    path: Path
    label: str
    split: str | None  # from a train/ or holdout/ top folder; None: the daemon's hash rule decides

    @property
    def image_name(self) -> bool:
        """Named like an image: whether it is one, its bytes tell (the name may lie)."""
        return self.path.suffix.lower() in IMAGE_SUFFIXES


def content_id(data: bytes) -> str:
    """The example id of a file: its content, so the same photo under two names or in two runs is one example."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]  # 128 bits: no collision among any store's examples


def label_folders(root: Path) -> list[tuple[Path, str, str | None]]:
    """(folder, label, split) of each label folder: ``root/<label>/`` or ``root/<split>/<label>/``.

    The second layout applies when a top folder is named like a split (:data:`SPLIT_FOLDERS`); then
    every top folder must be one, since 'train' could as well be a class name. Hidden folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected one sub-folder per label)")
    tops = _subfolders(root)
    splits = [p for p in tops if p.name.lower() in SPLIT_FOLDERS]
    if not splits:
        folders: list[tuple[Path, str, str | None]] = [(p, p.name, None) for p in tops]
    elif others := [p.name for p in tops if p.name.lower() not in SPLIT_FOLDERS]:
        raise DatasetError(
            f"{root}: has split folders ({', '.join(p.name for p in splits)}) beside other folders "
            f"({', '.join(others[:5])}): move those under train/ or holdout/"
        )
    else:
        folders = [(p, p.name, SPLIT_FOLDERS[s.name.lower()]) for s in splits for p in _subfolders(s)]
    if not folders:
        raise DatasetError(f"{root}: no label folders (expected {root}/<label>/*.jpg or {root}/train/<label>/*.jpg)")
    return folders


def folder_files(root: Path) -> Iterator[FolderFile]:
    """Every file under the label folders, lazily and in name order, one folder's names in memory at a time.

    Hidden files and folders (.DS_Store, macOS's ._name.jpg twins, .git) are skipped. Symlinked files
    are followed, symlinked folders below a label folder are not (no cycles).
    """
    for folder, label, split in label_folders(root):
        for path in _files_under(folder):
            yield FolderFile(path, label, split)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(folder: Path) -> Iterator[Path]:
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _files_under(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)
