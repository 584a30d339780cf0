"""Which model a state folder belongs to: written once by the daemon, checked by every command that reads it.

A folder filled by a daemon for model ``hb`` holds ``hb``'s examples, checkpoint and registry. A command
run on it under another name (the default, ``plant-disease``, when ``--model`` was left out) would
publish that name's version 1 beside ``hb``'s, which no device of ``hb`` ever sees. The folder's owner
is recorded in ``STATE/model.json`` at the daemon's first start; a name that does not match is refused,
naming both. A folder from before this file is told by its registry's model folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.common.settings import ConfigError
from edge.atomic import write_atomic

OWNER_FILE = "model.json"


def owner(state_dir: Path) -> str | None:
    """The model this folder belongs to, or None for a new (or empty) folder."""
    try:
        doc = json.loads((state_dir / OWNER_FILE).read_bytes())
        if isinstance(doc, dict) and isinstance(doc.get("model"), str):
            return doc["model"]
    except (OSError, ValueError):
        pass
    # Older folders: the registry has one folder per model it published or refused.
    registry = state_dir / "registry"
    models = sorted(p.name for p in registry.iterdir() if p.is_dir()) if registry.is_dir() else []
    return models[0] if len(models) == 1 else None


def check(state_dir: Path, model: str) -> None:
    """ConfigError (exit 78) when the folder belongs to another model."""
    found = owner(state_dir)
    if found is not None and found != model:
        raise ConfigError(
            f"model.name: the state folder {state_dir} holds model {found!r}, not {model!r}: pass --model {found} "
            f'(or model.name = "{found}"), or point --state at another folder'
        )


def claim(state_dir: Path, model: str) -> None:
    """Check, then record ``model`` as the folder's owner if nothing is recorded yet (the daemon's start)."""
    check(state_dir, model)
    path = state_dir / OWNER_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps({"model": model}) + "\n").encode())
