"""What a phone photo costs: intake's check and the learner's decode, in time and peak memory.

    python bench/phone_photos.py [--repeats 5] [--json bench/out/phone-photos.json]

Photos as agronomists' phones send them: an 18 MP JPEG (5184x3456, quality 95,
with sensor grain, EXIF orientation 6), a 12 MP HEIC (4032x3024) and, for
scale, a 30 KB JPEG crop. For each: the wire check that runs on the MQTT
network thread (daemon/ingest/wire.py: header, then a decode at 1/8 scale for JPEG,
whole for HEIC), and ``load_rgb`` at 224 px, the one preprocessing shared by
learner and devices (edge/preprocess.py). Peak memory is the growth of the
process's peak RSS (reset first) over one decode, in a fresh process per case, so
Pillow's and libheif's own buffers count (tracemalloc would miss them). A
full-size decode of the same JPEG is measured beside it: what draft mode saves.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = ("jpeg-18mp", "heic-12mp", "jpeg-30kb")


def make(case: str) -> tuple[bytes, str]:
    """The photo's bytes and content type: noise over a gradient, so it compresses like a real photo."""
    rng = np.random.default_rng(7)
    w, h = {"jpeg-18mp": (5184, 3456), "heic-12mp": (4032, 3024), "jpeg-30kb": (320, 240)}[case]
    gradient = np.linspace(40, 200, w, dtype=np.float32)[None, :, None]
    grain = 2 if case.startswith("heic") else 6  # HEVC spends many bytes on grain: 12 MP phone HEIC is 2-4 MB
    pixels = np.clip(gradient + rng.normal(0, grain, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    if case == "heic-12mp":
        import pillow_heif

        pillow_heif.from_pillow(img).save(buf, quality=90)
        return buf.getvalue(), "image/heic"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, as phones do
    img.save(buf, format="JPEG", quality=95 if case == "jpeg-18mp" else 80, exif=exif)
    return buf.getvalue(), "image/jpeg"


def measure_once(case: str, what: str, path: Path) -> dict:
    """In this (fresh) process: one decode's seconds and peak RSS growth."""
    from daemon.ingest.image_checks import inspect_image
    from edge.preprocess import load_rgb

    data = path.read_bytes()
    fmt = "HEIF" if case.startswith("heic") else "JPEG"
    load_rgb(make("jpeg-30kb")[0], 224)  # libraries loaded and warm before the baseline
    # The peak RSS is a high-water mark that imports already raised: reset it to the current RSS
    # (Linux: writing 5 to clear_refs), so that the decode's own peak shows.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    if what == "wire check":
        inspect_image(data, fmt, 50_000_000, 16_777_216)
    elif what == "load_rgb 224":
        assert load_rgb(data, 224) is not None
    else:  # full decode, no draft: what a naive loader does
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").load()
    seconds = time.perf_counter() - started
    grown_mb = (_status_kb("VmHWM") - before) / 1024
    return {"seconds": seconds, "peak_growth_mb": grown_mb}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--once", nargs=3, metavar=("CASE", "WHAT", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.once:
        print(json.dumps(measure_once(args.once[0], args.once[1], Path(args.once[2]))))
        return 0
    out_dir = ROOT / "bench" / "out" / "phone-photos"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in CASES:
        data, content_type = make(case)
        path = out_dir / f"{case}.bin"
        path.write_bytes(data)
        steps = ["wire check", "load_rgb 224"] + (["full decode"] if case == "jpeg-18mp" else [])
        for what in steps:
            runs = [
                json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--once", case, what, str(path)],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                )
                for _ in range(args.repeats)
            ]
            row = {
                "case": case,
                "bytes": len(data),
                "content_type": content_type,
                "step": what,
                "ms_median": round(1000 * statistics.median(r["seconds"] for r in runs), 1),
                "peak_growth_mb_median": round(statistics.median(r["peak_growth_mb"] for r in runs), 1),
                "repeats": args.repeats,
            }
            rows.append(row)
            print(
                f"{case:10} {len(data) / 1e6:6.2f} MB  {what:13} {row['ms_median']:8.1f} ms  "
                f"peak +{row['peak_growth_mb_median']:.1f} MB",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
