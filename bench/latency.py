"""Device latency: milliseconds per image of each exported model, per interpreter, at 1 and 2 threads.

Times the .tflite files that ``bench/export.py --save-models DIR`` kept, on
the images it kept beside them, through the device-side code
(``edge.probe`` -> ``edge.runtime.classify``, one image per invoke as an app
runs it): ai-edge-litert in the project's virtualenv, tflite-runtime 2.14
in its own. Runs one at a time (the export's verification runs both
interpreters side by side, which is right for the gate and wrong for a
timing). Each figure is the median over images of the median of repeats.

Usage: python bench/latency.py DIR [--threads 1,2] [--repeats 3] [--images 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, machine

from daemon.export.verification import python_for

RUNTIMES = ("ai-edge-litert", "tflite-runtime")


def time_once(model: Path, images: Path, runtime: str, threads: int) -> tuple[float | None, str | None]:
    """Median ms per image of one probe run, or (None, why) when the interpreter cannot run the model."""
    with tempfile.TemporaryDirectory(prefix="sprout-latency-") as tmp:
        out = Path(tmp) / "out.npz"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(
            [
                str(python_for(runtime)),
                "-m",
                "edge.probe",
                "--runtime",
                runtime,
                "--threads",
                str(threads),
                str(model),
                str(images),
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            return None, lines[-1] if lines else f"exit {proc.returncode}"
        with np.load(out) as saved:
            return float(np.median(saved["latencies_ms"])), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, help="folder with <mode>.tflite files and images.npy")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=200, help="images per run (from images.npy)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    images = np.load(args.models / "images.npy")[: args.images]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sprout-latency-images-") as tmp:
        subset = Path(tmp) / "images.npy"
        np.save(subset, images)
        for model in sorted(args.models.glob("*.tflite")):
            for runtime in RUNTIMES:
                for threads in (int(t) for t in args.threads.split(",")):
                    runs, error = [], None
                    for _ in range(args.repeats):
                        ms, error = time_once(model, subset, runtime, threads)
                        if ms is None:
                            break
                        runs.append(ms)
                    row = {
                        "mode": model.stem,
                        "runtime": runtime,
                        "threads": threads,
                        "ms_per_image": round(statistics.median(runs), 2) if runs else None,
                        "runs": [round(r, 2) for r in runs],
                        "error": error,
                    }
                    rows.append(row)
                    shown = f"{row['ms_per_image']:.2f} ms/image" if runs else f"cannot run: {error}"
                    print(f"  {model.stem:8s} {runtime:15s} {threads} thread(s): {shown}", flush=True)
    summary = {"machine": machine(), "images": len(images), "input_shape": list(images.shape[1:]), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
