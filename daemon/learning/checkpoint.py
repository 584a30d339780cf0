"""The checkpoint: everything the learner needs to resume, what an export starts from; written crash-safe.

On disk it is one ``torch.save``'d dict (``learner.pt``) with a
``format_version`` and the keys of :class:`Checkpoint`'s fields; readers take
it as a typed :class:`Checkpoint` (``load``), never as the dict. Keys that
older checkpoints lack have defaults here, so that every checkpoint written
since format 1 still loads.

Writes go to a temporary name, are fsynced, then renamed, and the folder
fsynced: a SIGKILL at any instant leaves either the previous checkpoint or the
new one, both complete. A stray temporary file from a killed write is removed
by the next learner to start (:func:`remove_stale_temporaries`), never by a
reader: another process (``sprout export``, a test) may read while the daemon
writes.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     _ = save_payload(Path(folder), {"step": 3})
...     load_payload(Path(folder))["step"]
3
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge.atomic import TMP_PREFIX, write_atomic

FORMAT_VERSION = 1
CHECKPOINT_NAME = "learner.pt"


class CheckpointError(Exception):
    """A checkpoint exists but cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """What ``Learner.state()`` gives and ``Learner.load_state()`` takes; each field is a key on disk."""

    config_digest: str  # the network and mode it was made for (Learner.config_digest)
    backbone: str
    input_size: int
    mode: str
    labels: tuple[str, ...]  # the head's outputs, in order
    head: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor] | None  # None in head mode: the backbone never changed
    optimizer: dict[str, Any]
    step: int
    high_water_mark: int  # the last example learned, in commit order
    trained: int
    replayed: int
    nonfinite_skipped: int
    undecodable: int
    prequential: dict[str, Any]
    holdout: dict[str, Any]
    rng: Any  # random.Random state of the replay sampler
    divergence_restores: int = 0  # absent from older checkpoints, as are the fields below
    last_loss: float | None = None
    label_change: int = 0  # the last label change applied (0: none)
    curves: list | None = None  # the learning curves (daemon/learning/curves.py), written by the learner's thread

    def to_payload(self) -> dict[str, Any]:
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["labels"] = list(self.labels)
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Checkpoint:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in payload
        ]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}; move it away to start learning afresh")
        fields = {k: v for k, v in payload.items() if k in names}
        return cls(**{**fields, "labels": tuple(payload["labels"]), "rng": _as_tuple(payload["rng"])})


def save(folder: Path, checkpoint: Checkpoint) -> Path:
    return save_payload(folder, checkpoint.to_payload())


def load(folder: Path) -> Checkpoint | None:
    """The last checkpoint, or None when there is none yet. Read-only: safe beside a running writer."""
    payload = load_payload(folder)
    if payload is None:
        return None
    try:
        return Checkpoint.from_payload(payload)
    except CheckpointError as err:
        raise CheckpointError(f"{folder / CHECKPOINT_NAME}: {err}") from None


def save_payload(folder: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as the checkpoint, atomically (see the module's docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / CHECKPOINT_NAME
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    write_atomic(final, buffer.getvalue())
    return final


def load_payload(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's dict as on disk, or None when there is none yet."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({err}); move it away to start learning afresh") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {payload.get('format_version')}, this Sprout reads {FORMAT_VERSION}: upgrade Sprout"
        )
    return payload


def remove_stale_temporaries(folder: Path) -> int:
    """Delete what killed writes left; only the one writer may call this, before it writes."""
    stale = list(folder.glob(f"{TMP_PREFIX}{CHECKPOINT_NAME}-*")) if folder.exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _as_tuple(value: Any) -> Any:
    """random.Random state comes back from torch.load with lists where it had tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
