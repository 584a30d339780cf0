"""The ``sprout`` command: a thin shell over the daemon's parts. Exit codes follow sysexits.h.

Each module builds its commands' parsers (``add_..._parser(sub)``) and runs them (``cmd_...``):
:mod:`~daemon.cli.run` the daemon, ``check-config`` and ``export``; :mod:`~daemon.cli.store` the example store;
:mod:`~daemon.cli.labels` the classes; :mod:`~daemon.cli.label` the labelling queue; :mod:`~daemon.cli.tools` ``feed`` and ``demo``; :mod:`~daemon.cli.models`
the registry's versions and ``keygen``; :mod:`~daemon.cli.serve` the read-only download server. Each imports
what it uses inside the command: ``sprout --help`` does not wait for torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from daemon import __version__
from daemon.cli import label, labels, models, run, serve, store, tools
from daemon.common.exits import Exit
from daemon.common.settings import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sprout", description="Sprout: learn from an MQTT feed, ship TensorFlow Lite models."
    )
    p.add_argument("--version", action="version", version=f"sprout {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `sprout --help` lists them.
    run.add_run_parser(sub)
    run.add_check_config_parser(sub)
    store.add_parser(sub)
    labels.add_parser(sub)
    label.add_parser(sub)
    tools.add_feed_parser(sub)
    run.add_export_parser(sub)
    serve.add_parser(sub)
    tools.add_demo_parser(sub)
    tools.add_cluster_demo_parser(sub)
    models.add_parser(sub)
    models.add_keygen_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
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
