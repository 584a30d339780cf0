"""``sprout labels``: list the classes; rename, merge or delete one, whether the daemon runs or not."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, TypedDict

from daemon.cli.flags import config_flags, load_settings
from daemon.common.exits import Exit
from daemon.common.settings import Settings

if TYPE_CHECKING:  # imported where used: `sprout --help` should not wait for torch
    from daemon.store.labels import LabelChange
    from daemon.store.location import StoreLocation
    from daemon.store.reader import LabelCount, StoreReader

log = logging.getLogger("sprout")

# name, help, the label's metavar, the second label's metavar (None: the command takes one label)
CHANGES: list[tuple[str, str, str, str | None]] = [
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
]


class LabelRow(TypedDict):
    """One row of `sprout labels list` (one object of its --json)."""

    label: str
    train: int
    holdout: int
    output: int | None
    retired: bool
    also_sent_as: list[str]


def add_parser(sub: argparse._SubParsersAction) -> None:
    labels = sub.add_parser("labels", help="the classes: list, rename, merge or delete one, daemon running or not")
    labels_sub = labels.add_subparsers(dest="labels_command", required=True, metavar="SUBCOMMAND")
    lls = labels_sub.add_parser("list", help="each label: stored examples, the learner's output, retired or not")
    config_flags(lls)
    lls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, text, first, second in CHANGES:
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


def cmd_labels(args: argparse.Namespace) -> int:
    from daemon.store.errors import StoreError
    from daemon.store.labels import LabelError, LabelMap
    from daemon.store.location import StoreLocation
    from daemon.store.reader import StoreReader

    settings = load_settings(args)
    what = f"sprout labels {args.labels_command}"
    location = StoreLocation.of_settings(settings)
    try:
        reader = StoreReader(location)  # refuses a missing store: a typo in --state must not create one
        try:
            reader.labels = LabelMap.replay(reader.label_changes())
            outputs = _learner_outputs(settings, reader)
            if args.labels_command == "list":
                return _labels_list(reader, outputs, args.json)
            counts = reader.label_counts().get(args.label)
        finally:
            reader.close()
        change = _change_label(location, args, settings, outputs)
    except StoreError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.NOINPUT
    except LabelError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.DATAERR
    _record_label_change(settings, change)
    print(_label_change_done(change, counts, outputs))
    return 0


def _change_label(
    location: StoreLocation, args: argparse.Namespace, settings: Settings, outputs: list[str] | None
) -> LabelChange:
    from daemon.store.examples import Store
    from daemon.store.labels import Action

    store = Store(location, settings.store.migrate_on_start, "sprout-labels")
    try:
        return store.change_label(
            Action(args.labels_command),
            args.label,
            getattr(args, "into", None),
            settings.store.max_label_chars,
            outputs or (),
        )
    finally:
        store.close()


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


def _label_rows(reader: StoreReader, outputs: list[str] | None) -> list[LabelRow]:
    index = {label: i for i, label in enumerate(outputs or [])}
    counts = reader.label_counts()
    labels = sorted(counts.keys() | index.keys(), key=lambda label: (index.get(label, len(index)), label))
    aliases: dict[str, list[str]] = {}
    for old, now in reader.labels.aliases.items():
        aliases.setdefault(now, []).append(old)
    return [
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


def _labels_list(reader: StoreReader, outputs: list[str] | None, as_json: bool) -> int:
    rows = _label_rows(reader, outputs)
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
