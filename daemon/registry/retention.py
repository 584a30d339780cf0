"""Retention: a registry keeps its newest ``keep_versions`` versions, every pinned one, and those served (latest,
and a version rolling out in stages)."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from edge.atomic import TMP_PREFIX, fsync_dir

if TYPE_CHECKING:
    from daemon.registry.versions import Registry


def apply_retention(registry: Registry) -> None:
    """Delete the versions past ``keep_versions``, except pinned ones and the one ``latest`` names."""
    versions = registry.versions()
    latest = registry._latest_or_none()
    keep = set(versions[-registry.keep_versions :]) | set(registry.pins())
    if latest is not None and isinstance(latest.get("version"), int):
        keep.add(latest["version"])
    staged = registry._rollout_or_none()
    if staged is not None and staged.rolling:  # offered to a cohort: served, as latest is
        keep.add(staged.version)
    doomed = [v for v in versions if v not in keep]
    for v in doomed:
        # Renamed out of sight first, so no reader ever sees a half-deleted version;
        # a kill during rmtree leaves a .tmp-* folder that the next writer removes.
        trash = registry.folder / f"{TMP_PREFIX}deleted-{v}-{os.getpid()}"
        os.rename(registry._dir(v), trash)
        registry._append_log(
            {"event": "deleted", "version": v, "reason": f"retention: keep_versions={registry.keep_versions}"}
        )
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(registry.folder)
        registry._write_versions()
