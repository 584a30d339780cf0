"""Does Sprout's learner learn from a stream, and remember? Fashion-MNIST, iid and class-incremental.

Three learners see the same examples (Fashion-MNIST from Debian's package,
224x224-upscaled grey images fed as RGB, at the configured input size):

- sprout: the daemon's Learner as configured (head mode, class-balanced replay);
- naive: the same Learner with replay_ratio = 0 (plain fine-tuning on the stream);
- joint: offline training of the same head on all the training examples at
  once, shuffled, for several epochs (the upper reference a stream learner
  aims at).

The streams: 'iid' (shuffled) and 'class-incremental' (two classes at a time,
five tasks). Every learner is scored on the same evaluation set, the
Fashion-MNIST test part, over all ten classes. Backbone embeddings are computed
once (head mode: the backbone is frozen) and placed in each run's embedding
cache, so the learners differ only in how they learn.

Usage: python bench/learning.py [--train-per-class 600] [--eval-per-class 100] [--out docs]
Writes docs/learning.md's table to stdout and a PNG of accuracy along the stream.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.common.settings import ModelSettings, TrainingSettings  # noqa: E402
from daemon.ingest.wire import Example  # noqa: E402
from daemon.learning.head import GrowingHead  # noqa: E402
from daemon.learning.learner import Learner  # noqa: E402
from daemon.store.examples import Store  # noqa: E402
from daemon.store.reader import StoreReader  # noqa: E402
from daemon.tools.datasets import FASHION_MNIST_CLASSES, fashion_mnist  # noqa: E402


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC).save(
        buf, format="JPEG", quality=90
    )
    return buf.getvalue()


Key = TypeVar("Key")  # what names an example: its id, or its index in the data set


def pick(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        out += [(int(i), c) for i in rng.choice(idx, per_class, replace=False)]
    return out


def order(items: list[tuple[Key, int]], kind: str, seed: int) -> list[tuple[Key, int]]:
    """``items`` (key, class) shuffled: "iid", or "class-incremental" (tasks of two classes in turn)."""
    rng = random.Random(seed)
    items = list(items)
    rng.shuffle(items)
    if kind == "class-incremental":
        items.sort(key=lambda it: it[1] // 2)  # tasks of two classes, shuffled within each task
    return items


class Embedder:
    """Backbone embeddings of every example, computed once for all runs."""

    def __init__(self, model: ModelSettings, threads: int):
        torch.set_num_threads(threads)
        workdir = Path(tempfile.mkdtemp(prefix="sprout-embed-"))
        Store(workdir / "examples.db").close()
        self.learner = Learner(
            model,
            TrainingSettings(mode="head", device="cpu", cpu_threads=threads),
            workdir,
            StoreReader(workdir / "examples.db"),
        )
        self.vectors: dict[str, np.ndarray] = {}

    def add(self, ids: list[str], images: list[bytes]) -> None:
        from daemon.store.reader import StoredExample

        for start in range(0, len(ids), 64):
            chunk = [
                StoredExample(-(start + i + 1), "x", "train", images[start + i])
                for i in range(min(64, len(ids) - start))
            ]
            emb, ok = self.learner.inputs.embeddings(chunk, grad=False)
            assert all(ok)
            for i, vector in enumerate(emb):
                self.vectors[ids[start + i]] = vector.numpy()


def run_stream(
    kind: str,
    replay_ratio: float,
    stream: list[tuple[str, int]],
    evaluation: list[tuple[str, int]],
    images: dict[str, bytes],
    embedder: Embedder,
    model: ModelSettings,
    eval_every: int,
    seed: int,
    clock: list[float] | None = None,
) -> dict:
    """The daemon's Learner over the stream; ``clock``, when given, receives the seconds spent reading batches
    and learning (evaluations left out) up to each point of the returned curve."""
    workdir = Path(tempfile.mkdtemp(prefix=f"sprout-learn-{kind}-"))
    store = Store(workdir / "examples.db")
    # The evaluation set first, as holdout: every evaluation scores all ten classes.
    examples = [
        Example(i, FASHION_MNIST_CLASSES[c], "holdout", "image/jpeg", 224, 224, images[i], 0.0) for i, c in evaluation
    ]
    examples += [
        Example(i, FASHION_MNIST_CLASSES[c], "train", "image/jpeg", 224, 224, images[i], 0.0) for i, c in stream
    ]
    store.commit(examples)
    store.close()
    reader = StoreReader(workdir / "examples.db")
    training = TrainingSettings(
        mode="head", device="cpu", replay_ratio=replay_ratio, holdout_max_examples=len(evaluation), seed=seed
    )
    learner = Learner(model, training, workdir, reader)
    seq_of: dict[str, int] = dict(reader._db.query("SELECT example_id, seq FROM examples"))
    assert learner.cache is not None  # head mode caches embeddings
    learner.cache.put({seq_of[i]: embedder.vectors[i] for i in seq_of})
    curve = []
    boundaries: list[dict[str, float]] = []  # per-class accuracy at the end of each fifth of the stream
    boundary = len(stream) // TASKS
    started = time.perf_counter()
    next_eval, next_boundary = eval_every, boundary
    learning_s = 0.0
    while True:
        tick = time.perf_counter()
        # Batches stop at each fifth of the stream, so task-end evaluations see exactly the tasks so far.
        batch = reader.after(learner.high_water_mark, min(training.batch_size, max(1, next_boundary - learner.trained)))
        if not batch:
            break
        learner.learn_many(batch)
        learning_s += time.perf_counter() - tick
        if learner.trained >= next_eval:
            curve.append((learner.trained, learner.evaluate_holdout().accuracy))
            if clock is not None:
                clock.append(learning_s)
            next_eval += eval_every
        if learner.trained >= next_boundary and learner.trained < len(stream):
            boundaries.append(dict(learner.evaluate_holdout().per_class))
            next_boundary += boundary
    final = learner.evaluate_holdout()
    curve.append((learner.trained, final.accuracy))
    if clock is not None:
        clock.append(learning_s)
    return {
        "accuracy": final.accuracy,
        "forgetting": forgetting(boundaries, final.per_class),
        "forgetting_dense": final.average_forgetting,
        "per_class": final.per_class,
        "examples_processed": learner.trained + learner.replayed,
        "seconds": time.perf_counter() - started,
        "curve": curve,
    }


TASKS = 5  # the class-incremental stream's tasks (two classes each); iid is cut at the same points


def forgetting(earlier: list[dict[str, float]], final: dict[str, float]) -> float | None:
    """Average over classes known before the last task of (best accuracy at an earlier task's end - final).

    The usual definition for continual learning (Chaudhry et al., 2018): measured where tasks end,
    not at every evaluation, whose step-to-step noise would inflate the maximum.
    """
    drops = []
    for label in {c for acc in earlier for c, a in acc.items() if a > 0}:
        best = max(acc.get(label, 0.0) for acc in earlier)
        drops.append(best - final.get(label, 0.0))
    return sum(drops) / len(drops) if drops else None


def train_head(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    lr: float,
    weight_decay: float,
    after_epoch: Callable[[int, GrowingHead], None] | None = None,
) -> GrowingHead:
    """A fresh ten-class head trained offline on (x, y): shuffled, batches of 32, AdamW, plain cross-entropy."""
    torch.manual_seed(seed)
    head = GrowingHead(x.shape[1], 10)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            idx = perm[start : start + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(epoch, head)
    return head


def run_joint(
    stream: list[tuple[str, int]],
    evaluation: list[tuple[str, int]],
    embedder: Embedder,
    epochs: int,
    seed: int,
    lr: float,
    weight_decay: float,
) -> dict:
    x = torch.from_numpy(np.stack([embedder.vectors[i] for i, _ in stream]))
    y = torch.tensor([c for _, c in stream])
    xe = torch.from_numpy(np.stack([embedder.vectors[i] for i, _ in evaluation]))
    ye = torch.tensor([c for _, c in evaluation])
    started = time.perf_counter()
    curve = []

    def score(epoch: int, head: GrowingHead) -> None:
        with torch.no_grad():
            curve.append(((epoch + 1) * len(x), float((head(xe).argmax(1) == ye).float().mean())))

    head = train_head(x, y, epochs, seed, lr, weight_decay, score)
    with torch.no_grad():
        predicted = head(xe).argmax(1)
    per_class = {FASHION_MNIST_CLASSES[c]: float((predicted[ye == c] == c).float().mean()) for c in range(10)}
    return {
        "accuracy": curve[-1][1],
        "per_class": per_class,
        "forgetting": None,
        "forgetting_dense": None,
        "examples_processed": epochs * len(x),
        "seconds": time.perf_counter() - started,
        "curve": curve,
    }


def load_data(
    train_per_class: int, eval_per_class: int, seed: int
) -> tuple[dict[str, bytes], list[tuple[str, int]], list[tuple[str, int]]]:
    """(JPEG of every image by id, the training examples, the evaluation set) drawn from Fashion-MNIST."""
    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("t10k")
    train = pick(train_images, train_labels, train_per_class, seed)
    test = pick(test_images, test_labels, eval_per_class, seed)
    images = {f"train/{i}": jpeg(train_images[i]) for i, _ in train}
    images.update({f"t10k/{i}": jpeg(test_images[i]) for i, _ in test})
    return images, [(f"train/{i}", c) for i, c in train], [(f"t10k/{i}", c) for i, c in test]


def embed(
    images: dict[str, bytes], model: ModelSettings, threads: int, train_per_class: int, eval_per_class: int, seed: int
) -> tuple[Embedder, float]:
    """Every image's embedding, from bench/out's cache when there; the seconds they took (nan when cached)."""
    t0 = time.perf_counter()
    embedder = Embedder(model, threads)
    ids = list(images)
    cache = (
        ROOT
        / "bench"
        / "out"
        / f"embeddings-{model.backbone}-{model.input_size}-{train_per_class}-{eval_per_class}-{seed}.npz"
    )
    if cache.exists():  # the backbone is frozen: the same images give the same embeddings
        with np.load(cache) as saved:
            embedder.vectors = {i: saved[i.replace("/", "_")] for i in ids}
        embed_s = float("nan")
        print(f"embeddings read from {cache.relative_to(ROOT)}", flush=True)
    else:
        embedder.add(ids, [images[i] for i in ids])
        embed_s = time.perf_counter() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Plain float arrays: no pickle needed, and np.load (above) reads them back without it.
        np.savez(cache, allow_pickle=False, **{i.replace("/", "_"): v for i, v in embedder.vectors.items()})
        print(
            f"embedded {len(ids)} images with {model.backbone} at {model.input_size} px in {embed_s:.0f} s "
            f"({len(ids) / embed_s:.0f}/s, {threads} threads)",
            flush=True,
        )
    return embedder, embed_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--joint-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()

    model = ModelSettings(backbone=args.backbone, input_size=args.input_size)
    images, stream_items, evaluation = load_data(args.train_per_class, args.eval_per_class, args.seed)
    embedder, embed_s = embed(images, model, args.threads, args.train_per_class, args.eval_per_class, args.seed)

    defaults = TrainingSettings()
    results: dict[str, dict] = {}
    for kind in ("iid", "class-incremental"):
        stream = order(stream_items, kind, args.seed)
        eval_every = len(stream) // 20
        results[f"{kind}/sprout"] = run_stream(
            kind, defaults.replay_ratio, stream, evaluation, images, embedder, model, eval_every, args.seed
        )
        results[f"{kind}/naive"] = run_stream(
            kind, 0.0, stream, evaluation, images, embedder, model, eval_every, args.seed
        )
        print(
            f"{kind}: sprout {results[f'{kind}/sprout']['accuracy']:.3f}, naive {results[f'{kind}/naive']['accuracy']:.3f}",
            flush=True,
        )
    results["joint"] = run_joint(
        stream_items, evaluation, embedder, args.joint_epochs, args.seed, defaults.learning_rate, defaults.weight_decay
    )
    print(f"joint: {results['joint']['accuracy']:.3f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "learning.png", len(stream_items))
    meta = {
        "machine": f"{torch.get_num_threads()} torch threads, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "backbone": args.backbone,
        "input_size": args.input_size,
        "train_examples": len(stream_items),
        "eval_examples": len(evaluation),
        "embedding_seconds": embed_s,
        "replay_ratio": defaults.replay_ratio,
        "batch_size": defaults.batch_size,
        "joint_epochs": args.joint_epochs,
    }
    (args.out / "learning.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results))


def table(results: dict[str, dict]) -> str:
    joint = results["joint"]["accuracy"]
    lines = [
        "| stream | learner | final accuracy (10 classes) | vs joint | avg forgetting (task ends) | "
        "avg forgetting (every 5%) | avg per-class shortfall vs joint | examples processed | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    joint_per_class = results["joint"]["per_class"]

    def pts(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} pts"

    for key, r in results.items():
        stream, _, name = key.partition("/") if "/" in key else ("all at once", "", key)
        shortfall = sum(max(0.0, joint_per_class[c] - r["per_class"].get(c, 0.0)) for c in joint_per_class) / len(
            joint_per_class
        )
        lines.append(
            f"| {stream} | {name} | {100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - joint):+.1f} pts | "
            f"{pts(r['forgetting'])} | {pts(r['forgetting_dense'])} | {pts(shortfall)} | "
            f"{r['examples_processed']:,} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, stream_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("iid", "class-incremental"), strict=True):
        for name, style in (("sprout", "-"), ("naive", "--")):
            xs, ys = zip(*results[f"{kind}/{name}"]["curve"], strict=True)
            ax.plot(xs, [100 * y for y in ys], style, label=f"{name}")
        ax.axhline(100 * results["joint"]["accuracy"], color="grey", linestyle=":", label="joint (offline)")
        ax.set_title(f"Fashion-MNIST, {kind} stream")
        ax.set_xlabel("training examples seen")
        ax.set_xlim(0, stream_len)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on all 10 classes (%)")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
