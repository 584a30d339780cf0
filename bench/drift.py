"""The field scout on the real backbone: what measuring devices' photos costs the learner, how well novelty puts a
new kind of photo first, and how often the drift test flags a field that moved (and one that did not).

A learner (head mode, on the CPU) learns Fashion-MNIST's first eight classes from a real store; the field is
Fashion-MNIST's test part, sent as devices send photos (640 px JPEG). Then:

- cost: ``Learner.embed_photos`` per photo, ``Learner.stored_embeddings`` of 256 (cached in head mode), the
  novelty of 64 photos, and one drift test of 256 against 256 (500 permutations), as the scout runs them;
- novelty: the chance that a photo of an unseen class (8 or 9) ranks above one of a learned class (an AUC);
- drift: over ``--trials`` tests each, the share flagged at p < 0.01 when a share of the field's sample
  photos (0, 10%, 25%, 50%) are of the unseen classes, for 30, 100 and 256 sample photos.

Usage: python bench/drift.py [--backbone efficientnet_lite0] [--input-size 224] [--trials 20] [--sizes 30,100,256]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.common.settings import ModelSettings, TrainingSettings  # noqa: E402
from daemon.ingest.wire import Example  # noqa: E402
from daemon.learning.drift import drift_test, novelty  # noqa: E402
from daemon.learning.learner import Learner  # noqa: E402
from daemon.store.examples import Store  # noqa: E402
from daemon.store.reader import StoreReader  # noqa: E402
from daemon.tools.datasets import FASHION_MNIST_CLASSES, fashion_mnist  # noqa: E402

LEARNED = range(8)  # the classes the model knows; 8 and 9 are the field's new kind
SIGNIFICANCE = 0.01


def jpeg(pixels: np.ndarray, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--stored", type=int, default=400, help="train examples learned (of the eight classes)")
    ap.add_argument("--pool", type=int, default=300, help="field photos embedded per kind (learned, unseen)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sizes", default="30,100,256", help="sample photos per drift test (at most --pool)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    if max(sizes) > args.pool:
        ap.error(f"--sizes up to {max(sizes)} need --pool of at least that many photos per kind")
    torch.set_num_threads(args.threads)
    images, labels = fashion_mnist("train")
    side = args.input_size
    train = [i for i in range(len(labels)) if labels[i] in LEARNED][: args.stored]
    workdir = Path(tempfile.mkdtemp(prefix="sprout-drift-"))
    store = Store(workdir / "examples.db")
    store.commit(
        Example(
            f"e{i}", FASHION_MNIST_CLASSES[labels[i]], "train", "image/jpeg", side, side, jpeg(images[i], side), 0.0
        )
        for i in train
    )
    store.close()
    reader = StoreReader(workdir / "examples.db")
    training = TrainingSettings(mode="head", device="cpu", cpu_threads=args.threads)
    learner = Learner(ModelSettings(backbone=args.backbone, input_size=side), training, workdir, reader)
    started = time.perf_counter()
    while batch := reader.after(learner.high_water_mark, training.batch_size):
        learner.learn_many(batch)
    learn_s = time.perf_counter() - started
    print(f"{args.backbone} at {side} px: learned {learner.trained} examples in {learn_s:.1f} s", flush=True)

    test_images, test_labels = fashion_mnist("t10k")
    known_ids = [i for i in range(len(test_labels)) if test_labels[i] in LEARNED][: args.pool]
    new_ids = [i for i in range(len(test_labels)) if test_labels[i] not in LEARNED][: args.pool]
    photos = {i: jpeg(test_images[i], 640) for i in known_ids + new_ids}  # as sprout-edge sends them

    started = time.perf_counter()
    vectors = learner.embed_photos([photos[i] for i in known_ids + new_ids])
    embed_ms = (time.perf_counter() - started) * 1000 / len(photos)
    field = np.stack([v for v in vectors if v is not None])
    known, new = field[: len(known_ids)], field[len(known_ids) :]
    rng = random.Random(0)
    started = time.perf_counter()
    stored = learner.stored_embeddings(256, rng)
    stored_s = time.perf_counter() - started
    started = time.perf_counter()
    novelty(field[:64], stored)
    novelty_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    drift_test(known[:256], stored, 0.0)
    drift_s = time.perf_counter() - started
    print(
        f"cost: {embed_ms:.1f} ms per photo embedded, {stored_s:.2f} s for 256 stored embeddings (cached), "
        f"{novelty_ms:.1f} ms for the novelty of 64, {drift_s:.2f} s per drift test (256 vs 256, 500 permutations)",
        flush=True,
    )

    nov_known, nov_new = novelty(known, stored), novelty(new, stored)
    auc = float((nov_new[:, None] > nov_known[None, :]).mean() + 0.5 * (nov_new[:, None] == nov_known[None, :]).mean())
    print(
        f"novelty: learned classes median {np.median(nov_known):.2f}, unseen classes {np.median(nov_new):.2f}; "
        f"an unseen-class photo ranks above a learned-class one {100 * auc:.1f}% of the time",
        flush=True,
    )

    nprng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        for share in (0.0, 0.1, 0.25, 0.5):
            flagged, p_values = 0, []
            for t in range(args.trials):
                k = round(n * share)
                sample = np.vstack(
                    [
                        known[nprng.choice(len(known), n - k, replace=False)],
                        new[nprng.choice(len(new), k, replace=False)],
                    ]
                )
                reference = learner.stored_embeddings(256, rng)
                result = drift_test(sample, reference, 0.0, seed=t)
                flagged += result.drifted(SIGNIFICANCE)
                p_values.append(result.p_value)
            rows.append(
                {
                    "sample_photos": n,
                    "unseen_share": share,
                    "flagged_share": flagged / args.trials,
                    "p_value_median": statistics.median(p_values),
                }
            )
            print(
                f"drift: {n:3d} sample photos, {100 * share:3.0f}% of unseen classes: flagged in "
                f"{100 * flagged / args.trials:5.1f}% of {args.trials} tests (median p {statistics.median(p_values):.3f})",
                flush=True,
            )
    learner.close()
    reader.close()
    summary = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "backbone": args.backbone,
        "input_size": side,
        "threads": args.threads,
        "stored": learner.trained,
        "trials": args.trials,
        "embed_ms_per_photo": embed_ms,
        "stored_embeddings_s": stored_s,
        "novelty_ms_64": novelty_ms,
        "drift_test_s": drift_s,
        "novelty_auc": auc,
        "novelty_median_learned": float(np.median(nov_known)),
        "novelty_median_unseen": float(np.median(nov_new)),
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
