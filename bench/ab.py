"""A/B in one sitting: ingest and learner speed of an earlier commit against this checkout, interleaved.

Each round runs bench/ingest.py and bench/learner_speed.py once for each side, every side from its own
code: the earlier commit from a git worktree made in a temporary folder, this checkout as it is (its
uncommitted changes included), both on this virtualenv. The sides alternate which goes first, so that a
machine that slows down over the sitting does not favour one. Prints, per figure, each side's median
over the rounds, the ratio after/before, and each side's spread (lowest-highest): a ratio inside the
spread is no change. A refactoring that claims "no loss" is held to this (docs/benchmarks.md keeps the
figures).

Usage: python bench/ab.py --before <commit> [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Enough examples that a run takes seconds, not the daemon's start-up; the learner on, as deployed.
INGEST_ARGS = ["--examples", "3000", "--repeats", "1", "--distinct", "200", "--learner", "on"]
# The default backbone with its real weights; head mode (a CPU's default) and full fine-tuning.
LEARNER_ARGS = ["--modes", "head,full", "--sizes", "128", "--batches", "3", "--repeats", "3"]


def figures(tree: Path, workdir: Path) -> dict[str, float]:
    """One run of each benchmark from ``tree``: {figure name: value}."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's packages before the editable install's
    out: dict[str, float] = {}
    ingest_json, learner_json = workdir / "ingest.json", workdir / "learner.json"
    for script, args, json_path in (
        ("ingest.py", INGEST_ARGS, ingest_json),
        ("learner_speed.py", LEARNER_ARGS, learner_json),
    ):
        subprocess.run(
            [sys.executable, str(tree / "bench" / script), *args, "--json", str(json_path)],
            cwd=tree,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    ingest = json.loads(ingest_json.read_text())
    out["ingest live, examples/s"] = ingest["live_per_second_median"]
    out["ingest backlog, examples/s"] = ingest["backlog_per_second_median"]
    for row in json.loads(learner_json.read_text()):
        out[f"learner {row['mode']} {row['input_size']} px, examples/s"] = row["examples_per_second"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the commit to compare against (e.g. the one before a refactor)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="sprout-ab-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), commit], cwd=ROOT, check=True)
        try:
            sides = {"before": before, "after": ROOT}
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for side in order:
                    work = Path(tmp) / f"{side}-{r}"
                    work.mkdir()
                    runs[side].append(figures(sides[side], work))
                    print(f"round {r + 1} {side:6s}: {runs[side][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    print(f"\nA/B: before = {commit}, after = this checkout; {args.rounds} rounds, medians (lowest-highest)")
    print(f"| figure | before {commit} | after | after/before |\n|---|---:|---:|---:|")
    table = {}
    for name in runs["after"][0]:
        b = [run[name] for run in runs["before"] if name in run]
        a = [run[name] for run in runs["after"]]
        if not b:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        table[name] = {"before": b, "after": a, "ratio": ma / mb}
        print(
            f"| {name} | {mb:.1f} ({min(b):.1f}-{max(b):.1f}) | {ma:.1f} ({min(a):.1f}-{max(a):.1f}) | {ma / mb:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"before": commit, "rounds": args.rounds, "figures": table}, indent=1))


if __name__ == "__main__":
    main()
