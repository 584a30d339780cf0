"""The status page at ``/``: what the model is, how well it learns, and what the exporter did, at a glance.

One self-contained HTML document, rendered on request from the daemon's
status snapshot (:class:`daemon.service.status.Status`): no JavaScript, no files, no
CDN (the box may have no internet); the charts are inline SVG drawn from the
learning curves (:mod:`daemon.learning.curves`), and the page refreshes itself every
10 seconds. Totals are the store's and the learner's, so a restarted daemon
shows what it held before; only the rows marked "since start" begin again.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

from daemon.distribution.fleet import FleetView
from daemon.learning.curves import Point
from daemon.learning.drift import Drift
from daemon.registry.layout import LOG
from daemon.registry.versions import registry_root
from daemon.service.status import LearningStatus, Status
from daemon.service.status import pct as _pct
from daemon.store.field import VersionInField

CHART_W, CHART_H, PAD = 640, 220, 40


def render(status: Status, settings: Any) -> str:
    s = settings
    e = html.escape
    parts = [f"<h1>Sprout: {e(s.model.name)}</h1>"]
    parts.append(_model(status.model, status.rollout, status.rollout_judged))
    parts.append(_learning(status))
    points = list(status.curves)
    parts.append("<h2>Learning curves</h2>")
    parts.append(_chart("accuracy", points, [("prequential", "#2b7bb9"), ("holdout", "#d9822b")], 0.0, 1.0, "%"))
    losses = [p.loss for p in points if p.loss is not None]
    parts.append(_chart("loss", points, [("loss", "#8e44ad")], 0.0, max(losses) * 1.1 if losses else 1.0, ""))
    if status.learning is not None:
        parts.append(_labels(status.learning))
    if status.fleet is not None:
        parts.append(_fleet(status.fleet))
    if s.field.telemetry:
        parts.append(_in_field(status.in_field, s.field.low_confidence_below))
    if status.labelling:
        parts.append(_labelling(status.labelling, status.photos, status.drift, status.drift_waiting, s.field))
    parts.append(_exports(s))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="10">'
        f"<title>Sprout: {e(s.model.name)}</title><style>{_STYLE}</style></head><body>"
        + "".join(parts)
        + f'<p class="muted">Rendered {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}; '
        'metrics for Prometheus at <a href="/metrics">/metrics</a>.</p></body></html>'
    )


def _model(manifest: dict | None, rollout: dict | None = None, judged: str | None = None) -> str:
    if manifest is None:
        return '<section id="model"><h2>Model</h2><p>No version published yet.</p></section>'
    m = manifest.get("metrics", {})
    size = manifest.get("files", {}).get("model.tflite", {}).get("size", 0)
    runtimes = ", ".join(f"{html.escape(k)} {_pct(v)}" for k, v in (m.get("holdout_top1") or {}).items())
    return (
        '<section id="model"><h2>Model</h2><table>'
        f'<tr><th>version</th><td id="model-version">{manifest["version"]}</td></tr>'
        f"<tr><th>published</th><td>{html.escape(str(manifest.get('created_at')))}</td></tr>"
        f"<tr><th>quantization</th><td>{html.escape(str(manifest.get('quantization')))} ({size / 1e6:.2f} MB)</td></tr>"
        f"<tr><th>holdout top-1</th><td>{runtimes} (float {_pct(m.get('holdout_top1_float'))})</td></tr>"
        f"<tr><th>classes</th><td>{len(manifest.get('labels', []))}</td></tr>"
        f"{_rollout(rollout, judged)}</table></section>"
    )


def _rollout(rollout: dict | None, judged: str | None) -> str:
    """A row on the version rolling out in stages, or on how the last one ended; the watch's last verdict."""
    if rollout is None:
        return ""
    if rollout["state"] == "rolling":
        stages = ", ".join(f"{p:g}%" for p in rollout["stages"])
        said = (
            f"version {rollout['version']} to {rollout['percent']:g}% of devices (stage {rollout['stage'] + 1}: "
            f"{stages}); the others keep version {rollout['replaces']}"
        )
    else:
        said = f"version {rollout['version']}: {rollout['state']}" + (
            f" ({html.escape(rollout['reason'])})" if rollout.get("reason") else ""
        )
    row = f'<tr><th>rollout</th><td id="rollout">{said}</td></tr>'
    if judged is not None and rollout["state"] == "rolling":
        row += f'<tr><th>last judged</th><td id="rollout-judged">{html.escape(judged)}</td></tr>'
    return row


def _learning(status: Status) -> str:
    rows = [
        ("examples stored", f'<span id="stored">{status.examples}</span>'),
        ("rejected", f'<span id="rejected">{status.rejected}</span>'),
    ]
    if (intake := status.intake) is not None:
        since = f" ({intake.duplicates} duplicates, {intake.rejected_total} rejected)"
        rows.append(("stored since start", f'<span id="stored-since-start">{intake.stored}</span>{since}'))
    if (lr := status.learning) is None:
        return (
            '<section id="learning"><h2>Learning</h2><table>'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table><p>Training is off on this node.</p></section>"
        )
    rows += [
        ("examples learned", f'<span id="learned">{lr.learned}</span>'),
        ("backlog", f"{lr.backlog}"),
        ("prequential accuracy", f'<span id="prequential">{_pct(lr.prequential)}</span>'),
        (
            "holdout accuracy",
            f'<span id="holdout">{_pct(lr.holdout)}</span>'
            + (f' <span class="muted">(at step {lr.holdout_at_step})</span>' if lr.holdout is not None else ""),
        ),
        ("last loss", "-" if lr.loss is None else f"{lr.loss:.3f}"),
        ("backbone", f"{html.escape(lr.backbone)} ({html.escape(lr.mode)} on {html.escape(lr.device)})"),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    per_class = (
        "".join(
            f'<tr class="class"><td>{html.escape(label)}</td><td>{_pct(acc)}</td>'
            f'<td><div class="bar" style="width:{200 * acc:.0f}px"></div></td></tr>'
            for label, acc in lr.holdout_per_class.items()
        )
        or '<tr><td colspan="3">no holdout evaluation yet</td></tr>'
    )
    return (
        f'<section id="learning"><h2>Learning</h2><table>{table}</table>'
        f'<h3>Holdout accuracy per class</h3><table id="per-class">{per_class}</table></section>'
    )


def _labels(lr: LearningStatus) -> str:
    """The learner's outputs, in order, and what ``sprout labels`` changed: what the next export's labels.txt holds."""
    e = html.escape
    outputs = (
        "".join(f'<tr class="output"><td>{i}</td><td>{e(label)}</td></tr>' for i, label in enumerate(lr.classes))
        or '<tr><td colspan="2">no class learned yet</td></tr>'
    )
    notes = ""
    if lr.aliases:
        notes += (
            '<p id="aliases">Learned as another class (renamed or merged): '
            + ", ".join(f"{e(old)} &rarr; {e(now)}" for old, now in sorted(lr.aliases.items()))
            + "</p>"
        )
    if lr.retired:
        notes += (
            '<p id="retired">Retired (stored, not learned or exported): '
            + ", ".join(e(label) for label in sorted(lr.retired))
            + "</p>"
        )
    return (
        f'<section id="labels"><h2>Classes</h2><table id="outputs"><tr><th>output</th><th>label</th></tr>'
        f'{outputs}</table>{notes}<p class="muted">Change them with <code>sprout labels</code>; label changes '
        f"applied: {lr.label_changes_applied}.</p></section>"
    )


def _fleet(view: FleetView) -> str:
    """Which versions the devices run (their own word, the last day) and fetch (downloads since the start)."""
    versions = sorted(
        {*view.devices_by_version, *map(str, view.downloads_by_version)},
        key=lambda v: (not v.isdigit(), -int(v) if v.isdigit() else 0),
    )
    if not versions:
        return (
            '<section id="fleet"><h2>Devices</h2><p>No device has asked for a model yet (devices that send '
            "Sprout-Device and Sprout-Version are counted here; docs/devices.md).</p></section>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(v)}</td><td>{view.devices_by_version.get(v, 0)}</td>"
        f"<td>{_downloads(view, int(v)) if v.isdigit() else ''}</td></tr>"
        for v in versions
    )
    return (
        '<section id="fleet"><h2>Devices</h2><table><tr><th>version</th><th>devices running it (last day)</th>'
        f"<th>downloads</th></tr>{rows}</table></section>"
    )


def _in_field(versions: tuple[VersionInField, ...], unsure_below: float) -> str:
    """How each version does on the devices that report (docs/devices.md, "Reporting"), all reports added up."""
    if not versions:
        return (
            '<section id="field"><h2>In the field</h2><p>No device has reported yet (devices opt in and send '
            "counters per version: docs/devices.md).</p></section>"
        )
    rows = "".join(
        f"<tr><td>{v.version}</td><td>{v.devices}</td><td>{v.predictions}</td><td>{_pct(v.mean_confidence)}</td>"
        f"<td>{_pct(v.share_below(unsure_below))}</td><td>{_pct(v.correction_share)}</td>"
        f"<td>{v.load_failures} ({_pct(v.load_failure_share)})</td>"
        f"<td>{'-' if v.mean_latency_ms is None else f'{v.mean_latency_ms:.0f} ms'}</td></tr>"
        for v in versions
    )
    return (
        '<section id="field"><h2>In the field</h2><table><tr><th>version</th><th>devices reporting</th>'
        f"<th>predictions</th><th>mean top-1 score</th><th>top-1 below {unsure_below:.1f}</th><th>corrected</th>"
        f"<th>load failures</th><th>mean latency</th></tr>{rows}</table></section>"
    )


def _labelling(
    states: dict[str, int], photos: dict[tuple[str, str], int], drift: Drift | None, waiting: str | None, field: Any
) -> str:
    """The photos devices sent back: how many wait for a label (and the link to give them one), and drift."""
    taken = sum(n for (_, outcome), n in photos.items() if outcome == "queued")
    capped = sum(n for (_, outcome), n in photos.items() if outcome == "capped")
    if drift is not None:
        moved = drift.drifted(field.drift_significance)
        verdict = (
            '<b class="warn">drifted</b>: the field shows what the training set lacks; label the queue, send examples'
            if moved
            else "no drift shown"
        )
        tested = time.strftime("%H:%M UTC", time.gmtime(drift.at))
        shift = (
            f'<p id="drift">Drift: {verdict} (MMD² {drift.mmd2:.4f}, p = {drift.p_value:.3f}, {drift.field_photos} '
            f"sample photos against {drift.stored_photos} stored, at {tested}).</p>"
        )
    elif waiting is not None:
        shift = f'<p id="drift">Drift: not tested yet: {html.escape(waiting)}.</p>'
    else:
        shift = ""
    return (
        f'<section id="labelling"><h2>Labelling</h2><p><a href="/label">{states.get("queued", 0)} photos wait for a '
        f"label</a> (devices send back those their model was unsure of, those users corrected, and a random "
        f"sample); {states.get('labelled', 0)} labelled, {states.get('skipped', 0)} skipped, "
        f"{states.get('dropped', 0)} dropped. Since start: {taken} received, {capped} over a device's daily cap.</p>"
        f"{shift}</section>"
    )


def _downloads(view: FleetView, version: int) -> str:
    full, delta = view.downloads_by_kind.get((version, "full"), 0), view.downloads_by_kind.get((version, "delta"), 0)
    return f"{full + delta} ({delta} as delta)" if delta else str(full)


def _chart(name: str, points: list[Point], series: list[tuple[str, str]], lo: float, hi: float, unit: str) -> str:
    """An SVG line chart of ``series`` (attributes of Point) against examples learned."""
    if len(points) < 2:
        return f'<p id="chart-{name}" class="muted">The {name} chart appears once learning has progressed.</p>'
    x0, x1 = points[0].learned, max(points[-1].learned, points[0].learned + 1)
    hi = hi if hi > lo else lo + 1.0

    def xy(p: Point, v: float) -> str:
        x = PAD + (p.learned - x0) / (x1 - x0) * (CHART_W - 2 * PAD)
        y = CHART_H - PAD - (v - lo) / (hi - lo) * (CHART_H - 2 * PAD)
        return f"{x:.1f},{y:.1f}"

    lines, legend = [], []
    for i, (attr, colour) in enumerate(series):
        coords = [xy(p, getattr(p, attr)) for p in points if getattr(p, attr) is not None]
        if len(coords) >= 2:
            lines.append(
                f'<polyline class="series" data-series="{attr}" fill="none" stroke="{colour}" '
                f'stroke-width="2" points="{" ".join(coords)}"/>'
            )
        legend.append(f'<text x="{PAD + 130 * i}" y="16" fill="{colour}">{attr}</text>')
    fmt = (lambda v: f"{100 * v:.0f}%") if unit == "%" else (lambda v: f"{v:.2f}")
    axes = (
        f'<line x1="{PAD}" y1="{CHART_H - PAD}" x2="{CHART_W - PAD}" y2="{CHART_H - PAD}" stroke="#999"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{CHART_H - PAD}" stroke="#999"/>'
        f'<text x="2" y="{PAD + 4}">{fmt(hi)}</text><text x="2" y="{CHART_H - PAD}">{fmt(lo)}</text>'
        f'<text x="{PAD}" y="{CHART_H - 12}">{x0}</text>'
        f'<text x="{CHART_W - PAD - 60}" y="{CHART_H - 12}">{x1} learned</text>'
    )
    return (
        f'<svg id="chart-{name}" width="{CHART_W}" height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" '
        f'role="img" aria-label="{name} against examples learned">{axes}{"".join(lines)}{"".join(legend)}</svg>'
    )


def _exports(settings: Any, most: int = 10) -> str:
    lines = _tail(registry_root(settings.state_dir) / settings.model.name / LOG, most)
    rows = []
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        kind = event.get("event", "?")
        if kind == "published":
            what = (
                f"version {event.get('version')} ({html.escape(str(event.get('quantization')))}, "
                f"{event.get('size', 0) / 1e6:.2f} MB)"
            )
        elif kind == "rejected":
            candidate = event.get("candidate", {})
            what = f"{html.escape(str(candidate.get('quantization')))}: " + "; ".join(
                html.escape(r) for r in event.get("reasons", [])
            )
        elif kind == "rollback":
            what = f"back to version {event.get('version')} from {event.get('from')}"
        elif kind in ("label_renamed", "label_merged"):
            what = f"{html.escape(str(event.get('label')))} &rarr; {html.escape(str(event.get('into')))}"
        elif kind == "label_deleted":
            what = f"{html.escape(str(event.get('label')))} retired"
        else:
            what = html.escape(json.dumps({k: v for k, v in event.items() if k not in ("event", "time")}))
        rows.append(
            f'<tr class="event {html.escape(kind)}"><td>{html.escape(str(event.get("time", "")))}</td>'
            f"<td>{html.escape(kind)}</td><td>{what}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="3">no exports yet</td></tr>'
    return f'<section id="exports"><h2>Recent exports and label changes</h2><table>{body}</table></section>'


def _tail(path: Path, most: int, window: int = 256 * 1024) -> list[bytes]:
    """The last ``most`` lines of a log that grows for months: only its end is read."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - window))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.splitlines()
    if size > window:
        lines = lines[1:]  # the first may be cut
    return lines[-most:]


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 900px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.5em; } h3 { font-size: 1em; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
.bar { height: 10px; background: #5a9e5a; } .muted { color: #888; }
tr.rejected td { color: #a33; } .warn { color: #a33; } svg text { font-size: 11px; fill: #555; }
"""
