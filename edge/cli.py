"""The ``sprout-edge`` command: keep a device's model current, classify images with it, and send back (opt-in)
the photos it was unsure of and those its user corrected, for labelling. Never imports torch.

    sprout-edge sync --url http://10.0.0.5:8080 --model maize --dir /var/lib/sprout-edge/maize \\
        --public-key signing.pub [--watch [--interval 60] [--mqtt mqtt://10.0.0.5:1883]] [--report] [--send-photos]
    sprout-edge classify --dir /var/lib/sprout-edge/maize leaf.jpg [--top 3] [--json] [--report] \\
        [--send-unsure [BELOW]] [--send-samples [EVERY]]
    sprout-edge correct --dir /var/lib/sprout-edge/maize leaf.jpg --label rust

Exit codes: 0 ok, 1 failed (the reason is on stderr), 2 usage, 66 no model installed yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge import __version__
from edge.runtime import RUNTIMES

if TYPE_CHECKING:
    from edge.field_photos import Outbox
    from edge.model import EdgeModel
    from edge.sync import SyncResult
    from edge.telemetry import Counts

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's own
EXIT_NO_MODEL = 66  # EX_NOINPUT: nothing installed yet, so a script can tell "not yet" from "broken"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sprout-edge", description="Sprout on a phone or edge device (no torch needed).")
    p.add_argument("--version", action="version", version=f"sprout-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{sync,classify,correct}")
    _add_sync(sub)
    _add_classify(sub)
    _add_correct(sub)
    return p


def _add_sync(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sync",
        help="install the latest verified model (once, or keep doing so with --watch)",
        description="Fetch the latest manifest, download, verify and atomically install the model.",
    )
    s.add_argument("--url", required=True, help="the model server, e.g. http://10.0.0.5:8080 (paths start at /v1)")
    s.add_argument("--model", required=True, help="model name, as in the server's URLs and topics")
    s.add_argument("--dir", required=True, type=Path, help="folder this device keeps the model in")
    s.add_argument(
        "--public-key",
        type=Path,
        help="the publisher's signing.pub: every manifest's signature is checked against it (required, "
        "unless --insecure)",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="install without checking signatures: whoever answers at --url decides what runs here (for "
        "a test bench, never a fleet); said again at every sync",
    )
    s.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    s.add_argument("--watch", action="store_true", help="keep running: poll, follow MQTT notices, stop on SIGTERM")
    s.add_argument(
        "--interval",
        type=_positive_seconds,
        default=None,
        help="with --watch: seconds between polls when all is well (default 60; errors back off up to 300)",
    )
    s.add_argument(
        "--mqtt",
        metavar="URL",
        help="with --watch: broker (mqtt://host:port or mqtts://) whose retained notice triggers a sync at once",
    )
    s.add_argument("--topic-prefix", default="sprout", help="with --mqtt: topic prefix of the notices (default sprout)")
    s.add_argument(
        "--runtime",
        choices=["auto", *RUNTIMES, "none"],
        default="auto",
        help="interpreter a new model must run on before it is installed (default: the first installed)",
    )
    s.add_argument(
        "--report",
        action="store_true",
        help="after each sync, send the counts `classify --report` kept (opt-in: docs/devices.md, Reporting)",
    )
    s.add_argument(
        "--send-photos",
        action="store_true",
        help="after each sync, send the photos `classify --send-unsure`, `--send-samples` and `correct` queued in "
        "DIR/outbox, for labelling (opt-in: docs/devices.md, Photos for labelling)",
    )
    s.add_argument("--quiet", action="store_true", help="log only warnings and errors")


def _add_classify(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "classify",
        help="top-k labels with scores for images, with the installed model",
        description="Classify images with the installed model.",
    )
    c.add_argument("--dir", required=True, type=Path, help="folder the model was synced into")
    c.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG, PNG, WebP or HEIC files")
    c.add_argument("--top", type=_positive_int, default=5, metavar="K", help="labels per image (default 5)")
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default=None,
        help="interpreter to run on (default: ai-edge-litert if installed, else tflite-runtime)",
    )
    c.add_argument("--threads", type=_positive_int, default=2, help="interpreter threads (default 2)")
    c.add_argument(
        "--report",
        action="store_true",
        help="count this load and these predictions (scores, time) for `sync --report` to send; no image is kept",
    )
    c.add_argument(
        "--send-unsure",
        nargs="?",
        const=0.5,
        type=_score,
        metavar="BELOW",
        help="queue each image whose top-1 score is below BELOW (default 0.5) in DIR/outbox for labelling, with "
        "the model's guesses; `sync --send-photos` sends them. Put it after the images, or give BELOW",
    )
    c.add_argument(
        "--send-samples",
        nargs="?",
        const=50,
        type=_one_in,
        metavar="EVERY",
        help="queue one image in EVERY (default 50), drawn at random whatever its score: what the field looks like, "
        "for the server's drift test. Put it after the images, or give EVERY",
    )


def _add_correct(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "correct",
        help="the model was wrong about an image: queue it with the right label for labelling",
        description="Classify IMAGE with the installed model, and queue it in DIR/outbox with the model's guesses "
        "and the user's label, for `sync --send-photos` to send; counts the correction for `sync --report`.",
    )
    c.add_argument("--dir", required=True, type=Path, help="folder the model was synced into")
    c.add_argument("image", type=Path, metavar="IMAGE", help="the photo the model got wrong")
    c.add_argument("--label", required=True, type=_label, help="the right label, as the user gives it")
    c.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default=None,
        help="interpreter to run on (default: ai-edge-litert if installed, else tflite-runtime)",
    )
    c.add_argument("--threads", type=_positive_int, default=2, help="interpreter threads (default 2)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sync":
        return run_sync(parser, args)
    if args.command == "correct":
        return run_correct(args)
    return run_classify(args)


def run_sync(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from edge.fetch import ModelServer
    from edge.sync import sync
    from edge.trust import SignatureError, load_public_key
    from edge.watch import watch

    if not args.watch and (args.mqtt or args.interval is not None):
        parser.error("--mqtt and --interval apply to --watch")
    try:
        ModelServer(args.url, args.model)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    if args.public_key is None and not args.insecure:
        return _fail(
            "no --public-key: give the publisher's signing.pub (the daemon's STATE/signing/signing.pub) so "
            "that only its models are installed, or --insecure to install unchecked models on a test bench",
            EXIT_USAGE,
        )
    if args.public_key is not None and args.insecure:
        parser.error("--insecure and --public-key contradict each other: drop --insecure")
    try:
        key = load_public_key(args.public_key) if args.public_key else None
    except SignatureError as err:
        return _fail(f"--public-key {args.public_key}: {err}")
    token = _token(args.token_file) if args.token_file else None
    if isinstance(token, int):
        return token
    runtime = None if args.runtime == "none" else args.runtime
    common = dict(url=args.url, model=args.model, dir=args.dir, public_key=key, token=token, runtime=runtime)

    if args.watch:
        try:
            watch(
                **common,
                mqtt_url=args.mqtt,
                topic_prefix=args.topic_prefix,
                interval_s=args.interval if args.interval is not None else 60.0,
                report=args.report,
                send_photos=args.send_photos,
            )
        except ValueError as err:  # a malformed --mqtt URL
            parser.error(str(err))
        return EXIT_OK
    said = _said(sync(**common), args.model)
    if args.report:
        from edge.telemetry import send_report

        send_report(args.url, args.model, args.dir, token)
    if args.send_photos:
        from edge.field_photos import send_photos

        send_photos(args.url, args.model, args.dir, token)
    return said


def _said(result: SyncResult, model: str) -> int:
    """One line on stdout for a sync that worked; its exit code."""
    if not result.ok:
        return EXIT_FAILURE  # the reason was logged to stderr by the sync
    if result.status == "installed":
        was = f" (was {result.previous})" if result.previous is not None else ""
        how = f" ({result.kind})" if result.kind else ""  # full, or delta: a patch to the version it held
        print(f"{model}: version {result.current} installed{was}, {result.downloaded} bytes downloaded{how}")
    else:
        print(f"{model}: version {result.current} is current")
    return EXIT_OK


def _token(path: Path) -> str | int:
    """The bearer token in ``path``, or the exit code after saying what is wrong with the file."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        return _fail(f"--token-file {path}: {err.strerror}")
    return token or _fail(f"--token-file {path} is empty: put the server's bearer token in it")


def run_classify(args: argparse.Namespace) -> int:
    from edge.field_photos import MAX_GUESSES, Outbox
    from edge.model import ImageError
    from edge.telemetry import Counts, FieldLog

    counting = FieldLog(args.dir).counting() if args.report else contextlib.nullcontext(Counts())
    outbox = Outbox(args.dir) if args.send_unsure is not None or args.send_samples is not None else None
    with counting as counts:
        model = _load(args, counts)
        if isinstance(model, int):
            return model
        results: list[dict[str, Any]] = []
        failed = False
        for image in args.images:
            started = time.perf_counter()
            try:
                # The outbox keeps the model's best 5 guesses for the labeller, whatever --top shows.
                top = model.predict(image, max(args.top, MAX_GUESSES) if outbox else args.top)
            except ImageError as err:
                print(f"sprout-edge: {err}", file=sys.stderr)
                results.append({"image": str(image), "error": str(err)})
                failed = True
                continue
            counts.predicted(model.version, top[0][1], (time.perf_counter() - started) * 1000)
            shown = [{"label": label, "score": score} for label, score in top[: args.top]]
            results.append({"image": str(image), "top": shown})
            if outbox is not None:
                results[-1]["queued_for_labelling"] = _queue(outbox, image, model.version, top, args)
    if args.json:
        document = {
            "model": model.manifest["model"],
            "version": model.version,
            "runtime": {"name": model.runtime, "version": model.session.version},
            "results": results,
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        width = max(len(label) for label in model.labels)
        for result in results:
            if "top" in result:
                print(result["image"])
                for entry in result["top"]:
                    print(f"  {entry['label']:<{width}}  {entry['score']:.4f}")
                if result.get("queued_for_labelling"):
                    print("  queued for labelling: sent at the next `sprout-edge sync --send-photos`")
    return EXIT_FAILURE if failed else EXIT_OK


def _load(args: argparse.Namespace, counts: Counts) -> EdgeModel | int:
    """The installed model, its load counted; or the exit code after saying why it does not load."""
    from edge.model import EdgeModel, ModelError
    from edge.modeldir import ModelDir, NoModelInstalled
    from edge.runtime import RuntimeUnavailable

    try:
        model = EdgeModel.load(args.dir, runtime=args.runtime, threads=args.threads)
    except NoModelInstalled as err:
        print(f"sprout-edge: {err}", file=sys.stderr)
        return EXIT_NO_MODEL
    except (ModelError, RuntimeUnavailable) as err:
        if isinstance(err, ModelError) and (version := ModelDir(args.dir).current()) is not None:
            counts.loaded(version, ok=False)
        return _fail(str(err))
    counts.loaded(model.version)
    return model


def _queue(outbox: Outbox, image: Path, version: int, top: list[tuple[str, float]], args: argparse.Namespace) -> bool:
    """Queue a classified image for labelling if it is drawn as a sample or the model was unsure of it."""
    # The sample is drawn first, whatever the score: samples show the field as it is (the server's drift test),
    # and leaving the unsure ones out of them would skew that.
    if args.send_samples is not None and random.randrange(args.send_samples) == 0:
        kind = "sample"
    elif args.send_unsure is not None and top[0][1] < args.send_unsure:
        kind = "unsure"
    else:
        return False
    try:
        queued = outbox.add(image, kind, version, top)
    except (ValueError, OSError) as err:  # the classification stands; only the photo is not kept (PhotoError, NaN)
        print(f"sprout-edge: {image} not queued for labelling: {err}", file=sys.stderr)
        return False
    if not queued:
        print(
            f"sprout-edge: {image} not queued for labelling: {outbox.per_day} photos were queued today, as many as "
            "the server takes from a device a day",
            file=sys.stderr,
        )
    return queued


def run_correct(args: argparse.Namespace) -> int:
    from edge.field_photos import MAX_GUESSES, Outbox
    from edge.model import ImageError
    from edge.telemetry import FieldLog

    # Counted whether or not the photo is queued: the user said the model was wrong (`sync --report` sends it).
    with FieldLog(args.dir).counting() as counts:
        model = _load(args, counts)
        if isinstance(model, int):
            return model
        started = time.perf_counter()
        try:
            top = model.predict(args.image, MAX_GUESSES)
        except ImageError as err:
            return _fail(str(err))
        counts.predicted(model.version, top[0][1], (time.perf_counter() - started) * 1000)
        counts.corrected(model.version)
    outbox = Outbox(args.dir)
    try:
        queued = outbox.add(args.image, "correction", model.version, top, label=args.label)
    except (ValueError, OSError) as err:  # PhotoError, or scores that are not numbers
        return _fail(f"{args.image} not queued for labelling: {err}")
    if not queued:
        return _fail(
            f"{args.image} not queued for labelling: {outbox.per_day} photos were queued today, as many as the "
            "server takes from a device a day; the correction is counted"
        )
    said, score = top[0]
    print(
        f"{args.image}: queued as {args.label!r} (the model said {said!r}, {score:.2f}); sent at the next "
        "`sprout-edge sync --send-photos`"
    )
    return EXIT_OK


def _fail(reason: str, code: int = EXIT_FAILURE) -> int:
    print(f"sprout-edge: {reason}", file=sys.stderr)
    return code


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a top-1 score: give one between 0 and 1 (--send-unsure 0.5), or put the flag after "
            "the images"
        ) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a top-1 score: give one above 0, at most 1")
    return value


def _one_in(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of images: give one of at least 1 (--send-samples 50), or put the flag after "
            "the images"
        )
    return int(text)


def _label(text: str) -> str:
    from edge.field_photos import user_label

    try:
        return user_label(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
