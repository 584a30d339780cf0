"""The ``sprout`` command: a thin shell over the daemon's parts. Exit codes follow sysexits.h."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon.common import logs
from daemon.common.exits import Exit
from daemon.common.settings import ConfigError, Settings

if TYPE_CHECKING:  # imported where used: `sprout --help` should not wait for torch
    from daemon.store.labels import LabelChange
    from daemon.store.reader import LabelCount, StoreReader


log = logging.getLogger("sprout")

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

RUN_DESCRIPTION = """\
Run the daemon in the foreground: subscribe to <prefix>/<model>/examples, store every valid example
before acknowledging it, fine-tune the model on them, export and publish signed .tflite versions, and
serve them over HTTP (status page, /healthz, /metrics, /v1/models/...). It runs until stopped."""

RUN_EPILOG = """\
settings, later wins:
  built-in defaults < --config FILE (TOML) < SPROUT_* variables (SPROUT_EXPORT__EVERY_SECONDS=300)
  < these flags. `sprout check-config FILE` prints the result.

signals:
  SIGTERM, SIGINT  stop: intake first (un-acked messages stay on the broker), then a last checkpoint;
                   a second SIGINT cuts the waiting short
  SIGHUP           reload the config file (the settings docs/deploy.md lists change without a restart)

exit status:
  0   stopped by a signal; every acknowledged example is stored
  69  cannot start: the HTTP address is taken
  70  a part failed (feed, intake, learner, exporter, notice, HTTP server): the log says which and
      why; the systemd unit restarts the daemon
  78  bad configuration (the field is named), an unusable state folder, or one that belongs to
      another model"""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "broker", None):
        out.setdefault("mqtt", {})["broker"] = args.broker
    if getattr(args, "model", None):
        out.setdefault("model", {})["name"] = args.model
    if getattr(args, "state", None):
        out["state_dir"] = args.state
    if getattr(args, "http", None):
        out.setdefault("server", {})["http"] = args.http
    if getattr(args, "log_level", None):
        out.setdefault("logging", {})["level"] = args.log_level
    return out


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, from defaults, the --config file, SPROUT_* variables and the flags (later wins); a
    state folder that belongs to another model is refused, naming both (daemon/common/state_owner.py)."""
    from daemon.common import state_owner

    settings = Settings.load(getattr(args, "config", None), _overrides(args))
    state_owner.check(settings.state_dir, settings.model.name)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service.daemon import Daemon
    from daemon.store.errors import StateDirError, StoreError

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    daemon = Daemon(settings)
    try:
        return daemon.run()
    except StateDirError as err:  # no state folder it can use, or a store from a newer Sprout
        log.error("%s", err)
        return Exit.CONFIG
    except StoreError as err:
        log.error("%s", err)
        return Exit.SOFTWARE
    except OSError as err:  # e.g. the HTTP port is taken
        log.error("cannot start: %s", err)
        return Exit.UNAVAILABLE


def cmd_check_config(args: argparse.Namespace) -> int:
    from daemon.service import preflight

    settings = Settings.load(args.file)
    preflight.check(settings)  # what `sprout run` checks before it starts
    print(json.dumps(settings.masked(), indent=2, default=str))
    return 0


def cmd_store_stats(args: argparse.Namespace) -> int:
    from daemon.store.errors import StoreError
    from daemon.store.reader import open_reader, stats

    settings = _settings(args)
    try:
        db = open_reader(settings.state_dir / "examples.db")
        print(json.dumps(stats(db), indent=2, ensure_ascii=False))
    except StoreError as err:
        print(f"sprout store stats: {err}", file=sys.stderr)
        return Exit.NOINPUT
    return 0


def cmd_store_import(args: argparse.Namespace) -> int:
    from daemon.ingest.folders import DatasetError
    from daemon.ingest.importer import ImportStopped, run_import
    from daemon.store.errors import StoreError

    settings = _settings(args)
    try:
        report = run_import(args.dir, settings, sys.stderr)
    except DatasetError as err:
        print(f"sprout store import: {err}", file=sys.stderr)
        return Exit.NOINPUT
    except StoreError as err:
        print(f"sprout store import: {err}", file=sys.stderr)
        return Exit.CANTCREAT
    except ImportStopped as err:
        print(json.dumps(err.report.as_dict()))
        print(f"sprout store import: stopped: {err}", file=sys.stderr)
        return Exit.CANTCREAT
    print(json.dumps(report.as_dict()))
    return Exit.DATAERR if report.skipped else 0


def cmd_labels(args: argparse.Namespace) -> int:
    from daemon.store.errors import StoreError
    from daemon.store.examples import Store
    from daemon.store.labels import Action, LabelError, LabelMap
    from daemon.store.reader import StoreReader

    settings = _settings(args)
    what = f"sprout labels {args.labels_command}"
    path = settings.state_dir / "examples.db"
    try:
        reader = StoreReader(path)  # refuses a missing store: a typo in --state must not create one
        try:
            reader.labels = LabelMap.replay(reader.label_changes())
            outputs = _learner_outputs(settings, reader)
            if args.labels_command == "list":
                return _labels_list(reader, outputs, args.json)
            counts = reader.label_counts().get(args.label)
        finally:
            reader.close()
        store = Store(path)
        try:
            change = store.change_label(
                Action(args.labels_command),
                args.label,
                getattr(args, "into", None),
                settings.store.max_label_chars,
                outputs or (),
            )
        finally:
            store.close()
    except StoreError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.NOINPUT
    except LabelError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.DATAERR
    _record_label_change(settings, change)
    print(_label_change_done(change, counts, outputs))
    return 0


def _learner_outputs(settings: Settings, reader: StoreReader) -> list[str] | None:
    """The learner's outputs as its next step has them (its checkpoint, then the later label changes);
    None before its first checkpoint."""
    from daemon.learning import checkpoint
    from daemon.store.labels import outputs_after

    try:
        saved = checkpoint.load(settings.state_dir / "checkpoints")
    except checkpoint.CheckpointError as err:
        log.warning("%s: the learner's outputs are unknown", err)
        return None
    if saved is None:
        return None
    outputs = list(saved.labels)
    for change in reader.label_changes(saved.label_change):
        outputs, _ = outputs_after(outputs, change)
    return outputs


def _labels_list(reader: StoreReader, outputs: list[str] | None, as_json: bool) -> int:
    index = {label: i for i, label in enumerate(outputs or [])}
    counts = reader.label_counts()
    labels = sorted(counts.keys() | index.keys(), key=lambda label: (index.get(label, len(index)), label))
    aliases: dict[str, list[str]] = {}
    for old, now in reader.labels.aliases.items():
        aliases.setdefault(now, []).append(old)
    rows = [
        {
            "label": label,
            "train": counts[label].train if label in counts else 0,
            "holdout": counts[label].holdout if label in counts else 0,
            "output": index.get(label),
            "retired": label in reader.labels.retired,
            "also_sent_as": sorted(aliases.get(label, [])),
        }
        for label in labels
    ]
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    width = max([len(r["label"]) for r in rows] + [5])
    print(f"{'LABEL':<{width}}  {'TRAIN':>7}  {'HOLDOUT':>7}  {'OUTPUT':>6}  STATUS")
    for r in rows:
        status = "retired: stored, not learned" if r["retired"] else ""
        if r["also_sent_as"]:
            status += ("; " if status else "") + "also sent as " + ", ".join(map(repr, r["also_sent_as"]))
        output = "-" if r["output"] is None else r["output"]
        print(f"{r['label']:<{width}}  {r['train']:>7}  {r['holdout']:>7}  {output:>6}  {status}")
    if outputs is None:
        print("(no checkpoint yet: the learner's outputs are not known)")
    return 0


def _record_label_change(settings: Settings, change: LabelChange) -> None:
    """Into the registry's history now, when there is a registry; the next export records it otherwise."""
    from daemon.registry.versions import Registry, RegistryError, registry_root

    if not (registry_root(settings.state_dir) / settings.model.name).is_dir():
        return
    try:
        # No signer: a log line is not signed, and no key is read or made for it.
        Registry(registry_root(settings.state_dir), settings.model.name).record_label_changes([change])
    except (RegistryError, OSError) as err:
        log.warning("the registry's history gets the change at the next export: %s", err)


def _label_change_done(change: LabelChange, counts: LabelCount | None, outputs: list[str] | None) -> str:
    from daemon.registry.versions import utc_time
    from daemon.store.labels import Action

    examples = f"{counts.train} train and {counts.holdout} holdout examples" if counts else "no stored examples"
    if change.action is Action.DELETE:
        effect = (
            f"{examples} stay stored, neither learned nor scored, nor is any that arrives labelled {change.label!r}"
        )
    else:
        effect = f"{examples} now count as {change.into!r}, and so does any that arrives labelled {change.label!r}"
    if outputs is None or change.label not in outputs:
        output = "the learner has no output for it"
    elif change.action is not Action.DELETE and change.into not in outputs:
        output = f"the learner's output {outputs.index(change.label)} keeps its weights under the new name"
    else:
        output = f"the learner's output {outputs.index(change.label)} is removed"
    return (
        f"{change} (change {change.id}, {utc_time(change.at)}): {effect}; {output}.\n"
        "A running daemon applies it before its next step, a stopped one when it next starts; the next "
        "exported version's labels.txt follows it."
    )


def cmd_feed(args: argparse.Namespace) -> int:
    from daemon.tools.feeder import run_feed

    return run_feed(args)


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.export.pipeline import NothingToExport, export_once

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    try:
        outcome = export_once(settings)
    except NothingToExport as err:
        print(f"sprout export: nothing to export: {err}", file=sys.stderr)
        return Exit.NOINPUT
    print(json.dumps(outcome.summary(), indent=2))
    return 0 if outcome.published else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.tools.demo import run_demo

    try:
        return run_demo(args)
    except OSError as err:  # e.g. the HTTP port is taken by another Sprout
        log.error("cannot start: %s (server.http / SPROUT_SERVER__HTTP picks another address)", err)
        return Exit.UNAVAILABLE


def _version(text: str) -> int | str:
    if text == "latest":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a version is a positive integer (or 'latest' for show)")
    return int(text)


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.registry.signing import SigningKeyError
    from daemon.registry.versions import NoRegistryError, Registry, RegistryError, UnknownVersionError, registry_root

    settings = _settings(args)
    what = f"sprout models {args.models_command}"
    try:
        # Opened read-only first: a typo in --state must not create an empty registry (or a key).
        reader = Registry.open_readonly(registry_root(settings.state_dir), settings.model.name)
        if args.models_command == "list":
            return _models_list(reader, args.json)
        if args.models_command == "show":
            manifest = reader.latest() if args.version == "latest" else reader.manifest(args.version)
            if manifest is None:
                raise UnknownVersionError(f"model {reader.model!r} has no latest version yet")
            print(json.dumps(manifest, indent=2, ensure_ascii=False))
            return 0
        if args.version == "latest":
            print(f"{what}: give a version number", file=sys.stderr)
            return Exit.USAGE
        registry = Registry.from_settings(settings, create_key=False)
        if args.models_command == "rollback":
            before = reader.latest()
            registry.rollback(args.version)
            was = f" (was {before['version']})" if before else ""
            print(f"{registry.model}: latest is now version {args.version}{was}")
        elif args.models_command == "pin":
            changed = registry.pin(args.version)
            print(f"{registry.model}: version {args.version} {'pinned' if changed else 'was already pinned'}")
        else:
            changed = registry.unpin(args.version)
            print(f"{registry.model}: version {args.version} {'unpinned' if changed else 'was not pinned'}")
        return 0
    except NoRegistryError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.NOINPUT
    except SigningKeyError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.CONFIG
    except RegistryError as err:  # unknown version, damaged version
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.DATAERR


def _models_list(reader: Any, as_json: bool) -> int:
    latest = reader.latest()
    current = latest.get("version") if latest else None
    rows = [{**row, "latest": row["version"] == current} for row in reader.index()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'VERSION':>7}  {'CREATED_AT':<24}  {'QUANTIZATION':<12}  {'PINNED':<6}  LATEST")
    for r in rows:
        print(
            f"{r['version']:>7}  {r['created_at'] or '?':<24}  {r['quantization'] or '?':<12}  "
            f"{'yes' if r['pinned'] else '':<6}  {'*' if r['latest'] else ''}"
        )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import base64

    from daemon.registry.signing import Signer, SigningKeyError, generate, raw_public_key

    try:
        private, public = generate(args.out)
    except SigningKeyError as err:
        print(f"sprout keygen: {err}", file=sys.stderr)
        return Exit.CANTCREAT
    except OSError as err:
        print(f"sprout keygen: cannot write to {args.out}: {err.strerror}", file=sys.stderr)
        return Exit.CANTCREAT
    print(f"private key: {private}  (mode 0600; set signing.key_file to it)")
    print(f"public key:  {public}  (give it to your devices)")
    signer = Signer.load(private)
    print(f"key id:      {signer.key_id}")
    # Apps ship the raw 32 bytes (CryptoKit, Tink take them as they are): docs/devices.md, step 2.
    print(f"raw public key (base64, for apps): {base64.b64encode(raw_public_key(signer.public_key)).decode()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sprout", description="Sprout: learn from an MQTT feed, ship TensorFlow Lite models."
    )
    p.add_argument("--version", action="version", version=f"sprout {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_flags(sp: argparse.ArgumentParser, long_running: bool = False) -> None:
        # Every command that reads a model's state takes the same three, and reads the same settings as `run`.
        sp.add_argument(
            "--config", type=Path, help="TOML config file (see sprout.example.toml); default: built-in defaults"
        )
        sp.add_argument("--state", type=Path, help="state directory (overrides state_dir; default ./var)")
        sp.add_argument(
            "--model",
            help="model name (overrides model.name; default plant-disease); a state folder "
            "that holds another model is refused",
        )
        if long_running:
            sp.add_argument("--log-level", choices=LOG_LEVELS, help="overrides logging.level (default INFO)")

    run = sub.add_parser(
        "run",
        help="run the daemon in the foreground (what the systemd unit starts)",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_flags(run, long_running=True)
    run.add_argument("--broker", help="broker URL, mqtt://host:port (overrides mqtt.broker)")
    run.add_argument("--http", help="HOST:PORT for the HTTP API (overrides server.http)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print it resolved, secrets masked")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_check_config)

    store = sub.add_parser("store", help="the example store")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    st = store_sub.add_parser("stats", help="JSON: examples total, per label, per split, rejected by reason")
    config_flags(st)
    st.set_defaults(func=cmd_store_stats)
    imp = store_sub.add_parser(
        "import",
        help="store a folder of labelled images (one sub-folder per label), no broker needed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Store the images under DIR/<label>/, or under DIR/train/<label>/ and DIR/holdout/<label>/\n"
        "(val/ and test/ count as holdout), checked as MQTT examples are. Without split folders,\n"
        "store.holdout_fraction decides, as for MQTT. An image's id is its content: importing again, or\n"
        "the same photo under two names, stores it once, also against `sprout feed --dir`. Safe while\n"
        "`sprout run` uses the same state: its learner picks the new examples up.",
        epilog="prints one JSON line: stored, duplicates, skipped (each listed on stderr), skipped_by_reason,\n"
        "ignored (files not named like images; hidden ones are passed over), pruned (by store.max_mb), seconds\n\n"
        "exit status:\n"
        "  0   every image stored or already there\n"
        "  65  some files skipped (listed on stderr); the rest are stored, so fix those and import again\n"
        "  66  DIR missing, or no label folders with images in it\n"
        "  73  the store took no more (disk full, store.min_free_mb); what was stored stays\n"
        "  78  bad configuration, or a state folder of another model (--model)",
    )
    config_flags(imp)
    imp.add_argument("dir", type=Path, metavar="DIR", help="folder with one sub-folder of images per label")
    imp.set_defaults(func=cmd_store_import)

    labels = sub.add_parser("labels", help="the classes: list, rename, merge or delete one, daemon running or not")
    labels_sub = labels.add_subparsers(dest="labels_command", required=True, metavar="SUBCOMMAND")
    lls = labels_sub.add_parser("list", help="each label: stored examples, the learner's output, retired or not")
    config_flags(lls)
    lls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, text, first, second in [
        ("rename", "give label OLD the name NEW; its output keeps its weights", "OLD", "NEW"),
        (
            "merge",
            "fold label FROM into INTO: its examples, and any sent later, become INTO's; its output goes",
            "FROM",
            "INTO",
        ),
        (
            "delete",
            "retire LABEL: its examples, and any sent later, stay stored but are not learned; its output goes",
            "LABEL",
            None,
        ),
    ]:
        sp = labels_sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. A running daemon "
            "applies it before its next step, a stopped one when it next starts; the registry's "
            "log records it, and the next exported version's labels.txt follows it.",
        )
        sp.add_argument("label", metavar=first, help="a label as `sprout labels list` shows it")
        if second:
            sp.add_argument("into", metavar=second, help="the new name" if name == "rename" else "an existing label")
        config_flags(sp)
    labels.set_defaults(func=cmd_labels)

    feed = sub.add_parser("feed", help="publish real labelled images to a broker")
    feed.add_argument("--broker", required=True, help="mqtt://host:port")
    feed.add_argument("--model", required=True, help="model name: publishes to <prefix>/<model>/examples")
    source = feed.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=["fashion-mnist"], help="a packaged dataset")
    source.add_argument("--dir", type=Path, help="a folder with one sub-folder of images per label")
    feed.add_argument("--part", default="train", choices=["train", "t10k"], help="Fashion-MNIST part (default train)")
    feed.add_argument("--rate", type=float, default=0.0, help="examples per second; 0 = as fast as the broker acks")
    feed.add_argument("--limit", type=int, help="stop after N examples")
    feed.add_argument("--order", default="iid", choices=["iid", "class-incremental"])
    feed.add_argument("--classes", help="comma-separated class names to send, in this order")
    feed.add_argument("--size", type=int, default=224, help="side in pixels of encoded dataset images (default 224)")
    feed.add_argument("--format", default="jpeg", choices=["jpeg", "png"], help="encoding of dataset images")
    feed.add_argument("--seed", type=int, default=0, help="shuffle seed")
    feed.add_argument(
        "--split",
        choices=["train", "holdout"],
        help="split of every example sent (default: a --dir's train/ or holdout/ folder, else the "
        "daemon's store.holdout_fraction)",
    )
    feed.add_argument("--topic-prefix", default="sprout")
    feed.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", help="log level (default INFO)")
    feed.add_argument("--window", type=int, default=256, help="un-acked messages in flight at once")
    feed.add_argument("--ca-file", type=Path, help="CA bundle to verify an mqtts:// broker with (default: system CAs)")
    feed.set_defaults(func=cmd_feed)

    export = sub.add_parser(
        "export", help="export the learner's last checkpoint now; publish it if it passes the gates"
    )
    config_flags(export, long_running=True)
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="the main job: the daemon on the default config fed with Fashion-MNIST, live")
    demo.add_argument("--limit", type=int, default=2000, help="examples to feed (default 2000)")
    demo.add_argument("--rate", type=float, default=100.0, help="examples per second (default 100)")
    demo.add_argument("--state", type=Path, help="state directory (default: the config's, ./var)")
    demo.add_argument("--broker", help="broker URL (default: the config's, else a private Mosquitto)")
    demo.add_argument(
        "--order",
        default="class-incremental",
        choices=["iid", "class-incremental"],
        help="feed order (default class-incremental: the classes arrive one after another)",
    )
    demo.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="end with the summary after this long even if the learner has not caught up (default 600)",
    )
    demo.add_argument("--keep-running", action="store_true", help="keep the daemon running after the feed ends")
    demo.add_argument("--log-level", choices=LOG_LEVELS, help="level of STATE/demo.log (default INFO)")
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the whole summary as JSON instead of a few lines (it is always written to STATE/demo-summary.json)",
    )
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="the model registry: list, show, rollback, pin, unpin versions")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    ls = models_sub.add_parser("list", help="versions on disk, newest first; * marks the latest")
    config_flags(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, text in [
        ("show", "print a version's manifest ('latest' for the latest)"),
        ("rollback", "make version V the latest again (its manifest and signature unchanged)"),
        ("pin", "keep version V through retention"),
        ("unpin", "let retention delete version V again"),
    ]:
        sp = models_sub.add_parser(name, help=text)
        sp.add_argument("version", metavar="V", type=_version)
        config_flags(sp)
    models.set_defaults(func=cmd_models)

    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair for signing manifests")
    keygen.add_argument("--out", type=Path, required=True, help="folder for signing.key (0600) and signing.pub")
    keygen.set_defaults(func=cmd_keygen)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a reader that went away is caught, not at exit
        return code
    except ConfigError as err:
        print(f"sprout: bad configuration:\n{err}", file=sys.stderr)
        return Exit.CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`sprout check-config F | head`): it has what it wanted. Python would
        # print a traceback while flushing stdout at exit; point stdout at nothing instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
