"""Where an export's seconds go: py-spy samples ``bench/export.py`` and this sums them by phase.

    python bench/profile_export.py [--modes int8] [--out bench/out/profile-export.txt] [-- export.py options]

py-spy (``pip install -e '.[bench]'``) records the benchmark's process and
its children (the verification subprocesses) as collapsed stacks; each
sample (a thread found running, not waiting) is charged to the step of
``daemon.export.converter`` it is in, named by the function that step called.
Prints CPU seconds and shares per step.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) per frame of one collapsed py-spy stack, outermost first."""
    out = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        out.append((name.strip(), where.rstrip(")")))
    return out


# The step of daemon.exporter each sample is in: the frame called from these functions names it.
STEPS = {
    "prepare_pt2e": "PT2E prepare (observers inserted)",
    "convert_pt2e": "PT2E convert (quantise ops)",
    "convert": "litert-torch: lowering and flatbuffer",
    "export": "torch.export: tracing",
    "_fp16_weights": "fp16 weight cast (ai-edge-quantizer)",
    "to_channel_last_io": "NHWC wrapper",
}


def phase_of(stack: str) -> str:
    frames = _frames(stack)
    names = [name for name, _ in frames]
    if any("edge/probe.py" in where or "edge/runtime.py" in where for _, where in frames):
        return "verify: the interpreters run the candidate (subprocesses)"
    for parent in ("_convert_int8", "_convert_dynamic", "_convert"):
        if parent in names:
            i = len(names) - 1 - names[::-1].index(parent)
            child = names[i + 1] if i + 1 < len(names) else ""
            if parent == "_convert_int8" and child in ("_wrapped_call_impl", "__call__", "_call_impl"):
                return "int8: calibration forwards"
            return STEPS.get(child, f"{parent}: {child or 'itself'}")
    if "verify" in names:
        return "verify: waiting for and reading the interpreters"
    if any(n in names for n in ("learn", "float_probabilities", "load_rgb", "snapshot")):
        return "benchmark set-up: head training, decoding, float reference"
    if "_find_and_load" in names:
        return "imports"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="int8")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "profile-export.txt")
    ap.add_argument("rest", nargs="*", help="more bench/export.py options (after --)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    subprocess.run(
        [
            str(spy),
            "record",
            "--subprocesses",
            "-r",
            str(args.rate),
            "-f",
            "raw",
            "-o",
            str(args.out),
            "--",
            sys.executable,
            str(ROOT / "bench" / "export.py"),
            "--modes",
            args.modes,
            *args.rest,
        ],
        check=True,
        cwd=ROOT,
    )
    totals: collections.Counter[str] = collections.Counter()
    for line in args.out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            totals[phase_of(stack)] += int(count)
    samples = sum(totals.values())
    print(f"\n{samples / args.rate:.1f} s sampled ({samples} samples at {args.rate}/s, all threads and processes):")
    for phase, n in totals.most_common():
        print(f"  {n / args.rate:7.1f} s  {100 * n / samples:5.1f}%  {phase}")


if __name__ == "__main__":
    main()
