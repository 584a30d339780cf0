"""``sprout feed`` and ``sprout demo``: the commands over :mod:`daemon.tools`, which the service never imports."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from daemon.cli.flags import LOG_LEVELS
from daemon.common.exits import Exit

log = logging.getLogger("sprout")


def add_feed_parser(sub: argparse._SubParsersAction) -> None:
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


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
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


def add_cluster_demo_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "cluster-demo",
        help="the deployment past one machine, on this one: intake x2, a trainer group of 2 ranks, exporter x2, "
        "sprout serve, fed with Fashion-MNIST (docs/scale.md)",
    )
    demo.add_argument("--limit", type=int, default=2000, help="examples to feed (default 2000)")
    demo.add_argument("--rate", type=float, default=100.0, help="examples per second (default 100)")
    demo.add_argument("--state", type=Path, help="folder for every process's state and log (default ./var-cluster)")
    demo.add_argument(
        "--order",
        default="class-incremental",
        choices=["iid", "class-incremental"],
        help="feed order (default class-incremental: the classes arrive one after another)",
    )
    demo.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="end with the summary after this long even if the cluster has not caught up (default 900)",
    )
    demo.set_defaults(func=cmd_cluster_demo)


def cmd_cluster_demo(args: argparse.Namespace) -> int:
    from daemon.tools.cluster_demo import run_cluster_demo
    from daemon.tools.postgres import PostgresError

    try:
        return run_cluster_demo(args)
    except PostgresError as err:
        log.error("cannot start PostgreSQL: %s (make cluster-demo installs Debian's postgresql)", err)
        return 69
    except RuntimeError as err:  # a process of the cluster died or never became healthy
        log.error("cluster-demo: %s", err)
        return 1


def cmd_feed(args: argparse.Namespace) -> int:
    from daemon.tools.feeder import run_feed

    return run_feed(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.tools.demo import run_demo

    try:
        return run_demo(args)
    except OSError as err:  # e.g. the HTTP port is taken by another Sprout
        log.error("cannot start: %s (server.http / SPROUT_SERVER__HTTP picks another address)", err)
        return Exit.UNAVAILABLE
