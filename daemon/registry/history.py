"""A model's history, ``log.jsonl``: one JSON event per line, appended and fsynced; never rewritten."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append(path: Path, event: dict[str, Any]) -> None:
    """Add ``event`` as one line, durable when this returns."""
    line = json.dumps(event, ensure_ascii=False, allow_nan=False)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        # A writer killed mid-line left no newline: start afresh rather than glue two events together.
        prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        os.write(fd, prefix + line.encode("utf-8") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    """The events, oldest first; a line cut short by a crash is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out
