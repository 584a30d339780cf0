"""The ``sprout`` command: a thin shell over the daemon's parts. Exit codes follow sysexits.h."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from daemon import __version__, logs
from daemon.settings import EX_CONFIG, ConfigError, Settings

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73

log = logging.getLogger("sprout")


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
    return out


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(getattr(args, "config", None), _overrides(args))


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import Daemon
    from daemon.store import StoreError

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    daemon = Daemon(settings)
    try:
        return daemon.leave(daemon.run())
    except StoreError as err:
        log.error("%s", err)
        return EX_CONFIG if "state directory" in str(err) else EX_SOFTWARE
    except OSError as err:  # e.g. the HTTP port is taken
        log.error("cannot start: %s", err)
        return EX_UNAVAILABLE


def cmd_check_config(args: argparse.Namespace) -> int:
    from daemon import preflight

    settings = Settings.load(args.file)
    preflight.check(settings)  # what `sprout run` checks before it starts
    print(json.dumps(settings.masked(), indent=2, default=str))
    return 0


def cmd_store_stats(args: argparse.Namespace) -> int:
    from daemon.store import StoreError, open_reader, stats

    settings = _settings(args)
    try:
        db = open_reader(settings.state_dir / "examples.db")
        print(json.dumps(stats(db), indent=2, ensure_ascii=False))
    except StoreError as err:
        print(f"sprout store stats: {err}", file=sys.stderr)
        return EX_NOINPUT
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    from daemon.feeder import run_feed

    return run_feed(args)


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.publishing import NothingToExport, export_once

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    try:
        outcome = export_once(settings)
    except NothingToExport as err:
        print(f"sprout export: nothing to export: {err}", file=sys.stderr)
        return EX_NOINPUT
    print(json.dumps({
        "published": outcome.published["version"] if outcome.published else None,
        "rejected_because": outcome.reasons,
        "skipped_modes": outcome.skipped,
        "metrics": outcome.metrics,
        "seconds": round(outcome.seconds, 1),
    }, indent=2))
    return 0 if outcome.published else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    try:
        return run_demo(args)
    except OSError as err:  # e.g. the HTTP port is taken by another Sprout
        log.error("cannot start: %s (server.http / SPROUT_SERVER__HTTP picks another address)", err)
        return EX_UNAVAILABLE


def _version(text: str) -> int | str:
    if text == "latest":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a version is a positive integer (or 'latest' for show)")
    return int(text)


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.registry import NoRegistryError, Registry, RegistryError, UnknownVersionError, registry_root
    from daemon.signing import SigningKeyError

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
            return EX_USAGE
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
        return EX_NOINPUT
    except SigningKeyError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return EX_CONFIG
    except RegistryError as err:  # unknown version, damaged version
        print(f"{what}: {err}", file=sys.stderr)
        return EX_DATAERR


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
    from daemon.signing import Signer, SigningKeyError, generate

    try:
        private, public = generate(args.out)
    except SigningKeyError as err:
        print(f"sprout keygen: {err}", file=sys.stderr)
        return EX_CANTCREAT
    except OSError as err:
        print(f"sprout keygen: cannot write to {args.out}: {err.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    print(f"private key: {private}  (mode 0600; set signing.key_file to it)")
    print(f"public key:  {public}  (give it to your devices)")
    print(f"key id:      {Signer.load(private).key_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sprout", description="Sprout: learn from an MQTT feed, ship TensorFlow Lite models.")
    p.add_argument("--version", action="version", version=f"sprout {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="TOML config file (see sprout.example.toml); default: built-in defaults")
        sp.add_argument("--state", type=Path, help="state directory (overrides state_dir)")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    config_flags(run)
    run.add_argument("--broker", help="broker URL, mqtt://host:port (overrides mqtt.broker)")
    run.add_argument("--model", help="model name (overrides model.name)")
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
    feed.add_argument("--topic-prefix", default="sprout")
    feed.add_argument("--window", type=int, default=256, help="un-acked messages in flight at once")
    feed.add_argument("--ca-file", type=Path, help="CA bundle to verify an mqtts:// broker with (default: system CAs)")
    feed.set_defaults(func=cmd_feed)

    export = sub.add_parser("export", help="export the learner's last checkpoint now; publish it if it passes the gates")
    config_flags(export)
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="the main job: the daemon on the default config fed with Fashion-MNIST, live")
    demo.add_argument("--limit", type=int, default=2000, help="examples to feed (default 2000)")
    demo.add_argument("--rate", type=float, default=100.0, help="examples per second (default 100)")
    demo.add_argument("--state", type=Path, help="state directory (default: the config's, ./var)")
    demo.add_argument("--broker", help="broker URL (default: the config's, else a private Mosquitto)")
    demo.add_argument("--order", default="class-incremental", choices=["iid", "class-incremental"],
                      help="feed order (default class-incremental: the classes arrive one after another)")
    demo.add_argument("--max-seconds", type=float, default=600.0,
                      help="end with the summary after this long even if the learner has not caught up (default 600)")
    demo.add_argument("--keep-running", action="store_true", help="keep the daemon running after the feed ends")
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
        return args.func(args)
    except ConfigError as err:
        print(f"sprout: bad configuration:\n{err}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
