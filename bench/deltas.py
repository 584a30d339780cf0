"""Bytes a device downloads per update: each published version's full file against a delta from the one before.

Reads a state folder's registry (after `make demo`, ./var): for every version whose predecessor is still on
disk, makes the delta a device holding the predecessor would fetch (edge/delta.py, as the registry makes
it), applies it, checks the result, and prints the full size, the delta's size and share, and the time to
make and to apply it; with the quantization of both sides, since a delta across modes (int8 to fp16) shares
little. Deltas the registry already listed in a manifest are shown beside, to confirm it wrote the same.

Usage: python bench/deltas.py [--state ./var] [--model NAME] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.registry.versions import Registry, registry_root  # noqa: E402
from edge.delta import apply, make  # noqa: E402


def measure(registry: Registry) -> list[dict]:
    rows = []
    versions = registry.versions()
    for base, version in zip(versions, versions[1:], strict=False):
        old, new = registry.model_path(base).read_bytes(), registry.model_path(version).read_bytes()
        started = time.perf_counter()
        delta = make(old, new)
        made_s = time.perf_counter() - started
        started = time.perf_counter()
        result = apply(old, delta, len(new))
        applied_s = time.perf_counter() - started
        if hashlib.sha256(result).digest() != hashlib.sha256(new).digest():
            raise SystemExit(f"version {version} from {base}: the delta does not give the file back")
        manifest, before = registry.manifest(version), registry.manifest(base)
        listed = manifest["files"]["model.tflite"].get("deltas", {}).get(str(base))
        rows.append(
            {
                "version": version,
                "from": base,
                "quantization": f"{before['quantization']} -> {manifest['quantization']}",
                "classes": f"{len(before['labels'])} -> {len(manifest['labels'])}",
                "full_bytes": len(new),
                "delta_bytes": len(delta),
                "share": len(delta) / len(new),
                "make_s": made_s,
                "apply_s": applied_s,
                "listed_bytes": listed["size"] if listed else None,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, default=Path("var"), help="the daemon's state folder (default ./var)")
    ap.add_argument("--model", help="model name (default: the only one in the registry)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = registry_root(args.state)
    models = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    model = args.model or (models[0] if len(models) == 1 else None)
    if model is None:
        raise SystemExit(f"{root}: models {models or 'none'}; name one with --model (run `make demo` for one)")
    rows = measure(Registry.open_readonly(root, model))
    print("| version | quantization | classes | full file | delta | share | make | apply | listed in manifest |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        listed = f"{r['listed_bytes']:,} B" if r["listed_bytes"] is not None else "-"
        print(
            f"| {r['from']} -> {r['version']} | {r['quantization']} | {r['classes']} | {r['full_bytes']:,} B "
            f"| {r['delta_bytes']:,} B | {100 * r['share']:.2f}% | {r['make_s']:.2f} s | {1000 * r['apply_s']:.0f} ms "
            f"| {listed} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
