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
    try:
        return Daemon(settings).run()
    except StoreError as err:
        log.error("%s", err)
        return EX_CONFIG if "state directory" in str(err) else EX_SOFTWARE
    except OSError as err:  # e.g. the HTTP port is taken
        log.error("cannot start: %s", err)
        return EX_UNAVAILABLE


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = Settings.load(args.file)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(args)


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
    feed.set_defaults(func=cmd_feed)

    demo = sub.add_parser("demo", help="the main job: the daemon on the default config fed with Fashion-MNIST, live")
    demo.add_argument("--limit", type=int, default=2000, help="examples to feed (default 2000)")
    demo.add_argument("--rate", type=float, default=100.0, help="examples per second (default 100)")
    demo.add_argument("--state", type=Path, help="state directory (default: the config's, ./var)")
    demo.add_argument("--broker", help="broker URL (default: the config's, else a private Mosquitto)")
    demo.add_argument("--keep-running", action="store_true", help="keep the daemon running after the feed ends")
    demo.set_defaults(func=cmd_demo)
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
