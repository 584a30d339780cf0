"""Real labelled images to feed Sprout with: Fashion-MNIST from Debian's package, or a folder per label.

Each source yields :class:`Sample` records with a stable id, so feeding the
same data twice stores each example once. A folder's images are identified by
their content (:func:`content_id`), which ``sprout store import`` uses too: a
folder fed over MQTT and imported from disk is stored once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import edge.preprocess  # noqa: F401  registers pillow-heif's HEIF opener with Pillow, where it is installed

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Class names as the dataset's README lists them, by label index.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif"}
# Top folders that name a split instead of a label (DIR/train/<label>/...); the usual names datasets ship.
SPLIT_FOLDERS = {"train": "train", "holdout": "holdout", "val": "holdout", "valid": "holdout",
                 "validation": "holdout", "test": "holdout"}
CONTENT_TYPE_OF_FORMAT = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "HEIF": "image/heic"}


class DatasetError(Exception):
    """The data cannot be read; the message says how to get it."""


@dataclass(frozen=True, slots=True)
class Sample:
    example_id: str
    label: str
    pixels: np.ndarray | None  # HxW uint8 (grayscale) or HxWx3, to be encoded; None when `encoded` is set
    encoded: bytes | None = None
    content_type: str | None = None
    split: str | None = None  # from a folder layout's train/ or holdout/; None: the daemon's hash rule decides


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


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(
            f"{path} is missing: install Debian's 'dataset-fashion-mnist' package (make setup does)"
        ) from None
    magic, = struct.unpack(">I", data[:4])
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if dtype_code != 0x08:
        raise DatasetError(f"{path}: IDX element type {dtype_code:#x} is not unsigned byte")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(part: str = "train", root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N uint8) of the 'train' (60,000) or 't10k' (10,000) part."""
    images = read_idx(root / f"{part}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{part}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise DatasetError(f"{root}: {len(images)} images but {len(labels)} labels in part {part!r}")
    return images, labels


def fashion_mnist_samples(part: str = "train", root: Path = FASHION_MNIST_DIR) -> list[Sample]:
    images, labels = fashion_mnist(part, root)
    return [
        Sample(f"fashion-mnist/{part}/{i}", FASHION_MNIST_CLASSES[label], images[i])
        for i, label in enumerate(labels.tolist())
    ]


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
        folders = [(p, p.name, None) for p in tops]
    elif others := [p.name for p in tops if p.name.lower() not in SPLIT_FOLDERS]:
        raise DatasetError(f"{root}: has split folders ({', '.join(p.name for p in splits)}) beside other folders "
                           f"({', '.join(others[:5])}): move those under train/ or holdout/")
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


def folder_samples(root: Path) -> list[Sample]:
    """Images in ``root/<label>/...`` (or ``root/train|holdout/<label>/...``): the layout plant-disease datasets
    ship in. Files are sent as they are."""
    samples = []
    for file in folder_files(root):
        if file.image_name:
            path = file.path
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as img:
                    content_type = CONTENT_TYPE_OF_FORMAT.get(img.format or "")
            except Exception:
                content_type = None
            if content_type is None:
                raise DatasetError(f"{path}: not a JPEG, PNG, WebP or HEIC image; remove or convert it")
            samples.append(Sample(content_id(data), file.label, None, data, content_type, file.split))
    if not samples:
        raise DatasetError(f"{root}: no .jpg/.jpeg/.png/.webp/.heic files in its sub-folders")
    return samples


def arrange(
    samples: Sequence[Sample], order: str, classes: Sequence[str] | None, seed: int, limit: int | None
) -> list[Sample]:
    """Filter to ``classes`` and put in ``order``: 'iid' (shuffled) or 'class-incremental' (one class after another)."""
    known = sorted({s.label for s in samples})
    if classes:
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise DatasetError(f"unknown classes {unknown}; this data has: {', '.join(known)}")
        wanted = list(classes)
        samples = [s for s in samples if s.label in set(wanted)]
    else:
        wanted = known
    rng = random.Random(seed)
    if order == "iid":
        out = list(samples)
        rng.shuffle(out)
    elif order == "class-incremental":
        rank = {c: i for i, c in enumerate(wanted)}
        out = list(samples)
        rng.shuffle(out)
        out.sort(key=lambda s: rank[s.label])  # stable: shuffled within each class
    else:
        raise DatasetError(f"order must be 'iid' or 'class-incremental', not {order!r}")
    return out[:limit] if limit is not None else out


def encode(sample: Sample, size: int, fmt: str, quality: int = 90) -> tuple[bytes, str]:
    """The bytes and content type to publish: files as they are, arrays as RGB ``size`` x ``size`` JPEG or PNG."""
    if sample.encoded is not None:
        return sample.encoded, sample.content_type or "application/octet-stream"
    img = Image.fromarray(sample.pixels).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "image/jpeg"
    if fmt == "png":
        img.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise DatasetError(f"format must be 'jpeg' or 'png', not {fmt!r}")


def iter_encoded(samples: Sequence[Sample], size: int, fmt: str) -> Iterator[tuple[Sample, bytes, str]]:
    for sample in samples:
        payload, content_type = encode(sample, size, fmt)
        yield sample, payload, content_type
