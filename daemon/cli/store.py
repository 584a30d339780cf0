"""``sprout store``: the example store's figures, and a folder of photos brought in without a broker."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from daemon.cli.flags import config_flags, load_settings
from daemon.common.exits import Exit

IMPORT_DESCRIPTION = (
    "Store the images under DIR/<label>/, or under DIR/train/<label>/ and DIR/holdout/<label>/\n"
    "(val/ and test/ count as holdout), checked as MQTT examples are. Without split folders,\n"
    "store.holdout_fraction decides, as for MQTT. An image's id is its content: importing again, or\n"
    "the same photo under two names, stores it once, also against `sprout feed --dir`. Safe while\n"
    "`sprout run` uses the same state: its learner picks the new examples up."
)

IMPORT_EPILOG = (
    "prints one JSON line: stored, duplicates, skipped (each listed on stderr), skipped_by_reason,\n"
    "ignored (files not named like images; hidden ones are passed over), pruned (by store.max_mb), seconds\n\n"
    "exit status:\n"
    "  0   every image stored or already there\n"
    "  65  some files skipped (listed on stderr); the rest are stored, so fix those and import again\n"
    "  66  DIR missing, or no label folders with images in it\n"
    "  73  the store took no more (disk full, store.min_free_mb); what was stored stays\n"
    "  78  bad configuration, or a state folder of another model (--model)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="the example store")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    st = store_sub.add_parser("stats", help="JSON: examples total, per label, per split, rejected by reason")
    config_flags(st)
    st.set_defaults(func=cmd_store_stats)
    imp = store_sub.add_parser(
        "import",
        help="store a folder of labelled images (one sub-folder per label), no broker needed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=IMPORT_DESCRIPTION,
        epilog=IMPORT_EPILOG,
    )
    config_flags(imp)
    imp.add_argument("dir", type=Path, metavar="DIR", help="folder with one sub-folder of images per label")
    imp.set_defaults(func=cmd_store_import)
    migrate = store_sub.add_parser(
        "migrate",
        help="set up the store, or apply its pending schema migrations (PostgreSQL: once, before the daemons start)",
        epilog="prints one JSON line: store, applied (versions), schema_version. exit status: 0 done; 69 the "
        "database server cannot be reached; 78 a store from a newer Sprout, or a user that may not create tables",
    )
    config_flags(migrate)
    migrate.set_defaults(func=cmd_store_migrate)


def cmd_store_stats(args: argparse.Namespace) -> int:
    from daemon.store.errors import StoreError
    from daemon.store.location import StoreLocation
    from daemon.store.reader import open_reader, stats

    settings = load_settings(args)
    try:
        db = open_reader(StoreLocation.of_settings(settings))
        print(json.dumps(stats(db), indent=2, ensure_ascii=False))
    except StoreError as err:
        print(f"sprout store stats: {err}", file=sys.stderr)
        return Exit.NOINPUT
    return 0


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from daemon.store.errors import StateDirError, StoreError, StoreUnavailable
    from daemon.store.examples import Store
    from daemon.store.location import StoreLocation

    settings = load_settings(args)
    try:
        store = Store(StoreLocation.of_settings(settings), migrate=True, application_name="sprout-migrate")
    except StoreError as err:  # the server away (69), a newer schema or no rights (78), else cannot create it
        print(f"sprout store migrate: {err}", file=sys.stderr)
        if isinstance(err, StoreUnavailable):
            return Exit.UNAVAILABLE
        return Exit.CONFIG if isinstance(err, StateDirError) else Exit.CANTCREAT
    try:
        report = {
            "store": store.where,
            "applied": [m.version for m in store.applied],
            "schema_version": store.schema_version,
        }
    finally:
        store.close()
    print(json.dumps(report))
    return 0


def cmd_store_import(args: argparse.Namespace) -> int:
    from daemon.ingest.folders import DatasetError
    from daemon.ingest.importer import ImportStopped, run_import
    from daemon.store.errors import StoreError

    settings = load_settings(args)
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
