"""Memory over a long run: the daemon's resident memory while it ingests, learns and exports N examples.

The real daemon (``sprout run``, its own process) against a private
Mosquitto, fed N labelled Fashion-MNIST JPEGs by the lean QoS 1 load
generator (bench/loadgen.py) in chunks, as fast as the broker acknowledges:
the store takes them at intake's pace and the learner works through them
behind it, exporting a version every ``--every-examples`` learned. RSS
(``VmRSS`` of the daemon's process; each export runs in a child process,
daemon/export/child.py, whose RSS is sampled beside it with the verifiers'
as the whole service's) is sampled every ``--sample-s`` seconds together with the
daemon's /metrics, until the learner has learned every example.

Growth is measured after warm-up (the first ``--warmup`` share of the
examples learned and the first export, which loads the network, fills
SQLite's page caches and loads the converter): the RSS at the end against
the largest RSS seen during warm-up, and the least-squares slope of RSS against examples learned
after it, in MiB per 100,000 examples. Goal: under 5% growth.

Usage: python bench/memory.py [--examples 200000] [--input-size 64] [--every-examples 20000] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import DaemonProcess, machine, wait_subscribed
from loadgen import LoadGenerator

from daemon.tools.broker import Mosquitto
from daemon.tools.datasets import FASHION_MNIST_CLASSES, fashion_mnist

MODEL = "bench"
TOPIC = f"sprout/{MODEL}/examples"
CHUNK = 5_000


def small_jpegs(count: int, side: int) -> list[tuple[str, bytes]]:
    """(label, JPEG) pairs of Fashion-MNIST images at ``side`` px: a long run's store stays a few hundred MB."""
    images, labels = fashion_mnist("train")
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(images[i]).convert("RGB").resize((side, side)).save(buf, format="JPEG", quality=90)
        out.append((FASHION_MNIST_CLASSES[labels[i]], buf.getvalue()))
    return out


def feed(url: str, n: int, side: int, distinct: int) -> None:
    """Publish n examples with distinct ids in chunks; runs in its own process."""
    jpegs = small_jpegs(distinct, side)
    host, port = url.removeprefix("mqtt://").split(":")
    gen = LoadGenerator(host, int(port), window=1000)
    for start in range(0, n, CHUNK):
        chunk = [(f"mem-{i:07d}", *jpegs[i % distinct]) for i in range(start, min(n, start + CHUNK))]
        gen.publish_all(TOPIC, chunk)
    gen.close()
    if gen.acked != n:
        raise SystemExit(f"broker acked {gen.acked} of {n} ({gen.failed} failed)")


def run(args: argparse.Namespace, workdir: Path) -> dict:
    broker = Mosquitto(workdir / "broker").start()
    env = {
        "SPROUT_LOGGING__LEVEL": "INFO",
        "SPROUT_MODEL__BACKBONE": args.backbone,
        "SPROUT_MODEL__INPUT_SIZE": str(args.input_size),
        "SPROUT_EXPORT__EVERY_EXAMPLES": str(args.every_examples),
        "SPROUT_EXPORT__EVERY_SECONDS": "86400",  # exports by count only: the same number in every run
        **dict(pair.split("=", 1) for pair in args.env),
    }
    daemon = DaemonProcess(broker.url, MODEL, workdir / "state", env, args.log)
    samples: list[dict[str, float]] = []
    after_export: int | None = None  # samples taken since the end condition first held
    started = time.monotonic()
    try:
        wait_subscribed(broker.url, TOPIC, small_jpegs(1, args.image_side)[0][1])
        feeder = mp.get_context("spawn").Process(target=feed, args=(broker.url, args.examples, args.image_side, 2000))
        feeder.start()
        deadline = started + args.timeout_s
        while time.monotonic() < deadline:
            if feeder.exitcode not in (None, 0):
                raise SystemExit("the feeder failed: see its message above")
            if daemon.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.proc.returncode} (see --log)")
            m = daemon.metrics()
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "rss_mb": round(daemon.rss_mb(), 1),
                    "tree_rss_mb": round(daemon.tree_rss_mb(), 1),
                    "learned": m.get("sprout_examples_learned", 0.0),
                    "stored": m.get("sprout_examples_stored", 0.0),
                    "published": m.get('sprout_exports{outcome="published"}', 0.0),
                    "exports": m.get('sprout_exports{outcome="published"}', 0.0)
                    + m.get('sprout_exports{outcome="rejected"}', 0.0),
                }
            )
            # Done when every example is stored, the learner has nothing left (the holdout share,
            # store.holdout_fraction, is scored, never learned, so "learned" stops short of N), an
            # export has finished (it runs in its own process while the learner goes on, so a short
            # run can learn everything before the first one ends), and a few samples follow it.
            if (
                samples[-1]["stored"] >= args.examples
                and m.get("sprout_learner_backlog", 1.0) == 0
                and samples[-1]["exports"] >= 1
            ):
                after_export = after_export + 1 if after_export is not None else 0
                if after_export >= 3:
                    break
            time.sleep(args.sample_s)
        else:
            raise SystemExit(
                f"stored {samples[-1]['stored']:.0f} and learned {samples[-1]['learned']:.0f} of "
                f"{args.examples} within {args.timeout_s:.0f} s"
            )
        feeder.join(60)
    finally:
        daemon.stop()
        broker.stop()
    return analyse(samples, args.examples, args.warmup)


def analyse(samples: list[dict[str, float]], n: int, warmup: float) -> dict:
    # Warm-up lasts past the first export, which fills the caches an export leaves in the daemon.
    learned = samples[-1]["learned"]
    first = next((i for i, s in enumerate(samples) if s["learned"] > warmup * learned and s["exports"] >= 1), None)
    if first is None:
        raise SystemExit("no export finished: lower --every-examples so that warm-up includes one")
    warm, after = samples[:first], samples[first:]
    if len(after) < 3:
        raise SystemExit("too few samples after warm-up: lower --sample-s or --warmup")
    warm_peak = max(s["rss_mb"] for s in warm) if warm else after[0]["rss_mb"]
    x = np.array([s["learned"] for s in after])
    y = np.array([s["rss_mb"] for s in after])
    slope = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else 0.0
    end = float(np.median(y[-5:]))  # the last few samples: one sample may catch an export's peak
    return {
        "examples": n,
        "seconds": samples[-1]["t"],
        "versions_published": int(samples[-1]["published"]),
        "rss_mb_after_warmup_peak": warm_peak,
        "rss_mb_max": float(max(s["rss_mb"] for s in samples)),
        "rss_mb_end": end,
        "tree_rss_mb_max": float(max(s.get("tree_rss_mb", s["rss_mb"]) for s in samples)),
        "growth_after_warmup_pct": round(100 * (end - warm_peak) / warm_peak, 1),
        "slope_mb_per_100k": round(slope * 100_000, 1),
        "samples": samples,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([p["learned"] for p in s], [p["rss_mb"] for p in s], label="daemon RSS")
    if any("tree_rss_mb" in p for p in s):
        ax.plot(
            [p["learned"] for p in s],
            [p.get("tree_rss_mb", p["rss_mb"]) for p in s],
            alpha=0.5,
            label="with its export process",
            linewidth=0.8,
        )
    ax.axhline(result["rss_mb_after_warmup_peak"], color="grey", linestyle=":", label="peak during warm-up")
    ax.set_xlabel("examples learned")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(
        f"Daemon memory over {result['examples']:,} examples ({result['versions_published']} versions published)"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200_000)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument(
        "--input-size", type=int, default=64, help="the learner's input; 64 px keeps 200,000 within the hour"
    )
    ap.add_argument("--image-side", type=int, default=64, help="side of the JPEGs sent (bounds the store's size)")
    ap.add_argument("--every-examples", type=int, default=20_000, help="export.every_examples for the run")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the examples counted as warm-up")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--timeout-s", type=float, default=5400.0)
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the daemon (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    ap.add_argument("--log", type=Path, help="write the daemon's log here")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sprout-bench-memory-"))
    try:
        result = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "machine": machine(),
        "backbone": args.backbone,
        "input_size": args.input_size,
        "every_examples": args.every_examples,
        "warmup": args.warmup,
        **result,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
