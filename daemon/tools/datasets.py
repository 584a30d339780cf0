"""Real labelled images to feed Sprout with: Fashion-MNIST from Debian's package, or a folder per label.

Each source yields :class:`Sample` records with a stable id, so feeding the
same data twice stores each example once. A folder's images are identified by
their content (:func:`content_id`), which ``sprout store import`` uses too: a
folder fed over MQTT and imported from disk is stored once.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import edge.preprocess  # noqa: F401  registers pillow-heif's HEIF opener with Pillow, where it is installed
from daemon.ingest.folders import DatasetError, content_id, folder_files  # read as `sprout store import` reads them

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
# The UCI handwritten digits scikit-learn ships (1,797 images of 8 x 8, 16 grey levels): the benchmarks'
# second data set, small and unlike Fashion-MNIST.
DIGITS_CLASSES = tuple(f"digit-{d}" for d in range(10))
CONTENT_TYPE_OF_FORMAT = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "HEIF": "image/heic"}


@dataclass(frozen=True, slots=True)
class Sample:
    example_id: str
    label: str
    pixels: np.ndarray | None  # HxW uint8 (grayscale) or HxWx3, to be encoded; None when `encoded` is set
    encoded: bytes | None = None
    content_type: str | None = None
    split: str | None = None  # from a folder layout's train/ or holdout/; None: the daemon's hash rule decides


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
    (magic,) = struct.unpack(">I", data[:4])
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


def digits(part: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 uint8 in 0-255, labels N uint8) of scikit-learn's digits: 'train' is a seeded half of
    each class, 't10k' the other half (the data set has no split of its own)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError(
            "the digits data set comes with scikit-learn: pip install -e '.[bench]' (make bench does)"
        ) from None
    data = load_digits()
    images = np.clip(data.images * 16, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    chosen = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == c))
        chosen += list(idx[: len(idx) // 2] if part == "train" else idx[len(idx) // 2 :])
    order = np.array(sorted(chosen))
    return images[order], data.target[order].astype(np.uint8)


def fashion_mnist_samples(part: str = "train", root: Path = FASHION_MNIST_DIR) -> list[Sample]:
    images, labels = fashion_mnist(part, root)
    return [
        Sample(f"fashion-mnist/{part}/{i}", FASHION_MNIST_CLASSES[label], images[i])
        for i, label in enumerate(labels.tolist())
    ]


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
    if sample.pixels is None:
        raise DatasetError("a sample has neither encoded bytes nor pixels")
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
