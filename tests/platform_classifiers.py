"""Classify images with a platform's own image classifier, as an app does: the consumers of the model metadata.

    <venv>-tasks/bin/python tests/platform_classifiers.py --consumer mediapipe MODEL.tflite IMAGE...

Runs in the virtualenv scripts/test-tools.sh makes for them (``.venv-tasks``: MediaPipe 1.2.2 and
tflite-support 0.4.4's Task Library, which need neither torch nor Sprout). Each classifier gets the file
and nothing else: category names can only come from the model's own metadata (labels.txt attached to the
output tensor). Prints one JSON document: the consumer, its version, and per image every category, best
first, as ``{"index", "name", "score"}``. Exits 1 with the reason on stderr when the model does not load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys


def mediapipe(model: str, images: list[str]) -> list[list[dict]]:
    import mediapipe as mp
    from mediapipe.tasks import python as tasks
    from mediapipe.tasks.python import vision

    options = vision.ImageClassifierOptions(base_options=tasks.BaseOptions(model_asset_path=model), max_results=-1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        results = [classifier.classify(mp.Image.create_from_file(path)) for path in images]
    return [
        [{"index": c.index, "name": c.category_name, "score": c.score} for c in r.classifications[0].categories]
        for r in results
    ]


def task_library(model: str, images: list[str]) -> list[list[dict]]:
    from tflite_support.task import core, processor, vision

    options = vision.ImageClassifierOptions(
        base_options=core.BaseOptions(file_name=model),
        classification_options=processor.ClassificationOptions(max_results=-1),
    )
    classifier = vision.ImageClassifier.create_from_options(options)
    results = [classifier.classify(vision.TensorImage.create_from_file(path)) for path in images]
    return [
        [{"index": c.index, "name": c.category_name, "score": c.score} for c in r.classifications[0].categories]
        for r in results
    ]


CONSUMERS = {"mediapipe": (mediapipe, "mediapipe"), "task-library": (task_library, "tflite-support")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--consumer", choices=sorted(CONSUMERS), required=True)
    ap.add_argument("model")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    run, distribution = CONSUMERS[args.consumer]
    try:
        results = run(args.model, args.images)
    except Exception as e:
        print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "consumer": args.consumer,
                "version": importlib.metadata.version(distribution),
                "results": [
                    {"image": path, "categories": categories}
                    for path, categories in zip(args.images, results, strict=True)
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
