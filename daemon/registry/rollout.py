"""A staged rollout: a new version offered to a growing share of the devices before it becomes ``latest``.

``rollout.json`` in the model's registry folder says which version is rolling out, which version the
other devices keep (``latest``, unchanged until the last stage), the stages (percent of devices) and
the one reached. A device's place among the 10,000 buckets is a hash of its opaque id
(daemon/ingest/telemetry.py), so it stays in its cohort from stage to stage and its reports are
counted for the version it runs. The download API answers ``latest`` per device from this file
(daemon/distribution/http.py); whoever sends no id, and a static mirror, gets ``latest``.

States: ``rolling`` (at a stage short of 100), ``complete`` (the last stage made it ``latest``),
``halted`` (stopped: its cohort is offered ``latest`` again, so it rolls back), ``superseded`` (a
newer version started its own rollout). Every change is a line of the registry's log.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from daemon.registry.layout import RegistryError
from edge.atomic import write_atomic

ROLLOUT = "rollout.json"
BUCKETS = 10_000  # as daemon/ingest/telemetry.py counts them
STATES = ("rolling", "complete", "halted", "superseded")


@dataclass(frozen=True, slots=True)
class Rollout:
    version: int  # the version rolling out
    replaces: int  # the version every other device keeps: ``latest``
    stages: tuple[float, ...]  # percent of devices, ascending, the last 100
    stage: int  # index into stages of the one reached
    state: str
    started_at: float  # wall clock, seconds
    stage_started_at: float
    reason: str = ""  # why it was halted, or what made it advance

    @property
    def percent(self) -> float:
        return self.stages[self.stage]

    @property
    def rolling(self) -> bool:
        return self.state == "rolling"

    def reaches(self, bucket: int) -> bool:
        """Whether a device in ``bucket`` is offered this version now."""
        return self.rolling and bucket < self.percent * BUCKETS / 100

    def advanced(self, now: float, reason: str) -> Rollout:
        """At the next stage; ``complete`` when that is the last."""
        stage = self.stage + 1
        if stage >= len(self.stages):
            raise RegistryError(f"version {self.version} has reached every device already")
        state = "complete" if stage == len(self.stages) - 1 else "rolling"
        return replace(self, stage=stage, state=state, stage_started_at=now, reason=reason)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stages": list(self.stages), "percent": self.percent}


def read(folder: Path) -> Rollout | None:
    """The model's rollout, or None when no version was ever rolled out in stages."""
    path = folder / ROLLOUT
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RegistryError(
            f"{path}: unreadable ({err}); remove it to end the rollout (devices then get latest)"
        ) from None
    try:
        rollout = Rollout(
            version=int(doc["version"]),
            replaces=int(doc["replaces"]),
            stages=tuple(float(p) for p in doc["stages"]),
            stage=int(doc["stage"]),
            state=str(doc["state"]),
            started_at=float(doc["started_at"]),
            stage_started_at=float(doc["stage_started_at"]),
            reason=str(doc.get("reason", "")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise RegistryError(f"{path}: not a rollout ({err!r})") from None
    if rollout.state not in STATES or not 0 <= rollout.stage < len(rollout.stages):
        raise RegistryError(f"{path}: state {rollout.state!r} at stage {rollout.stage} is not one Sprout writes")
    return rollout


def write(folder: Path, rollout: Rollout) -> None:
    doc = {k: v for k, v in rollout.as_dict().items() if k != "percent"}
    write_atomic(folder / ROLLOUT, (json.dumps(doc, indent=2) + "\n").encode())
