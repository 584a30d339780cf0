"""Online learning against periodic retraining: accuracy along a Fashion-MNIST stream against the compute spent.

Two learners see the same stream (bench/learning.py's data, streams and embeddings):

- sprout: the daemon's Learner on its defaults, one pass over the stream, learning as examples arrive;
- retrain: every K examples, a fresh head trained from scratch on every example seen so far (E epochs,
  shuffled, batches of 32, bench/learning.py's joint-training settings), which is what a user of an
  offline tool such as TensorFlow Lite Model Maker's image classifier (frozen backbone, head only) does
  on each run. Between retrains it serves the last retrained model; before the first one it has none.

Compute is accounted in seconds on this machine, from measurements: the backbone's cost per image
(decode, resize, forward; timed on a fresh embedding cache) and the measured head-training seconds.
The retraining baseline is costed twice:

- "Model Maker style": a Keras pipeline with a frozen backbone layer runs the backbone over every image
  in every epoch: E x (examples seen) forwards per retrain, plus its head training;
- "cached embeddings": a generous baseline that, like Sprout, embeds each image once: one forward per
  new image, plus its head training.

Sprout: one forward per new example plus its measured learning time (reading batches from the store,
replay, steps). Evaluations are measurement, not training, and are left out for every learner.

Usage: python bench/retrain.py [--every 1000] [--epochs 10] [--quick]
Prints the table of docs/retrain.md; writes docs/retrain.png and bench/out/retrain.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine
from learning import ROOT, Embedder, embed, load_data, order, run_stream, train_head

from daemon.common.settings import ModelSettings, TrainingSettings

STREAMS = ("iid", "class-incremental")
GOAL_ACCURACY = 0.95  # of the retraining baseline's final accuracy ...
GOAL_COMPUTE = 0.10  # ... at no more than this share of its compute
BASELINES = {"retrain-mm": "retrain, Model Maker style", "retrain-cached": "retrain, cached embeddings"}


def forward_seconds(model: ModelSettings, threads: int, images: list[bytes], repeats: int = 3) -> float:
    """Median over ``repeats`` of the seconds per image to decode and embed ``images``.

    Each repeat builds a fresh Embedder, hence an empty embedding cache: every image really goes
    through the backbone (a cached one would cost a database read, not a forward pass).
    """
    per_image = []
    for _ in range(repeats):
        embedder = Embedder(model, threads)
        ids = [f"timing/{i}" for i in range(len(images))]
        started = time.perf_counter()
        embedder.add(ids, images)
        per_image.append((time.perf_counter() - started) / len(images))
    return statistics.median(per_image)


def run_retrain(
    stream: list[tuple[str, int]],
    evaluation: list[tuple[str, int]],
    embedder: Embedder,
    every: int,
    epochs: int,
    seed: int,
    lr: float,
    weight_decay: float,
) -> list[dict]:
    """One fresh head per K examples, on all examples so far; its accuracy and measured training seconds."""
    x = torch.from_numpy(np.stack([embedder.vectors[i] for i, _ in stream]))
    y = torch.tensor([c for _, c in stream])
    xe = torch.from_numpy(np.stack([embedder.vectors[i] for i, _ in evaluation]))
    ye = torch.tensor([c for _, c in evaluation])
    retrains = []
    for seen in range(every, len(stream) + 1, every):
        started = time.perf_counter()
        head = train_head(x[:seen], y[:seen], epochs, seed, lr, weight_decay)
        head_s = time.perf_counter() - started
        with torch.no_grad():
            accuracy = float((head(xe).argmax(1) == ye).float().mean())
        retrains.append(
            {"seen": seen, "accuracy": accuracy, "head_seconds": head_s, "examples_processed": epochs * seen}
        )
    return retrains


def costs(sprout: dict, retrains: list[dict], forward_s: float, epochs: int) -> None:
    """Add cumulative compute seconds to Sprout's curve points and to each retrain, for both baseline accountings."""
    sprout["compute"] = [
        n * forward_s + learn_s for (n, _), learn_s in zip(sprout["curve"], sprout["learning_curve"], strict=True)
    ]
    sprout["compute_seconds"] = sprout["compute"][-1]
    head_total = mm_total = 0.0
    for r in retrains:
        head_total += r["head_seconds"]
        # Every epoch of every retrain pushes every example seen so far through the frozen backbone.
        mm_total += epochs * r["seen"] * forward_s + r["head_seconds"]
        r["compute_mm"] = mm_total
        r["compute_cached"] = r["seen"] * forward_s + head_total


def accuracy_at(retrains: list[dict], seen: int) -> float | None:
    """The retraining baseline's accuracy after ``seen`` examples: its last retrained model's, or none yet."""
    done = [r for r in retrains if r["seen"] <= seen]
    return done[-1]["accuracy"] if done else None


def summary(sprout: dict, retrains: list[dict]) -> dict:
    last = retrains[-1]
    # Along the stream, wherever the baseline has a model to compare with.
    along = [(acc, accuracy_at(retrains, n)) for n, acc in sprout["curve"]]
    pairs = [(a, b) for a, b in along if b is not None]
    out = {
        "sprout_accuracy": sprout["accuracy"],
        "retrain_accuracy": last["accuracy"],
        "accuracy_ratio": sprout["accuracy"] / last["accuracy"],
        "sprout_mean_accuracy": sum(a for a, _ in pairs) / len(pairs),
        "retrain_mean_accuracy": sum(b for _, b in pairs) / len(pairs),
        "sprout_compute_seconds": sprout["compute_seconds"],
        # Compute beyond the one forward per image that both pay when embeddings are cached.
        "sprout_learning_seconds": sprout["learning_curve"][-1],
        "retrain_head_seconds": sum(r["head_seconds"] for r in retrains),
        "retrain-mm_compute_seconds": last["compute_mm"],
        "retrain-cached_compute_seconds": last["compute_cached"],
    }
    for key in BASELINES:
        ratio = sprout["compute_seconds"] / out[f"{key}_compute_seconds"]
        out[f"compute_ratio_vs_{key}"] = ratio
        out[f"goal_met_vs_{key}"] = out["accuracy_ratio"] >= GOAL_ACCURACY and ratio <= GOAL_COMPUTE
    return out


def table(summaries: dict[str, dict]) -> str:
    lines = [
        "| stream | learner | final accuracy | vs retrain (accuracy) | mean accuracy along the stream | "
        "compute (s) | vs retrain, Model Maker style (compute) | vs retrain, cached (compute) | "
        "goal vs Model Maker style | goal vs cached |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]

    def met(flag: bool) -> str:
        return "met" if flag else "**missed**"

    for kind, s in summaries.items():
        mm, cached = s["retrain-mm_compute_seconds"], s["retrain-cached_compute_seconds"]
        lines.append(
            f"| {kind} | sprout | {100 * s['sprout_accuracy']:.1f}% | {100 * s['accuracy_ratio']:.1f}% | "
            f"{100 * s['sprout_mean_accuracy']:.1f}% | {s['sprout_compute_seconds']:,.1f} | "
            f"{100 * s['compute_ratio_vs_retrain-mm']:.1f}% | {100 * s['compute_ratio_vs_retrain-cached']:.1f}% | "
            f"{met(s['goal_met_vs_retrain-mm'])} | {met(s['goal_met_vs_retrain-cached'])} |"
        )
        for key, name in BASELINES.items():
            seconds = s[f"{key}_compute_seconds"]
            lines.append(
                f"| {kind} | {name} | {100 * s['retrain_accuracy']:.1f}% | 100% | "
                f"{100 * s['retrain_mean_accuracy']:.1f}% | {seconds:,.1f} | "
                f"{100 * seconds / mm:,.1f}% | {100 * seconds / cached:,.1f}% | | |"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, stream_len: int, every: int, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    for column, kind in enumerate(STREAMS):
        sprout, retrains = results[kind]["sprout"], results[kind]["retrain"]
        sprout_acc = [100 * a for _, a in sprout["curve"]]
        retrain_acc = [100 * r["accuracy"] for r in retrains]
        ax = axes[0, column]
        ax.plot(sprout["compute"], sprout_acc, "-", label="sprout (online)")
        ax.plot(
            [r["compute_cached"] for r in retrains],
            retrain_acc,
            "o--",
            drawstyle="steps-post",
            label="retrain, cached embeddings",
        )
        ax.plot(
            [r["compute_mm"] for r in retrains],
            retrain_acc,
            "s:",
            drawstyle="steps-post",
            label="retrain, Model Maker style",
        )
        ax.set_xscale("log")
        ax.set_xlabel("cumulative compute (s, log scale)")
        ax.set_title(f"{kind} stream: accuracy against compute")
        ax = axes[1, column]
        ax.plot([n for n, _ in sprout["curve"]], sprout_acc, "-", label="sprout (online)")
        # The baseline serves its last retrained model until the next retrain, and the last one to the end.
        ax.step(
            [r["seen"] for r in retrains] + [stream_len],
            retrain_acc + retrain_acc[-1:],
            "--",
            where="post",
            label=f"retrain every {every:,} ({epochs} epochs)",
        )
        ax.set_xlabel("training examples seen")
        ax.set_xlim(0, stream_len)
        ax.set_title(f"{kind} stream: accuracy along the stream")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy on all 10 classes (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run (60/20 per class, tiny backbone, K=100, E=3); writes to bench/out only",
    )
    ap.add_argument("--train-per-class", type=int)
    ap.add_argument("--eval-per-class", type=int)
    ap.add_argument("--backbone")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--every", type=int, help="K: examples between retrains of the baseline (default 1,000)")
    ap.add_argument("--epochs", type=int, help="E: epochs of each retrain (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the backbone")
    ap.add_argument("--timing-images", type=int, default=200, help="images the backbone's cost per image is timed on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--no-plot", action="store_true", help="table and JSON only (matplotlib not needed)")
    args = ap.parse_args()
    # --quick changes the defaults only: anything given explicitly still wins.
    quick = dict(
        train_per_class=60,
        eval_per_class=20,
        backbone="tiny",
        every=100,
        epochs=3,
        json=ROOT / "bench/out/retrain-quick.json",
        plot=ROOT / "bench/out/retrain-quick.png",
    )
    full = dict(
        train_per_class=600,
        eval_per_class=100,
        backbone="efficientnet_lite0",
        every=1000,
        epochs=10,
        json=ROOT / "bench/out/retrain.json",
        plot=ROOT / "docs/retrain.png",
    )
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    started = time.perf_counter()
    model = ModelSettings(backbone=args.backbone, input_size=args.input_size)
    images, stream_items, evaluation = load_data(args.train_per_class, args.eval_per_class, args.seed)
    embedder, embed_s = embed(images, model, args.threads, args.train_per_class, args.eval_per_class, args.seed)
    timed = [images[i] for i, _ in stream_items[: args.timing_images]]
    forward_s = forward_seconds(model, args.threads, timed)
    print(
        f"backbone: {1000 * forward_s:.1f} ms per image ({args.threads} threads, median of 3 over {len(timed)} images)",
        flush=True,
    )

    defaults = TrainingSettings()
    results: dict[str, dict] = {}
    summaries: dict[str, dict] = {}
    for kind in STREAMS:
        stream = order(stream_items, kind, args.seed)
        learning_curve: list[float] = []
        sprout = run_stream(
            kind,
            defaults.replay_ratio,
            stream,
            evaluation,
            images,
            embedder,
            model,
            max(1, args.every // 4),
            args.seed,
            clock=learning_curve,
        )
        sprout["learning_curve"] = learning_curve
        # The Learner has set torch to the daemon's thread count; the baseline's heads train under the same.
        torch.set_num_threads(defaults.cpu_threads)
        retrains = run_retrain(
            stream,
            evaluation,
            embedder,
            args.every,
            args.epochs,
            args.seed,
            defaults.learning_rate,
            defaults.weight_decay,
        )
        costs(sprout, retrains, forward_s, args.epochs)
        results[kind] = {"sprout": sprout, "retrain": retrains}
        summaries[kind] = summary(sprout, retrains)
        print(
            f"{kind}: sprout {sprout['accuracy']:.3f} in {sprout['compute_seconds']:.0f} s; retrain "
            f"{retrains[-1]['accuracy']:.3f} in {retrains[-1]['compute_cached']:.0f} s (cached) / "
            f"{retrains[-1]['compute_mm']:.0f} s (Model Maker style)",
            flush=True,
        )

    if not args.no_plot:
        plot(results, args.plot, len(stream_items), args.every, args.epochs)
    meta = {
        "machine": f"{args.threads} torch threads for the backbone, {defaults.cpu_threads} for head training, "
        f"{machine()['cpu']}, Python {platform.python_version()}, torch {torch.__version__}",
        "backbone": args.backbone,
        "input_size": args.input_size,
        "train_examples": len(stream_items),
        "eval_examples": len(evaluation),
        "every": args.every,
        "epochs": args.epochs,
        "forward_seconds_per_image": forward_s,
        "timing_images": len(timed),
        "embedding_seconds": embed_s,
        "replay_ratio": defaults.replay_ratio,
        "batch_size": defaults.batch_size,
        "goal": {"accuracy_ratio_at_least": GOAL_ACCURACY, "compute_ratio_at_most": GOAL_COMPUTE},
        "run_seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "summary": summaries, "results": results}, indent=1))
    print(table(summaries))
    print(f"wrote {args.json}{'' if args.no_plot else f' and {args.plot}'} in {meta['run_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
