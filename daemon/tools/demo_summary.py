"""The demo's summary: what the learner, the exports and the device reached, as JSON and in a few lines;
and why the demo failed, when it did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.common.settings import Settings
from daemon.service.daemon import Daemon
from daemon.service.status import latest_manifest, learning_status, pct


def learner_summary(training: Any) -> dict[str, Any]:
    if training.learner.holdout_index:  # a fresh evaluation, on the learner's thread: it owns the learner's connections
        training.on_learner_thread(training.learner.evaluate_holdout)
    lr = learning_status(training)
    return {
        "backbone": lr.backbone,
        "mode": lr.mode,
        "steps": lr.steps,
        "learned": lr.learned,
        "classes": list(lr.classes),
        "prequential_accuracy": lr.prequential_overall,
        "prequential_accuracy_recent": lr.prequential,
        "holdout_accuracy": lr.holdout,
        "holdout_per_class": lr.holdout_per_class,
        "average_forgetting": lr.average_forgetting,
    }


def export_summary(exporting: Any, settings: Settings) -> dict[str, Any]:
    last = exporting.last
    latest = latest_manifest(settings)  # this run's, or an earlier run's in the same state folder
    return {
        "published": exporting.published,
        "rejected": exporting.rejected,
        "latest_version": latest["version"] if latest else None,
        "last_export": None
        if last is None
        else {
            "published": bool(last.published),
            "rejected_because": [str(r) for r in last.reasons],
            "metrics": last.metrics,
        },
    }


def failure(d: Daemon, summary: dict[str, Any], timed_out: bool, max_seconds: float) -> str | None:
    """Why the demo's loop did not complete (no verified model on the device at the end), or None when it did."""
    late = f" within --max-seconds {max_seconds:.0f}" if timed_out else ""
    if d.exporting is None:
        return "no model can be published: training.enabled and export.enabled must both be true"
    if summary.get("export", {}).get("latest_version") is None:  # none in the registry, from this run or before
        last = d.exporting.last
        why = "; ".join(str(r) for r in last.reasons) if last is not None else ""  # Refusals: str() is the sentence
        return f"no model was published{late}" + (
            f" (last export refused: {why})" if why else " (see demo.log in the state folder)"
        )
    device = summary.get("device")
    if device is None:
        return "no device followed the models: server.enabled must be true"
    if not device.get("version"):
        return f"the device holds no verified model: {device.get('reason', 'unknown')}"
    return None


def shown(path: Path) -> str:
    """A path as the person typed their way to it: relative to where they stand when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def readable(summary: dict[str, Any], summary_file: Path, log_file: Path) -> list[str]:
    """The summary in a few lines a person reads; the whole of it is in ``summary_file``."""
    feed, store = summary["feed"], summary["store"]
    splits = store["per_split"]
    lines = [
        f"Sprout demo, {summary['seconds']:.0f} s:",
        f"  fed      {feed['acked']} Fashion-MNIST photos; stored {store['total']} ({splits.get('train', 0)} to learn, "
        f"{splits.get('holdout', 0)} held out), rejected {store['rejected_total']}",
    ]
    learner = summary.get("learner")
    if learner:
        lines.append(
            f"  learned  {learner['learned']} examples in {learner['steps']} steps ({learner['backbone']}, "
            f"{learner['mode']} mode): {len(learner['classes'])} classes, holdout top-1 "
            f"{pct(learner['holdout_accuracy'])}, prequential {pct(learner['prequential_accuracy'])}"
        )
    export = summary.get("export")
    if export:
        earlier = (
            " (this state folder's, from an earlier run: nothing new to learn)"
            if (export["latest_version"] and not export["published"])
            else ""
        )
        lines.append(
            f"  models   {export['published']} published, {export['rejected']} refused by the gates; "
            f"latest version {export['latest_version'] or '-'}{earlier}"
        )
    device = summary.get("device")
    if device and device.get("version"):
        lines.append(
            f"  device   version {device['version']} ({device['quantization']}) on {device['runtime']}: "
            f"top-1 {pct(device['top1_on_device'])} on {device['test_photos']} photos it never saw"
        )
        lines.append(f"  try      sprout-edge classify --dir {shown(Path(device['folder']))} PHOTO.jpg")
    elif device:
        lines.append(f"  device   no verified model: {device.get('reason', 'unknown')}")
    lines.append(f"  details  {shown(summary_file)} (all figures), {shown(log_file)} (the daemon's log)")
    return lines
