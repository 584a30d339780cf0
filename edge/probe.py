"""Run a model on one interpreter over given images and save what it returned: the exporter's subprocess.

tflite-runtime 2.14 imports only with numpy<2 and so lives in its own
virtualenv, where neither torch nor Sprout is installed. The exporter runs

    <that venv>/bin/python -m edge.probe --runtime tflite-runtime MODEL IMAGES.npy OUT.npz

with PYTHONPATH naming the folder above ``edge/``. This module needs only
numpy and the interpreter. It exits 0 with OUT written, or 1 with one line on
stderr saying why the model could not be loaded or run (which the exporter
records as the reason to reject the candidate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge.runtime import RUNTIMES, Session


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m edge.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runtime", choices=sorted(RUNTIMES), default="tflite-runtime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--keep-output", type=int, default=None, help="position of a further output whose values to save (as kept)"
    )
    ap.add_argument(
        "--tensors", action="store_true", help="IMAGES holds the input tensors as the model takes them, not pixels"
    )
    ap.add_argument("model", type=Path, help=".tflite file")
    ap.add_argument("images", type=Path, help=".npy of uint8 (N, H, W, 3) RGB images")
    ap.add_argument("out", type=Path, help=".npz to write: probabilities, latencies_ms, meta (JSON)[, kept]")
    args = ap.parse_args(argv)
    try:
        session = Session(args.model.read_bytes(), args.runtime, args.threads, keep_output=args.keep_output)
        images = np.load(args.images)
        probabilities, latencies, kept = session.run(images if args.tensors else session.inputs(images))
    except Exception as e:
        print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    scale, zero_point = session.input_quantization
    meta = {
        "runtime": session.runtime,
        "version": session.version,
        "input_dtype": session.input_dtype,
        "input_scale": scale,
        "input_zero_point": zero_point,
    }
    arrays: dict[str, Any] = {
        "probabilities": probabilities,
        "latencies_ms": latencies,
        "meta": np.array(json.dumps(meta)),
    }
    if kept is not None:
        arrays["kept"] = kept
    np.savez(args.out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
