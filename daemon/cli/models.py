"""``sprout models`` (the registry's versions: list, show, rollback, pin, unpin; a staged rollout's status,
promote, halt) and ``sprout keygen`` (the key pair that signs their manifests)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.cli.flags import config_flags, load_settings
from daemon.common.exits import Exit
from daemon.common.settings import Settings

if TYPE_CHECKING:  # imported where used: `sprout --help` should not wait for them
    from daemon.registry.versions import Registry

COMMANDS = [
    ("show", "print a version's manifest ('latest' for the latest)"),
    ("rollback", "make version V the latest again (its manifest and signature unchanged)"),
    ("pin", "keep version V through retention"),
    ("unpin", "let retention delete version V again"),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model registry: list, show, rollback, pin, unpin versions")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    ls = models_sub.add_parser("list", help="versions on disk, newest first; * marks the latest")
    config_flags(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, text in COMMANDS:
        sp = models_sub.add_parser(name, help=text)
        sp.add_argument("version", metavar="V", type=_version)
        config_flags(sp)
    rollout = models_sub.add_parser("rollout", help="a version rolling out in stages: status, promote, halt")
    rollout.add_argument(
        "rollout_command",
        choices=["status", "promote", "halt"],
        metavar="status|promote|halt",
        help="status: the stage and the devices' figures; promote: on to the next stage (the last makes it "
        "latest); halt: stop it, its devices go back to latest",
    )
    rollout.add_argument("--reason", default="", help="with promote or halt: why, for the registry's history")
    rollout.add_argument("--json", action="store_true", help="with status: print JSON")
    config_flags(rollout)
    models.set_defaults(func=cmd_models)


def add_keygen_parser(sub: argparse._SubParsersAction) -> None:
    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair for signing manifests")
    keygen.add_argument("--out", type=Path, required=True, help="folder for signing.key (0600) and signing.pub")
    keygen.set_defaults(func=cmd_keygen)


def _version(text: str) -> int | str:
    if text == "latest":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a version is a positive integer (or 'latest' for show)")
    return int(text)


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.registry.signing import SigningKeyError
    from daemon.registry.versions import NoRegistryError, Registry, RegistryError, UnknownVersionError, registry_root

    settings = load_settings(args)
    what = f"sprout models {args.models_command}"
    try:
        # Opened read-only first: a typo in --state must not create an empty registry (or a key).
        reader = Registry.open_readonly(registry_root(settings.state_dir), settings.model.name)
        if args.models_command == "list":
            return _models_list(reader, args.json)
        if args.models_command == "rollout":
            return _rollout(reader, settings, args)
        if args.models_command == "show":
            manifest = reader.latest() if args.version == "latest" else reader.manifest(args.version)
            if manifest is None:
                raise UnknownVersionError(f"model {reader.model!r} has no latest version yet")
            print(json.dumps(manifest, indent=2, ensure_ascii=False))
            return 0
        if args.version == "latest":
            print(f"{what}: give a version number", file=sys.stderr)
            return Exit.USAGE
        _change(reader, settings, args.models_command, args.version)
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


def _change(reader: Registry, settings: Settings, command: str, version: int) -> None:
    """Rollback, pin or unpin ``version``, saying what changed."""
    from daemon.registry.versions import Registry

    registry = Registry.from_settings(settings, create_key=False)
    if command == "rollback":
        before = reader.latest()
        registry.rollback(version)
        was = f" (was {before['version']})" if before else ""
        print(f"{registry.model}: latest is now version {version}{was}")
    elif command == "pin":
        changed = registry.pin(version)
        print(f"{registry.model}: version {version} {'pinned' if changed else 'was already pinned'}")
    else:
        changed = registry.unpin(version)
        print(f"{registry.model}: version {version} {'unpinned' if changed else 'was not pinned'}")


def _rollout(reader: Registry, settings: Settings, args: argparse.Namespace) -> int:
    """``sprout models rollout status|promote|halt``."""
    from daemon.registry.versions import Registry

    what = f"sprout models rollout {args.rollout_command}"
    if args.rollout_command != "status":
        registry = Registry.from_settings(settings, create_key=False)
        reason = args.reason or f"by hand ({what})"
        if args.rollout_command == "promote":
            r = registry.advance_rollout(reason)
            done = "every device: it is the latest now" if r.state == "complete" else f"{r.percent:g}% of devices"
            print(f"{registry.model}: version {r.version} now reaches {done}")
        else:
            r = registry.halt_rollout(reason)
            print(
                f"{registry.model}: rollout of version {r.version} halted; its devices go back to version {r.replaces}"
            )
        return 0
    rollout = reader.rollout()
    latest = reader.latest()
    status = {
        "model": reader.model,
        "latest": latest["version"] if latest else None,
        "rollout": rollout.as_dict() if rollout is not None else None,
        "stages_configured": settings.rollout.stages,
    }
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if rollout is None:
        print(f"{reader.model}: no staged rollout yet; latest is version {status['latest']}")
        return 0
    r = rollout
    if r.rolling:
        print(
            f"{reader.model}: version {r.version} reaches {r.percent:g}% of devices (stage {r.stage + 1} of "
            f"{len(r.stages)}: {', '.join(f'{p:g}%' for p in r.stages)}); the others keep version {r.replaces}"
        )
    else:
        print(f"{reader.model}: version {r.version}'s rollout is {r.state}" + (f" ({r.reason})" if r.reason else ""))
        print(f"{reader.model}: every device gets version {status['latest']}")
    return 0


def _models_list(reader: Registry, as_json: bool) -> int:
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
