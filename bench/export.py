"""Export figures for EfficientNet-Lite0: conversion time, size, holdout top-1 float vs .tflite, latency.

A 10-class head is first trained on Fashion-MNIST by the daemon's Learner
(head mode, the bench/learning.py data and seed, embeddings read from its
cache when present), then the classifier is exported in each mode with
daemon/export/converter.py and verified by daemon/export/verification.py on ai-edge-litert
and tflite-runtime 2.14 (its own virtualenv) over the evaluation set (1,000
test images fed as an app would: 224x224 JPEGs decoded, resized and
centre-cropped to the input size, uint8 RGB). Export time is what the daemon
spends: calibration sample decoding, conversion, TFLite Model Metadata
(daemon/export/metadata.py: its bytes and milliseconds are in each row),
verification on both.

Then the head learns ``--more`` further training examples (held back until
now) and each mode is exported again as the daemon does when only the head
changed: the new head written into that mode's conversion above
(daemon/export/head_patch.py), described and verified; and, for comparison,
converted in full. Both are run on every evaluation image: their top-1 and
the share of identical predictions.

Usage: python bench/export.py [--input-size 128] [--calibration 100] [--modes int8,dynamic,fp16,none] [--more 500]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning import jpeg, order, pick  # noqa: E402

from daemon.common.settings import ModelSettings, TrainingSettings  # noqa: E402
from daemon.export import images as stored  # noqa: E402
from daemon.export.bias_correction import KeptErrors, apply, correction_for  # noqa: E402
from daemon.export.conversions import frozen_fingerprint  # noqa: E402
from daemon.export.converter import convert, float_probabilities, snapshot  # noqa: E402
from daemon.export.float_reference import backbone_embeddings  # noqa: E402
from daemon.export.head_patch import head_of, patch_head  # noqa: E402
from daemon.export.head_verification import Embeddings, keep_embeddings, verify_patched  # noqa: E402
from daemon.export.int8_fit import MIN_DISTILLATION_EXAMPLES  # noqa: E402
from daemon.export.int8_head import distillation_sample, distilled  # noqa: E402
from daemon.export.metadata import describe  # noqa: E402
from daemon.export.verification import verify  # noqa: E402
from daemon.ingest.wire import Example  # noqa: E402
from daemon.learning.learner import Learner  # noqa: E402
from daemon.store.examples import Store  # noqa: E402
from daemon.store.reader import StoreReader  # noqa: E402
from daemon.tools.datasets import DIGITS_CLASSES, FASHION_MNIST_CLASSES, digits, fashion_mnist  # noqa: E402
from edge.preprocess import load_rgb  # noqa: E402


def rgb(data: bytes, size: int) -> np.ndarray:
    """What an app hands the exported model (``edge.preprocess.load_rgb``); this benchmark's own JPEGs decode."""
    pixels = load_rgb(data, size)
    if pixels is None:
        raise SystemExit(f"a JPEG of {len(data)} bytes from the benchmark's own data did not decode")
    return pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument(
        "--verify",
        type=int,
        default=400,
        help="holdout images each runtime verifies on (the daemon's "
        "export.verify_examples); accuracy is also reported on all evaluation images",
    )
    ap.add_argument("--modes", default="int8,dynamic,fp16,none")
    ap.add_argument(
        "--more",
        type=int,
        default=500,
        help="training examples learned after the first exports, for the head-only (patched) ones; 0: none",
    )
    ap.add_argument(
        "--dataset",
        choices=["fashion-mnist", "digits"],
        default="fashion-mnist",
        help="digits: scikit-learn's 8x8 handwritten digits (half of each class to train, half to evaluate: at "
        "most 87 per class each)",
    )
    ap.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="int8 as converted, without the daemon's bias correction (export.int8_bias_correction) and distillation",
    )
    ap.add_argument(
        "--distillation-examples",
        type=int,
        default=1000,
        help="stored training examples int8's classifier is distilled on (export.int8_distillation_examples); "
        f"below {MIN_DISTILLATION_EXAMPLES}, only the bias is corrected",
    )
    ap.add_argument("--runtimes", default="ai-edge-litert,tflite-runtime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="tiny: an untrained small net, for smoke runs")
    ap.add_argument(
        "--save-models",
        type=Path,
        help="folder to keep each mode's .tflite and the evaluation images in (bench/latency.py times them)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load, classes = (
        (fashion_mnist, FASHION_MNIST_CLASSES) if args.dataset == "fashion-mnist" else (digits, DIGITS_CLASSES)
    )
    train_images, train_labels = load("train")
    test_images, test_labels = load("t10k")
    train = order([(i, c) for i, c in pick(train_images, train_labels, args.train_per_class, 0)], "iid", 0)
    if not 0 <= args.more < len(train):
        ap.error(
            f"--more {args.more}: must be at least 0 and under the {len(train)} training examples (--train-per-class)"
        )
    test = pick(test_images, test_labels, args.eval_per_class, 0)
    workdir = Path(tempfile.mkdtemp(prefix="sprout-export-"))
    store = Store(workdir / "examples.db")
    store.commit(
        [
            Example(f"train/{i}", classes[c], "train", "image/jpeg", 224, 224, jpeg(train_images[i]), 0.0)
            for i, c in train
        ]
    )
    store.close()
    reader = StoreReader(workdir / "examples.db")
    model_settings = ModelSettings(backbone=args.backbone, input_size=args.input_size)
    learner = Learner(
        model_settings, TrainingSettings(mode="head", device="cpu", cpu_threads=args.threads), workdir, reader
    )
    cache = (
        ROOT
        / "bench"
        / "out"
        / f"embeddings-{'' if args.dataset == 'fashion-mnist' else 'digits-'}{args.backbone}-{args.input_size}-"
        f"{args.train_per_class}-{args.eval_per_class}-0.npz"
    )
    assert learner.cache is not None  # head mode caches embeddings
    if cache.exists():  # computed by bench/learning.py: same images, same frozen backbone
        with np.load(cache) as saved:
            seq_of: dict[str, int] = dict(reader._db.query("SELECT example_id, seq FROM examples"))
            learner.cache.put({seq_of[i]: saved[i.replace("/", "_")] for i in seq_of})
    started = time.perf_counter()
    while learner.trained < len(train) - args.more and (batch := reader.after(learner.high_water_mark, 32)):
        learner.learn_many(batch)
    print(f"head trained on {learner.trained} examples in {time.perf_counter() - started:.0f} s", flush=True)
    if not cache.exists() and not args.more:  # for the next run (bench/learning.py writes the Fashion-MNIST one)
        seq_of = dict(reader._db.query("SELECT example_id, seq FROM examples"))
        vectors = learner.cache.get(list(seq_of.values()))
        if len(vectors) == len(seq_of):
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **{i.replace("/", "_"): vectors[seq] for i, seq in seq_of.items()})  # type: ignore[arg-type]

    images = np.stack([rgb(jpeg(test_images[i]), args.input_size) for i, _ in test])
    labels = np.array([learner.labels.index(classes[c]) for _, c in test])
    model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
    reference = float_probabilities(model, images)
    float_top1 = float((reference.argmax(1) == labels).mean())
    print(f"float PyTorch top-1 on {len(images)} holdout images: {100 * float_top1:.1f}%", flush=True)
    runtimes = args.runtimes.split(",")
    if args.save_models:
        args.save_models.mkdir(parents=True, exist_ok=True)
        np.save(args.save_models / "images.npy", images)

    def sample(mode: str) -> list[np.ndarray]:
        calibration: list[np.ndarray] = []
        if mode == "int8":  # class-balanced, drawn from the stored training examples as the daemon draws them
            per_class = max(1, args.calibration // len(learner.labels))
            for label in sorted(learner.replay.index):
                seqs = list(learner.replay.index[label])
                picked = np.random.default_rng(0).choice(len(seqs), size=min(per_class, len(seqs)), replace=False)
                calibration += [rgb(e.image, args.input_size) for e in reader.by_seq([seqs[i] for i in sorted(picked)])]
        return calibration

    rows = []
    plains, calibrations = {}, {}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        calibration = calibrations[mode] = sample(mode)
        sample_s = time.perf_counter() - t0
        plain = plains[mode] = convert(model, mode, args.input_size, calibration)
        convert_s = time.perf_counter() - t0 - sample_s
        shipped, correction_s = plain, 0.0
        if mode == "int8" and not args.no_bias_correction:  # as the daemon ships int8 (bias_correction.py)
            t0 = time.perf_counter()
            kept = KeptErrors(
                Path(tempfile.mkdtemp(prefix="sprout-error-"))
            )  # none kept: measured, as after a full one
            sha = hashlib.sha256(plain).hexdigest()
            head = head_of(model, calibration)
            # As the daemon fits int8's classifier (int8_fit.py): timed without the patches, which the daemon
            # makes once, for the final head, where this benchmark makes one per variant.
            correction = correction_for(plain, sha, head, calibration, kept, runtimes[0], None, 600)
            correction_s = time.perf_counter() - t0
            corrected_file = apply(plain, correction.head)
            shipped, variants = corrected_file, {"as converted": plain}
            seqs = stored.distillation_sample(reader, learner.high_water_mark, args.distillation_examples)
            if len(seqs) >= MIN_DISTILLATION_EXAMPLES:
                t0 = time.perf_counter()
                embedded = distillation_sample(
                    seqs,
                    lambda wanted: stored.decoded(reader, wanted, args.input_size),
                    lambda pixels: backbone_embeddings(model, pixels),
                    frozen_fingerprint(model, "float", args.input_size),
                    plain,
                    sha,
                    Path(tempfile.mkdtemp(prefix="sprout-distillation-")),
                    runtimes[0],
                    None,
                    600,
                )
                assert embedded is not None, "no training example of the sample decoded"
                fitted = distilled(head, correction.head, embedded)
                distillation_s = time.perf_counter() - t0
                shipped = apply(plain, fitted)
                variants["bias corrected"] = corrected_file
                print(f"int8 classifier distilled on {len(seqs)} examples in {distillation_s:.1f} s", flush=True)
                correction_s += distillation_s
            convert_s += correction_s
        t0 = time.perf_counter()
        tflite = describe(
            shipped,
            name="bench",
            labels=list(learner.labels),
            input_size=args.input_size,
            base=args.backbone,
            quantization=mode,
        )
        metadata_s = time.perf_counter() - t0
        convert_s += metadata_s  # the daemon's convert_s includes it too
        if args.save_models:
            (args.save_models / f"{mode}.tflite").write_bytes(tflite)
        t0 = time.perf_counter()
        n = args.verify
        gated = verify(tflite, images[:n], labels[:n], reference[:n], runtimes)
        verify_s = time.perf_counter() - t0
        full = verify(tflite, images, labels, reference, runtimes)  # all evaluation images: the accuracy figures
        row = {
            "mode": mode,
            "calibration_images": len(calibration),
            "sample_s": sample_s,
            "convert_s": convert_s,
            "verify_s": verify_s,
            "export_s": sample_s + convert_s + verify_s,
            "size_bytes": len(tflite),
            "metadata_bytes": len(tflite) - len(shipped),
            "metadata_ms": round(1000 * metadata_s, 1),
            "float_top1": float_top1,
            "runtimes": {},
            "top1_on_verify_sample": {r.runtime: r.top1 for r in gated},
        }
        if shipped is not plain:
            row["variants"] = {
                name: against_shipped(variant, full, images, labels, reference, runtimes)
                for name, variant in variants.items()
            }
            row["fit_s"] = correction_s  # bias correction and distillation, paid at a full conversion
            row["bias_correction_logits"] = correction.logit_shift
        for r in full:
            row["runtimes"][r.runtime] = {
                "version": r.version,
                "error": r.error,
                "top1": r.top1,
                "agreement": r.agreement,
                "latency_ms": r.latency_ms,
                "nonfinite": r.nonfinite,
            }
        rows.append(row)
        print(
            f"{mode:7s}: export {row['export_s']:5.1f} s (sample {sample_s:.1f}, convert {convert_s:.1f}, verify on "
            f"{n} x {len(runtimes)} runtimes {verify_s:.1f}), {len(tflite) / 1e6:5.2f} MB (metadata "
            f"{len(tflite) - len(shipped):+,} B, {1000 * metadata_s:.0f} ms), float top-1 {100 * float_top1:.1f}%",
            flush=True,
        )
        for r in full:
            if r.error:
                print(f"    {r.runtime} {r.version}: FAILED {r.error}", flush=True)
            else:
                assert r.top1 is not None and r.agreement is not None  # scored on labels against the float model
                print(
                    f"    {r.runtime} {r.version}: top-1 {100 * r.top1:.1f}%, agreement {100 * r.agreement:.1f}%, "
                    f"{r.latency_ms:.2f} ms/image (1 thread)",
                    flush=True,
                )
            for name, by_runtime in row.get("variants", {}).items():
                u = by_runtime.get(r.runtime, {})
                if u.get("top1") is None:
                    continue
                print(
                    f"      {name}: top-1 {100 * u['top1']:.1f}%, agreement {100 * u['agreement']:.1f}%; the file "
                    f"shipped makes {u['made_right']} images right and {u['made_wrong']} wrong against it",
                    flush=True,
                )
    if args.more:
        while batch := reader.after(learner.high_water_mark, 32):
            learner.learn_many(batch)
        print(f"head trained on {args.more} more, {learner.trained} in all", flush=True)
        model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
        reference = float_probabilities(model, images)
        for mode in args.modes.split(","):
            base = plains[mode], calibrations[mode]
            rows.append(head_only(args, mode, base, model, sample, images, labels, reference, runtimes, learner))
    meta = {
        "machine": f"{args.threads} threads, {platform.machine()}, torch {torch.__version__}",
        "input_size": args.input_size,
        "backbone": args.backbone,
        "calibration_images": args.calibration,
        "holdout_images": len(images),
        "verify_images": args.verify,
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def against_shipped(variant, shipped, images, labels, reference, runtimes) -> dict:
    """An int8 file the daemon did not ship (as converted, or with the bias correction alone), run on every
    evaluation image: its top-1 per runtime, and the images the shipped file (``shipped``: its reports) made
    right and made wrong against it."""
    out: dict = {}
    for before, after in zip(verify(variant, images, labels, reference, runtimes), shipped, strict=True):
        if before.probabilities is None or after.probabilities is None:
            out[before.runtime] = {"error": before.error or after.error}
            continue
        right_before = before.probabilities.argmax(1) == labels
        right_after = after.probabilities.argmax(1) == labels
        out[before.runtime] = {
            "top1": before.top1,
            "agreement": before.agreement,
            "made_right": int((right_after & ~right_before).sum()),
            "made_wrong": int((right_before & ~right_after).sum()),
        }
    return out


def head_only(args, mode, base, model, sample, images, labels, reference, runtimes, learner) -> dict:
    """One mode's export after the head alone changed, as the daemon makes it: the head written into ``base``
    (daemon/export/head_patch.py) and verified on the embeddings each runtime computed
    (daemon/export/head_verification.py), the first time (none kept yet) and the next; beside it, the same
    network converted in full. Both files are then run on every evaluation image."""
    described = {
        "name": "bench",
        "labels": list(learner.labels),
        "input_size": args.input_size,
        "base": args.backbone,
        "quantization": mode,
    }
    # Timed as the daemon samples anew; both files use the base's calibration images, so that they differ
    # by the patch alone (with today's sample the full conversion's backbone ranges would move too).
    base, calibration = base
    t0 = time.perf_counter()
    sample(mode)
    sample_s = time.perf_counter() - t0
    patched = describe(patch_head(base, head_of(model, calibration), mode), **described)
    patch_s = time.perf_counter() - t0 - sample_s
    n, seqs = args.verify, list(range(args.verify))
    embeddings = Embeddings(Path(tempfile.mkdtemp(prefix="sprout-embeddings-")), mode)
    verify_s = []
    for _ in ("first", "next"):
        t0 = time.perf_counter()
        verified = verify_patched(
            patched, "bench", embeddings, seqs, images[:n], labels[:n], reference[:n], runtimes, None, 600
        )
        verify_s.append(time.perf_counter() - t0)
        if verified is None:
            raise SystemExit(f"{mode}: the patched file could not be verified on kept embeddings")
        keep_embeddings(embeddings, "bench", verified[0], seqs)
    t0 = time.perf_counter()
    full = describe(convert(model, mode, args.input_size, calibration), **described)
    full_convert_s = time.perf_counter() - t0 + sample_s
    t0 = time.perf_counter()
    verify(full, images[:n], labels[:n], reference[:n], runtimes)
    full_verify_s = time.perf_counter() - t0
    ran = {
        "patched": verify(patched, images, labels, reference, runtimes),
        "full": verify(full, images, labels, reference, runtimes),
    }
    row: dict = {
        "mode": f"{mode} head only",
        "sample_s": sample_s,
        "patch_s": patch_s,
        "verify_first_s": verify_s[0],
        "verify_next_s": verify_s[1],
        "export_s": sample_s + patch_s + verify_s[1],
        "full_export_s": full_convert_s + full_verify_s,
        "size_bytes": len(patched),
        "runtimes": {},
    }
    print(
        f"{mode:7s} head only: export {row['export_s']:4.1f} s (sample {sample_s:.1f}, patch {patch_s:.2f}, verify on "
        f"kept embeddings {verify_s[1]:.1f}; {verify_s[0]:.1f} with none kept, as after a full conversion); the same network converted in full "
        f"{row['full_export_s']:.1f} s (convert {full_convert_s:.1f}, verify {full_verify_s:.1f})",
        flush=True,
    )
    for p, f in zip(ran["patched"], ran["full"], strict=True):
        if p.error or f.error:
            print(f"    {p.runtime}: patched {p.error or 'ran'}, full {f.error or 'ran'}", flush=True)
            continue
        assert p.predicted is not None and f.predicted is not None and p.top1 is not None and f.top1 is not None
        assert p.probabilities is not None and f.probabilities is not None
        same = float(np.mean(np.array(p.predicted) == np.array(f.predicted)))
        gap = float(np.abs(p.probabilities - f.probabilities).max())
        row["runtimes"][p.runtime] = {
            "top1_patched": p.top1,
            "top1_full": f.top1,
            "same_top1": same,
            "max_probability_difference": gap,
        }
        print(
            f"    {p.runtime} {p.version}: top-1 patched {100 * p.top1:.1f}%, full {100 * f.top1:.1f}%, "
            f"same prediction on {100 * same:.1f}% of {len(images)}, probabilities within {gap:.1e}",
            flush=True,
        )
    return row


if __name__ == "__main__":
    main()
