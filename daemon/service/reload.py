"""Reloading the configuration (SIGHUP, ``systemctl reload sprout``): what changes in place, what needs a restart.

A reload re-reads the same file with the same environment and flags into a
new, fully validated :class:`Settings`; an invalid file is refused whole and
the daemon runs on as it was. Of a valid one, only the fields below take
effect at once: each is read afresh by its part on every use, so swapping the
reference is the whole change. Every other changed field is reported as
needing a restart and left as it was: the broker session, the model and its
state, the HTTP socket and the signing key are set up once at start-up, and
a half-applied change to them would be worse than none.

>>> from daemon.common.settings import Settings
>>> running = Settings.load(None)
>>> wanted = Settings.load(None, {"logging": {"level": "DEBUG"}, "mqtt": {"keepalive_s": 10}})
>>> p = plan(running, wanted)
>>> [str(c) for c in p.applied], [c.field for c in p.needs_restart], p.settings.mqtt.keepalive_s
(["logging.level 'INFO' -> 'DEBUG'"], ['mqtt.keepalive_s'], 30)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from daemon.common.settings import Settings

RELOADABLE: dict[str, frozenset[str]] = {
    # Read by the log set-up and the main loop's progress lines.
    "logging": frozenset({"level", "format", "progress_every_s"}),
    # Read by the export thread at every check and every export (an export in flight finishes on the old values).
    "export": frozenset(
        {
            "every_examples",
            "every_seconds",
            "first_model_examples",
            "max_drop_pts",
            "tolerance_pts",
            "refusal_significance",
            "quantization",
            "runtimes",
            "tflite_runtime_python",
            "calibration_examples",
            "verify_examples",
            "verify_timeout_s",
            "skip_lossy_mode_for",
            "full_conversion_every",
            "full_conversion_min_interval_s",
            "int8_bias_correction",
            "int8_distillation_examples",
            "prewarm_process",
        }
    ),
    # Read by the registry at every publish.
    "registry": frozenset({"keep_versions", "delta_from_versions"}),
    # Read by the learner at every step; handed over on its own thread, between two steps.
    "training": frozenset({"replay_ratio", "balance_classes"}),
    # Read by the feed for every message and by intake for every commit.
    "store": frozenset(
        {
            "max_image_bytes",
            "max_image_pixels",
            "max_full_decode_pixels",
            "max_label_chars",
            "commit_max_examples",
            "commit_linger_ms",
            "min_free_mb",
            "max_mb",
        }
    ),
}


@dataclass(frozen=True)
class Change:
    field: str  # dotted path, e.g. "export.every_examples"
    old: Any
    new: Any

    def __str__(self) -> str:
        if isinstance(self.old, SecretStr) or isinstance(self.new, SecretStr):
            return f"{self.field} (secret)"
        return f"{self.field} {_shown(self.old)} -> {_shown(self.new)}"


@dataclass(frozen=True)
class Plan:
    settings: Settings  # the running settings with the reloadable changes made, nothing else
    applied: list[Change]
    needs_restart: list[Change]


def plan(running: Settings, wanted: Settings) -> Plan:
    """Split what differs between ``running`` and ``wanted`` into what a reload applies and what it cannot."""
    changes = diff(running, wanted)
    applied = [c for c in changes if reloadable(c.field)]
    needs_restart = [c for c in changes if not reloadable(c.field)]
    sections: dict[str, dict[str, Any]] = {}
    for c in applied:
        section, name = c.field.split(".", 1)
        sections.setdefault(section, {})[name] = c.new
    # model_copy keeps the running object's other values (and where it was loaded from); the new
    # values come from a validated object, and no validator ties a reloadable field to another one.
    updated = {s: getattr(running, s).model_copy(update=fields) for s, fields in sections.items()}
    return Plan(running.model_copy(update=updated), applied, needs_restart)


def reloadable(field: str) -> bool:
    section, _, name = field.partition(".")
    return name in RELOADABLE.get(section, ())


def diff(old: Settings, new: Settings) -> list[Change]:
    """Every field whose value differs, as dotted paths in declaration order."""
    out = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, BaseModel):
            out += [
                Change(f"{name}.{f}", getattr(a, f), getattr(b, f))
                for f in type(a).model_fields
                if getattr(a, f) != getattr(b, f)
            ]
        elif a != b:
            out.append(Change(name, a, b))
    return out


def _shown(value: Any) -> str:
    return repr(str(value)) if hasattr(value, "__fspath__") else repr(value)
