"""Learner throughput: new examples learned per second, by mode and input size, on this machine.

Runs the daemon's Learner on Fashion-MNIST JPEGs (224x224 on the wire, as the
demo sends them) through a real store, with the default batch size and replay
ratio, and times ``learn()`` over a fixed number of batches after one warm-up
batch. In head mode every new example costs one backbone forward (its
embedding is then cached for replay); in last_blocks and full modes every new
and replayed example goes through the backbone forward and backward.

Usage: python bench/learner_speed.py [--backbone efficientnet_lite0] [--sizes 96,128,160,224]
       [--modes head,last_blocks,full] [--batches 4] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.common.settings import ModelSettings, TrainingSettings  # noqa: E402
from daemon.ingest.wire import Example  # noqa: E402
from daemon.learning.learner import Learner  # noqa: E402
from daemon.store.examples import Store  # noqa: E402
from daemon.store.reader import StoreReader  # noqa: E402
from daemon.tools.datasets import FASHION_MNIST_CLASSES, fashion_mnist  # noqa: E402


def examples(n: int) -> list[Example]:
    images, labels = fashion_mnist("train")
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i]).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC).save(
            buf, format="JPEG", quality=90
        )
        out.append(
            Example(f"e{i}", FASHION_MNIST_CLASSES[labels[i]], "train", "image/jpeg", 224, 224, buf.getvalue(), 0.0)
        )
    return out


def measure(backbone: str, size: int, mode: str, batches: int, threads: int, data: list[Example]) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="sprout-speed-"))
    store = Store(workdir / "examples.db")
    store.commit(data)
    store.close()
    reader = StoreReader(workdir / "examples.db")
    training = TrainingSettings(mode=mode, device="cpu", cpu_threads=threads)
    learner = Learner(ModelSettings(backbone=backbone, input_size=size), training, workdir, reader)
    learner.learn_many(reader.after(0, training.batch_size))  # warm-up: allocations, first replay pool
    started, learned = time.perf_counter(), learner.trained
    for _ in range(batches):
        learner.learn_many(reader.after(learner.high_water_mark, training.batch_size))
    return (learner.trained - learned) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="96,128,160,224")
    ap.add_argument("--modes", default="head,last_blocks,full")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    batch = TrainingSettings().batch_size
    data = examples(batch * (args.batches + 1) * 2)
    print(
        f"{args.backbone}, batch {batch}, replay {TrainingSettings().replay_ratio}, {args.threads} torch threads, "
        f"{platform.machine()}, torch {torch.__version__}",
        flush=True,
    )
    rows = []
    for mode in args.modes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            rates = [measure(args.backbone, size, mode, args.batches, args.threads, data) for _ in range(args.repeats)]
            rows.append(
                {"mode": mode, "input_size": size, "examples_per_second": statistics.median(rates), "runs": rates}
            )
            print(
                f"  {mode:12s} {size:4d} px: {statistics.median(rates):7.1f} examples/s "
                f"({', '.join(f'{r:.1f}' for r in sorted(rates))})",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
