"""``sprout run``, ``sprout check-config`` and ``sprout export``: the daemon, its settings, one export now."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
from pathlib import Path

from daemon.cli.flags import config_flags, load_settings
from daemon.common import logs
from daemon.common.exits import Exit
from daemon.common.settings import Settings

log = logging.getLogger("sprout")

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


def add_run_parser(sub: argparse._SubParsersAction) -> None:
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
    run.add_argument(
        "--role",
        choices=["all", "intake", "trainer", "exporter"],
        help="'intake': only take examples into the shared store, one member of an intake group; 'trainer': one "
        "rank of a trainer group, started by torchrun; 'exporter': a candidate to export the trainers' checkpoint, "
        "one elected at a time (overrides role; docs/scale.md)",
    )
    run.set_defaults(func=cmd_run)


def add_check_config_parser(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check-config", help="validate a config file and print it resolved, secrets masked")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_check_config)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="export the learner's last checkpoint now; publish it if it passes the gates"
    )
    config_flags(export, long_running=True)
    export.set_defaults(func=cmd_export)


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service.daemon import Daemon
    from daemon.store.errors import StateDirError, StoreError, StoreUnavailable

    settings = load_settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): what a daemon that will not
    # stop, or has stalled, is doing, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    daemon = Daemon(settings)
    try:
        return daemon.run()
    except StateDirError as err:  # no state folder it can use, or a store from a newer Sprout
        log.error("%s", err)
        return Exit.CONFIG
    except StoreUnavailable as err:  # the store's database server is down: systemd tries again
        log.error("%s", err)
        return Exit.UNAVAILABLE
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


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.export.pipeline import NothingToExport, export_once

    settings = load_settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    try:
        outcome = export_once(settings)
    except NothingToExport as err:
        print(f"sprout export: nothing to export: {err}", file=sys.stderr)
        return Exit.NOINPUT
    print(json.dumps(outcome.summary(), indent=2))
    return 0 if outcome.published else 1
