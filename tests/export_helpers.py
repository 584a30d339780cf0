"""`sprout export` as an operator runs it, on the tiny network in head mode."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from helpers import SPROUT


def export(state: Path, **env: str) -> tuple[int, dict, str]:
    """(exit status, the JSON it printed, its log) of `sprout export --state state`, with ``env`` on top."""
    out = subprocess.run(
        [*SPROUT, "export", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PATH": "/usr/bin:/bin",
            "SPROUT_MODEL__BACKBONE": "tiny",
            "SPROUT_MODEL__INPUT_SIZE": "32",
            "SPROUT_TRAINING__MODE": "head",
            **env,
        },
    )
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}, out.stderr
