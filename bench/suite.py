"""The benchmark suite: every figure of docs/benchmarks.md from one command, each beside its goal.

    python -m bench            # the full suite (about an hour on 2 cores); rewrites the results in docs/benchmarks.md
    python -m bench --quick    # a smoke run of every benchmark on the tiny network (a few minutes); bench/out only

Each benchmark is its own script under bench/ (run alone for more options)
and runs here as a subprocess writing JSON; this module only runs them in
order, renders their JSON as tables and checks the goals. The full run
replaces the part of docs/benchmarks.md between the ``suite`` markers and
keeps the notes below them (profiles, history); a quick run writes
bench/out/benchmarks-quick.md and never touches docs/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, machine

OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str
    full: list[str]
    quick: list[str]
    # The script's JSON (an object, or for some a list of rows) -> (table, [(figure, goal, measured, met)]).
    render: Callable[[Any], tuple[str, list[tuple[str, str, str, bool | None]]]]


def _ingest(d: dict) -> tuple[str, list]:
    rows = ["| mode | median examples/s | runs |", "|---|---:|---|"]
    for mode in ("live", "backlog"):
        runs = sorted(r["per_second"] for r in d["runs"][mode])
        rows.append(f"| {mode} | **{d[f'{mode}_per_second_median']:,}** | {' / '.join(f'{r:,.0f}' for r in runs)} |")
    live = d["live_per_second_median"]
    goal = (
        "ingest, publish to committed-and-acked (live, learner " + d["learner"] + ")",
        ">= 3,000/s",
        f"{live:,}/s",
        live >= 3000,
    )
    return "\n".join(rows), [goal]


def _ingest_stores(d: dict) -> tuple[str, list]:
    """SQLite against PostgreSQL, measured alternately in one sitting."""
    rows = ["| mode | store | median examples/s | runs |", "|---|---|---:|---|"]
    for key in d["runs"]:
        mode, _, store = key.partition("_")
        runs = sorted(r["per_second"] for r in d["runs"][key])
        rows.append(
            f"| {mode} | {store} | **{d[f'{key}_per_second_median']:,}** | {' / '.join(f'{r:,.0f}' for r in runs)} |"
        )
    live = {key.partition("_")[2]: d[f"{key}_per_second_median"] for key in d["runs"] if key.startswith("live_")}
    ratios = [f"{store} {value / live['sqlite']:.2f}" for store, value in live.items() if store != "sqlite"]
    rows.append(f"\nLive, against SQLite's: {', '.join(ratios)}.")
    return "\n".join(rows), []


def _learner(rows_in: list) -> tuple[str, list]:
    sizes = sorted({r["input_size"] for r in rows_in})
    modes = list(dict.fromkeys(r["mode"] for r in rows_in))
    rows = ["| mode | " + " | ".join(f"{s} px" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for mode in modes:
        cells = {r["input_size"]: r["examples_per_second"] for r in rows_in if r["mode"] == mode}
        rows.append(f"| {mode} | " + " | ".join(f"{cells[s]:.1f}" if s in cells else "" for s in sizes) + " |")
    return "\n".join(rows), []


def _freshness(d: dict) -> tuple[str, list]:
    rows = [
        "| feed | export trigger | versions | refused by the gates | freshness median | p90 | max |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| {d['rate_per_s']:.0f}/s for {d['seconds']:.0f} s | every {d['every_examples']} examples or "
        f"{d['every_seconds']:.0f} s | {d['versions']} | {d['exports_refused_by_gates']} | "
        f"**{d['freshness_s_median']} s** | {d['freshness_s_p90']} s | {d['freshness_s_max']} s |",
    ]
    goal = (
        f"freshness, publish to a published model ({d['backbone']}, head mode)",
        "<= 60 s",
        f"{d['freshness_s_median']} s median, {d['freshness_s_p90']} s p90",
        d["freshness_s_median"] <= 60,
    )
    return "\n".join(rows), [goal]


def _export(d: dict) -> tuple[str, list]:
    whole = [r for r in d["rows"] if "float_top1" in r]
    runtimes = list(dict.fromkeys(rt for row in whole for rt in row["runtimes"]))
    head = "| mode | export s | size | float top-1 | " + " | ".join(f"top-1 {rt}" for rt in runtimes) + " |"
    rows = [head, "|---|---:|---:|---:|" + "---:|" * len(runtimes)]
    float_size = next((r["size_bytes"] for r in whole if r["mode"] == "none"), None)
    goals = []
    for r in whole:
        cells = []
        for rt in runtimes:
            rep = r["runtimes"].get(rt, {})
            cells.append(f"{100 * rep['top1']:.1f}%" if rep.get("top1") is not None else "cannot run")
        size = f"{r['size_bytes'] / 1e6:.2f} MB"
        if float_size and r["mode"] != "none":
            size += f" ({100 * r['size_bytes'] / float_size:.0f}%)"
        rows.append(
            f"| {r['mode']} | {r['export_s']:.1f} | {size} | {100 * r['float_top1']:.1f}% | " + " | ".join(cells) + " |"
        )
        goals.append(
            (f"export {r['mode']}: sample + convert + verify", "<= 30 s", f"{r['export_s']:.1f} s", r["export_s"] <= 30)
        )
        if r["mode"] == "int8":
            worst = min((rep["top1"] for rep in r["runtimes"].values() if rep.get("top1") is not None), default=None)
            if worst is not None:
                drop = 100 * (r["float_top1"] - worst)
                goals.append(
                    ("int8 top-1 against float (worst runtime)", "<= 1.0 pt lost", f"{drop:.1f} pts", drop <= 1.0)
                )
            if float_size:
                share = 100 * r["size_bytes"] / float_size
                goals.append(("int8 size against float", "<= 30%", f"{share:.1f}%", share <= 30))
    patched = [r for r in d["rows"] if "full_export_s" in r]
    if patched:  # the exports after the head alone changed (bench/export.py --more)
        rows += [
            "",
            "| mode, only the head changed | export s | converted in full s | "
            + " | ".join(f"same top-1 {rt}" for rt in runtimes)
            + " |",
            "|---|---:|---:|" + "---:|" * len(runtimes),
        ]
        for r in patched:
            cells = [
                f"{100 * rep['same_top1']:.1f}%"
                if (rep := r["runtimes"].get(rt, {})).get("same_top1") is not None
                else "-"
                for rt in runtimes
            ]
            rows.append(f"| {r['mode']} | {r['export_s']:.1f} | {r['full_export_s']:.1f} | " + " | ".join(cells) + " |")
            goals.append(
                (f"export {r['mode']}: sample + patch + verify", "<= 5 s", f"{r['export_s']:.1f} s", r["export_s"] <= 5)
            )
    return "\n".join(rows), goals


def _latency(d: dict) -> tuple[str, list]:
    threads = sorted({r["threads"] for r in d["rows"]})
    keys = list(dict.fromkeys((r["mode"], r["runtime"]) for r in d["rows"]))
    rows = [
        "| mode | runtime | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |",
        "|---|---|" + "---:|" * len(threads),
    ]
    for mode, rt in keys:
        cells = []
        for t in threads:
            r = next(r for r in d["rows"] if (r["mode"], r["runtime"], r["threads"]) == (mode, rt, t))
            cells.append(f"{r['ms_per_image']:.2f} ms" if r["ms_per_image"] is not None else "cannot run")
        rows.append(f"| {mode} | {rt} | " + " | ".join(cells) + " |")
    return "\n".join(rows), []


def _memory(d: dict) -> tuple[str, list]:
    rows = [
        "| examples | versions published | RSS peak in warm-up | RSS max | RSS at the end | growth after warm-up | slope "
        "| max with the export process |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {d['examples']:,} | {d['versions_published']} | {d['rss_mb_after_warmup_peak']:.0f} MiB | "
        f"{d['rss_mb_max']:.0f} MiB | {d['rss_mb_end']:.0f} MiB | **{d['growth_after_warmup_pct']:+.1f}%** | "
        f"{d['slope_mb_per_100k']:+.1f} MiB per 100k examples | "
        + (f"{d['tree_rss_mb_max']:.0f} MiB |" if "tree_rss_mb_max" in d else "not measured |"),
    ]
    goal = (
        f"memory over {d['examples']:,} examples, growth after warm-up",
        "< 5%",
        f"{d['growth_after_warmup_pct']:+.1f}%",
        d["growth_after_warmup_pct"] < 5,
    )
    return "\n".join(rows), [goal]


def _phone_photos(rows_in: list) -> tuple[str, list]:
    rows = ["| photo | size | step | median ms | peak memory growth |", "|---|---:|---|---:|---:|"]
    for r in rows_in:
        rows.append(
            f"| {r['case']} ({r['content_type']}) | {r['bytes'] / 1e6:.2f} MB | {r['step']} | {r['ms_median']:,.1f} | "
            f"{r['peak_growth_mb_median']:.1f} MB |"
        )
    jpeg = next(r for r in rows_in if r["case"] == "jpeg-18mp" and r["step"] == "load_rgb 224")
    goal = (
        "18 MP phone JPEG decoded for learning (draft mode), peak memory growth",
        "<= 32 MB",
        f"{jpeg['peak_growth_mb_median']:.1f} MB",
        jpeg["peak_growth_mb_median"] <= 32,
    )
    return "\n".join(rows), [goal]


def _canary(d: dict) -> tuple[str, list]:
    rows = [
        "| field error rate | canary's added error | halted | advanced | undecided | devices at the decision (median) "
        "| predictions |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        rows.append(
            f"| {100 * r['field_error_rate']:.0f}% | +{100 * r['added_error']:.0f} pts | {100 * r['halt_share']:.1f}% "
            f"| {100 * r['advance_share']:.1f}% | {100 * r['undecided_share']:.1f}% | {r['devices_median']} "
            f"| {r['predictions_median']} |"
        )
    good = [r for r in d["rows"] if r["added_error"] == 0]
    bad = [r for r in d["rows"] if r["added_error"] >= 0.03]
    worst_false = max(r["halt_share"] for r in good) if good else 0.0
    worst_catch = min(r["halt_share"] for r in bad) if bad else 1.0
    goals = [
        ("staged rollout: good canaries halted", "<= 5%", f"{100 * worst_false:.1f}%", worst_false <= 0.05),
        ("staged rollout: canaries 3+ points worse halted", ">= 95%", f"{100 * worst_catch:.1f}%", worst_catch >= 0.95),
    ]
    return "\n".join(rows), goals


def _drift(d: dict) -> tuple[str, list]:
    rows = [
        f"{d['backbone']} at {d['input_size']} px, {d['threads']} threads: {d['embed_ms_per_photo']:.1f} ms per photo "
        f"embedded, {d['stored_embeddings_s']:.2f} s for 256 stored embeddings (cached in head mode), "
        f"{d['novelty_ms_64']:.1f} ms for the novelty of 64 photos, {d['drift_test_s']:.2f} s per drift test. "
        f"Novelty: median {d['novelty_median_learned']:.2f} for photos of learned classes, "
        f"{d['novelty_median_unseen']:.2f} for unseen ones; an unseen-class photo ranks first "
        f"{100 * d['novelty_auc']:.1f}% of the time.",
        "",
        "| sample photos | of unseen classes | flagged (p < 0.01) | median p |",
        "|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        rows.append(
            f"| {r['sample_photos']} | {100 * r['unseen_share']:.0f}% | {100 * r['flagged_share']:.0f}% "
            f"| {r['p_value_median']:.3f} |"
        )
    unchanged = max(r["flagged_share"] for r in d["rows"] if r["unseen_share"] == 0)
    most = max(r["sample_photos"] for r in d["rows"])  # 256 but in quick mode
    moved = min(r["flagged_share"] for r in d["rows"] if r["sample_photos"] == most and r["unseen_share"] >= 0.25)
    goals = [
        (
            "novelty: an unseen-class photo ranked above a learned one",
            ">= 90%",
            f"{100 * d['novelty_auc']:.1f}%",
            d["novelty_auc"] >= 0.9,
        ),
        ("drift: unchanged field flagged", "<= 10%", f"{100 * unchanged:.0f}%", unchanged <= 0.10),
        (f"drift: {most} samples, 25%+ unseen, flagged", ">= 90%", f"{100 * moved:.0f}%", moved >= 0.9),
    ]
    return "\n".join(rows), goals


def _retrain(d: dict) -> tuple[str, list]:
    from retrain import table

    goals = []
    for kind, s in d["summary"].items():
        goals.append(
            (
                f"online vs retrain every {d['meta']['every']:,} ({kind}), Model Maker style",
                ">= 95% accuracy at <= 10% compute",
                f"{100 * s['accuracy_ratio']:.1f}% at {100 * s['compute_ratio_vs_retrain-mm']:.1f}%",
                s["goal_met_vs_retrain-mm"],
            )
        )
        goals.append(
            (
                f"online vs retrain every {d['meta']['every']:,} ({kind}), cached embeddings",
                ">= 95% accuracy at <= 10% compute",
                f"{100 * s['accuracy_ratio']:.1f}% at {100 * s['compute_ratio_vs_retrain-cached']:.1f}%",
                s["goal_met_vs_retrain-cached"],
            )
        )
    return table(d["summary"]), goals


TINY = ["--backbone", "tiny", "--input-size", "32"]
BENCHMARKS = [
    Benchmark(
        "ingest",
        "Ingest: publish to committed-and-acked (30 KB JPEGs), the learner learning beside it",
        "ingest.py",
        ["--examples", "10000", "--repeats", "3"],
        ["--examples", "1000", "--repeats", "1", "--distinct", "50", "--learner", "on"],
        _ingest,
    ),
    # The same path on an ingest-only node (training.enabled = false): what intake alone sustains.
    Benchmark(
        "ingest-only",
        "Ingest on an ingest-only node (no learner beside it)",
        "ingest.py",
        ["--examples", "10000", "--repeats", "3", "--learner", "off"],
        ["--examples", "1000", "--repeats", "1", "--distinct", "50", "--learner", "off"],
        _ingest,
    ),
    # SQLite against PostgreSQL, with one and two `--role intake` members on it, the photos in rows and in files
    # (store.blob_dir), alternately in one sitting.
    Benchmark(
        "ingest-postgresql",
        "Ingest without a learner: SQLite store against PostgreSQL store with 1 and 2 intake members, "
        "photos in the rows and in store.blob_dir",
        "ingest.py",
        ["--examples", "10000", "--repeats", "3", "--learner", "off", "--store", "both", "--members", "1,2"]
        + ["--photos", "both"],
        ["--examples", "500", "--repeats", "1", "--distinct", "50", "--learner", "off", "--store", "both"]
        + ["--members", "1,2"],
        _ingest_stores,
    ),
    Benchmark(
        "learner",
        "Learner: new examples learned per second",
        "learner_speed.py",
        ["--modes", "head,last_blocks,full", "--sizes", "96,128", "--batches", "2", "--repeats", "3"],
        ["--backbone", "tiny", "--sizes", "32", "--modes", "head,full", "--batches", "1", "--repeats", "1"],
        _learner,
    ),
    Benchmark(
        "freshness",
        "Freshness: seconds from an example's publish to a published model that learned it",
        "freshness.py",
        ["--seconds", "240", "--rate", "20", "--every-examples", "500", "--every-seconds", "30"],
        [*TINY, "--seconds", "20", "--every-examples", "100", "--every-seconds", "5", "--settle-s", "20"],
        _freshness,
    ),
    Benchmark(
        "export",
        "Export: time, size and holdout top-1 per mode and runtime",
        "export.py",
        ["--input-size", "128", "--save-models", str(OUT / "models")],
        [
            *TINY,
            "--train-per-class",
            "40",
            "--eval-per-class",
            "10",
            "--calibration",
            "20",
            "--verify",
            "50",
            "--more",
            "100",
            "--modes",
            "int8,fp16,none",
            "--save-models",
            str(OUT / "models-quick"),
        ],
        _export,
    ),
    Benchmark(
        "latency",
        "Device latency: ms per image, one image per invoke",
        "latency.py",
        [str(OUT / "models"), "--repeats", "3", "--images", "200"],
        [str(OUT / "models-quick"), "--repeats", "1", "--images", "50"],
        _latency,
    ),
    Benchmark(
        "memory",
        "Memory over a long run",
        "memory.py",
        [
            "--examples",
            "200000",
            "--input-size",
            "64",
            "--every-examples",
            "20000",
            "--plot",
            str(ROOT / "docs" / "memory.png"),
        ],
        [*TINY, "--examples", "8000", "--every-examples", "2000", "--sample-s", "1"],
        _memory,
    ),
    Benchmark(
        "phone-photos",
        "Phone photos: intake's check and the learner's decode, time and peak memory",
        "phone_photos.py",
        ["--repeats", "5"],
        ["--repeats", "1"],
        _phone_photos,
    ),
    Benchmark(
        "canary",
        "Staged rollout: how fast the gates catch a bad canary, and how often they stop a good one (simulated fleet)",
        "canary.py",
        ["--trials", "300"],
        ["--trials", "30"],
        _canary,
    ),
    Benchmark(
        "drift",
        "The field scout: novelty of devices' photos and the drift test, on the real backbone (Fashion-MNIST)",
        "drift.py",
        ["--trials", "20"],
        [
            "--backbone",
            "tiny",
            "--input-size",
            "32",
            "--trials",
            "3",
            "--stored",
            "100",
            "--pool",
            "120",
            "--sizes",
            "30,100",
        ],
        _drift,
    ),
    Benchmark(
        "retrain",
        "Online learning against periodic retraining (Fashion-MNIST)",
        "retrain.py",
        [],
        ["--quick", "--no-plot"],
        _retrain,
    ),
]


def run(bench: Benchmark, quick: bool) -> tuple[dict | list, float]:
    out = OUT / f"{bench.name}{'-quick' if quick else ''}.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(ROOT / "bench" / bench.script),
        *(bench.quick if quick else bench.full),
        "--json",
        str(out),
    ]
    print(f"== {bench.name}: {' '.join(Path(c).name if c == sys.executable else c for c in command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(out.read_text()), time.monotonic() - started


def render(results: dict[str, tuple[dict | list, float]], quick: bool, command: str) -> str:
    m = machine()
    lines = [
        BEGIN,
        "",
        f"Measured by `{command}` on {datetime.now(UTC):%Y-%m-%d}: {m['cores']} cores "
        f"({m['cpu']}), Python {m['python']}, torch {m['torch']}, ai-edge-litert {m['ai-edge-litert']}, "
        f"paho-mqtt {m['paho-mqtt']}, Mosquitto {m['mosquitto']}."
        + (" **Quick mode: the tiny untrained network and short runs; a smoke test, not figures.**" if quick else ""),
        "",
        "### Goals",
        "",
        "| figure | goal | measured | |",
        "|---|---|---|---|",
    ]
    sections = []
    for bench in BENCHMARKS:
        if bench.name not in results:
            continue
        data, seconds = results[bench.name]
        table, goals = bench.render(data)
        for figure, goal, measured, met in goals:
            lines.append(f"| {figure} | {goal} | {measured} | {'met' if met else '**missed**'} |")
        flags = " ".join(bench.quick if quick else bench.full).replace(f"{ROOT}/", "")  # paths as in the repository
        sections += [
            "",
            f"### {bench.title}",
            "",
            f"`python bench/{bench.script} {flags}` ({seconds:.0f} s)",
            "",
            table,
        ]
        if bench.name == "memory" and not quick:
            sections += ["", "![Daemon memory over the long run](memory.png)"]
        if bench.name == "retrain" and not quick:
            sections += [
                "",
                "![Online learning against periodic retraining](retrain.png) (details: [retrain.md](retrain.md))",
            ]
    return "\n".join(lines + sections + ["", END])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke-run every benchmark on the tiny network; bench/out only"
    )
    ap.add_argument("--only", help="comma-separated benchmarks to run: " + ",".join(b.name for b in BENCHMARKS))
    args = ap.parse_args(argv)
    chosen = args.only.split(",") if args.only else [b.name for b in BENCHMARKS]
    unknown = set(chosen) - {b.name for b in BENCHMARKS}
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    if (
        "latency" in chosen
        and "export" not in chosen
        and not (OUT / ("models-quick" if args.quick else "models")).is_dir()
    ):
        ap.error("latency times the models export.py keeps: run export first (or with it)")
    OUT.mkdir(parents=True, exist_ok=True)
    # A full run keeps every benchmark's last result, so that `--only` refreshes some figures and the
    # document still shows all of them (each with the date and command of its own run).
    kept = OUT / ("suite-quick.json" if args.quick else "suite.json")
    results = json.loads(kept.read_text()) if kept.exists() and args.only else {}
    for bench in BENCHMARKS:
        if bench.name in chosen:
            results[bench.name] = run(bench, args.quick)
            kept.write_text(json.dumps(results))
    command = "python -m bench" + (" --quick" if args.quick else "")
    if args.only:  # the other figures are the last full run's, kept in bench/out/suite.json
        command += f"`, then `python -m bench{' --quick' if args.quick else ''} --only {args.only}"
    block = render(results, args.quick, command)
    if args.quick:
        target = OUT / "benchmarks-quick.md"
        target.write_text(block + "\n")
    else:
        target = DOC
        text = DOC.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:  # first run: the suite's results go first, the older notes stay below
            head, _, rest = text.partition("\n## ")
            text = f"{head.rstrip()}\n\n## Suite results\n\n{block}\n\n## {rest}"
        DOC.write_text(text)
    total = sum(results[name][1] for name in chosen)
    print(f"wrote {target.relative_to(ROOT)} after {total / 60:.1f} min of benchmarks", flush=True)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
