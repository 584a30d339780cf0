"""Freshness: seconds from an example's publish to the first published model that learned it.

The real daemon (a ``sprout run`` process, default model: EfficientNet-Lite0,
head mode on the CPU) against a private Mosquitto, fed Fashion-MNIST JPEGs
(224x224, ~30 KB) at a steady rate by a QoS 1 publisher that notes when it
sent each example. An example counts as learned by a version when the
version's manifest ``metrics.high_water_mark`` is at or past the example's
store sequence number; the version's ``created_at`` is when the registry
published it (the notice goes out the same second). Freshness is that time
minus the publish time, for every example some version covers.

The export settings decide most of it: a version is exported once
``export.every_examples`` new examples were learned or ``export.every_seconds``
passed, and then conversion and verification on every runtime take their
time. The command line passes them through, so the trade-off can be measured.

Usage: python bench/freshness.py [--seconds 240] [--rate 20] [--every-examples 500] [--every-seconds 30] [--quantization fp16] [--no-prewarm] [--full-conversion-every 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import DaemonProcess, machine, wait_subscribed  # noqa: E402
from ingest import make_jpegs  # noqa: E402

from daemon.registry.versions import Registry, registry_root  # noqa: E402
from daemon.tools.broker import Mosquitto  # noqa: E402
from daemon.tools.feeder import Publisher  # noqa: E402

MODEL = "bench"
TOPIC = f"sprout/{MODEL}/examples"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(
    seconds: float,
    rate: float,
    every_examples: int,
    every_seconds: float,
    workdir: Path,
    backbone: str,
    input_size: int,
    log: Path | None,
    settle_s: float,
    quantization: str | None = None,
    prewarm: bool = True,
    full_conversion_every: int | None = None,
) -> dict:
    jpegs = make_jpegs(500)
    broker = Mosquitto(workdir / "broker").start()
    state = workdir / "state"
    env = {
        "SPROUT_LOGGING__LEVEL": "INFO",
        "SPROUT_MODEL__BACKBONE": backbone,
        "SPROUT_MODEL__INPUT_SIZE": str(input_size),
        "SPROUT_EXPORT__EVERY_EXAMPLES": str(every_examples),
        "SPROUT_EXPORT__EVERY_SECONDS": str(every_seconds),
        "SPROUT_REGISTRY__KEEP_VERSIONS": "1000",  # every version stays readable for the tally
        "SPROUT_EXPORT__PREWARM_PROCESS": "true" if prewarm else "false",
    }
    if quantization:
        env["SPROUT_EXPORT__QUANTIZATION"] = json.dumps(quantization.split(","))
    if full_conversion_every is not None:
        env["SPROUT_EXPORT__FULL_CONVERSION_EVERY"] = str(full_conversion_every)
    daemon = DaemonProcess(broker.url, MODEL, state, env, log)
    sent: dict[str, float] = {}
    try:
        wait_subscribed(broker.url, TOPIC, jpegs[0][1])
        with Publisher(broker.url, window=256) as pub:
            started = time.monotonic()
            i = 0
            while time.monotonic() - started < seconds:
                due = started + i / rate
                if (pause := due - time.monotonic()) > 0:
                    time.sleep(pause)
                label, data = jpegs[i % len(jpegs)]
                example_id = f"fresh-{i:06d}"
                sent[example_id] = time.time()
                pub.publish(TOPIC, data, label, "image/jpeg", example_id)
                i += 1
            pub.wait_all_acked(60)
        # Let the last examples reach a version: one more export cycle, unless the gates refuse it.
        registry = None
        deadline = time.monotonic() + every_seconds + settle_s
        last_seq = None
        while time.monotonic() < deadline:
            last_seq = last_seq or _seq_of(state, f"fresh-{len(sent) - 1:06d}")
            if registry is None and (registry_root(state) / MODEL).is_dir():
                registry = Registry.open_readonly(registry_root(state), MODEL)
            latest = registry.latest() if registry else None
            if last_seq and latest and latest["metrics"]["high_water_mark"] >= last_seq:
                break
            time.sleep(1)
    finally:
        daemon.stop()
        broker.stop()

    registry = Registry.open_readonly(registry_root(state), MODEL)
    versions = [
        (registry.manifest(v)["metrics"]["high_water_mark"], _epoch(registry.manifest(v)["created_at"]), v)
        for v in registry.versions()
    ]
    seqs = _seqs(state, list(sent))
    fresh: list[float] = []
    late: list[float] = []  # examples sent in the feed's second half: a daemon past its first model and conversions
    midpoint = min(sent.values()) + seconds / 2 if sent else 0.0
    for example_id, sent_at in sent.items():
        seq = seqs.get(example_id)
        covering = [created for hwm, created, _ in versions if seq is not None and hwm >= seq]
        if covering:
            fresh.append(min(covering) - sent_at)
            if sent_at >= midpoint:
                late.append(fresh[-1])
    if not fresh:
        raise SystemExit(f"no version covered any example ({len(versions)} versions; see the daemon log)")
    gaps = [b[1] - a[1] for a, b in zip(versions, versions[1:], strict=False)]
    refused = sum(1 for e in registry.events() if e.get("event") == "rejected")
    return {
        "exports_refused_by_gates": refused,
        "examples_sent": len(sent),
        "examples_covered": len(fresh),
        "versions": len(versions),
        "freshness_s_median": round(statistics.median(fresh), 1),
        "freshness_s_p90": round(percentile(fresh, 0.9), 1),
        "freshness_s_max": round(max(fresh), 1),
        "second_half_freshness_s_median": round(statistics.median(late), 1) if late else None,
        "second_half_freshness_s_p90": round(percentile(late, 0.9), 1) if late else None,
        "seconds_between_versions_median": round(statistics.median(gaps), 1) if gaps else None,
    }


def _epoch(created_at: str) -> float:
    return datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()


def _seqs(state: Path, ids: list[str]) -> dict[str, int]:
    con = sqlite3.connect(f"file:{state / 'examples.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT example_id, seq FROM examples WHERE example_id LIKE 'fresh-%'").fetchall()
    finally:
        con.close()
    wanted = set(ids)
    return {example_id: seq for example_id, seq in rows if example_id in wanted}


def _seq_of(state: Path, example_id: str) -> int | None:
    db = state / "examples.db"
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT seq FROM examples WHERE example_id = ?", (example_id,)).fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=240.0, help="how long the feed runs")
    ap.add_argument("--rate", type=float, default=20.0, help="examples per second")
    ap.add_argument("--every-examples", type=int, default=500, help="export.every_examples for the run")
    ap.add_argument("--every-seconds", type=float, default=30.0, help="export.every_seconds for the run")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument(
        "--settle-s",
        type=float,
        default=180.0,
        help="after the feed, how long to wait for a version that covers the last example",
    )
    ap.add_argument("--quantization", help="export.quantization for the run, comma-separated (default: the daemon's)")
    ap.add_argument(
        "--no-prewarm",
        action="store_true",
        help="export.prewarm_process = false: each export starts its process when due",
    )
    ap.add_argument(
        "--full-conversion-every",
        type=int,
        help="export.full_conversion_every for the run (1: every export converts the whole network)",
    )
    ap.add_argument("--log", type=Path, help="write the daemon's log here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sprout-bench-freshness-"))
    result = run(
        args.seconds,
        args.rate,
        args.every_examples,
        args.every_seconds,
        workdir,
        args.backbone,
        args.input_size,
        args.log,
        args.settle_s,
        args.quantization,
        not args.no_prewarm,
        args.full_conversion_every,
    )
    summary = {
        "machine": machine(),
        "backbone": args.backbone,
        "input_size": args.input_size,
        "quantization": args.quantization or "the daemon's default",
        "prewarm_process": not args.no_prewarm,
        "full_conversion_every": args.full_conversion_every or "the daemon's default",
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "every_examples": args.every_examples,
        "every_seconds": args.every_seconds,
        **result,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
