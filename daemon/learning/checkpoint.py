"""Crash-safe checkpoints: write to a temporary name, fsync, rename, fsync the folder.

A SIGKILL at any instant leaves either the previous checkpoint or the new
one, both complete. A stray temporary file from a killed write is removed by
the next learner to start (:func:`remove_stale_temporaries`), never by a
reader: another process (``sprout export``, a test) may read while the
daemon writes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from edge.atomic import TMP_PREFIX, write_atomic

FORMAT_VERSION = 1
CHECKPOINT_NAME = "learner.pt"


class CheckpointError(Exception):
    """A checkpoint exists but cannot be used; the message says what to do."""


def save(folder: Path, payload: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / CHECKPOINT_NAME
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    write_atomic(final, buffer.getvalue())
    return final


def remove_stale_temporaries(folder: Path) -> int:
    """Delete what killed writes left; only the one writer may call this, before it writes."""
    stale = list(folder.glob(f"{TMP_PREFIX}{CHECKPOINT_NAME}-*")) if folder.exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def load(folder: Path) -> dict[str, Any] | None:
    """The last checkpoint, or None when there is none yet. Read-only: safe beside a running writer."""
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
