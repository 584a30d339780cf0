"""How fast a staged rollout's gates catch a bad canary, and how often they stop a good one, by simulation.

The replaced version is known well (a fleet of 2,000 devices, 50 predictions each, corrected at the field
error rate). The canary's devices report one after another, ``--per-report`` predictions each, each
prediction corrected with the field error rate plus the canary's added error; after every report the
rollout's real gates (daemon/distribution/rollout_gates.py, on the defaults of rollout.*, min_stage_s 0)
judge the figures the store would hold. A trial ends when they halt or advance the stage, or after
``--max-devices`` reports. Top-1 scores are drawn alike for both versions, so only the corrections decide.

Prints, per (field error rate, added error): the share of trials halted, advanced and undecided, and the
median devices and predictions at the decision.

Usage: python bench/canary.py [--trials 300] [--error-rates 0.05,0.15] [--added 0,0.01,0.03,0.05,0.10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.common.settings import RolloutSettings
from daemon.distribution.rollout_gates import judge
from daemon.store.field import VersionInField

BINS = 10


def version(number: int, devices: int, predictions: int, corrections: int, scores: np.ndarray) -> VersionInField:
    bins = np.bincount(np.minimum((scores * BINS).astype(int), BINS - 1), minlength=BINS)
    return VersionInField(
        number,
        devices,
        devices,
        0,
        predictions,
        float(scores.sum()),
        corrections,
        0.0,
        tuple(int(b) for b in bins),
        0.0,
    )


def trial(
    rng: np.random.Generator, cfg: RolloutSettings, error: float, added: float, per_report: int, max_devices: int
):
    fleet_predictions = 2000 * 50
    old = version(1, 2000, fleet_predictions, int(rng.binomial(fleet_predictions, error)), rng.beta(8, 2, 5000))
    scores = np.empty(0)
    corrections = 0
    for devices in range(1, max_devices + 1):
        scores = np.concatenate([scores, rng.beta(8, 2, per_report)])
        corrections += int(rng.binomial(per_report, min(error + added, 1.0)))
        new = version(2, devices, devices * per_report, corrections, scores)
        verdict = judge(new, old, cfg, stage_age_s=0.0)
        if verdict.action != "wait":
            return verdict.action, devices, devices * per_report
    return "undecided", max_devices, max_devices * per_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--error-rates", default="0.05,0.15", help="the field's correction rate with the replaced version")
    ap.add_argument("--added", default="0,0.01,0.03,0.05,0.10", help="the canary's added correction rate")
    ap.add_argument("--per-report", type=int, default=25, help="predictions in a device's report")
    ap.add_argument("--max-devices", type=int, default=400)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = RolloutSettings(stages=[5, 25, 100], min_stage_s=0)
    rng = np.random.default_rng(args.seed)
    rows = []
    for error in (float(x) for x in args.error_rates.split(",")):
        for added in (float(x) for x in args.added.split(",")):
            outcomes = [trial(rng, cfg, error, added, args.per_report, args.max_devices) for _ in range(args.trials)]
            counts = {
                k: sum(1 for o in outcomes if o[0] == k) / len(outcomes) for k in ("halt", "advance", "undecided")
            }
            decided = [o for o in outcomes if o[0] != "undecided"]
            row = {
                "field_error_rate": error,
                "added_error": added,
                **{f"{k}_share": round(v, 3) for k, v in counts.items()},
                "devices_median": statistics.median(o[1] for o in decided) if decided else None,
                "predictions_median": statistics.median(o[2] for o in decided) if decided else None,
            }
            rows.append(row)
            print(
                f"field error {100 * error:4.0f}%, canary +{100 * added:4.1f} pts: halted {100 * counts['halt']:5.1f}%, "
                f"advanced {100 * counts['advance']:5.1f}%, undecided {100 * counts['undecided']:4.1f}%; decided at a "
                f"median of {row['devices_median']} devices, {row['predictions_median']} predictions",
                flush=True,
            )
    summary = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "trials": args.trials,
        "per_report": args.per_report,
        "gates": cfg.model_dump(),
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
