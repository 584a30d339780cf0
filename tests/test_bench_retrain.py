"""bench/retrain.py on a tiny stream: both learners run on both streams and the compute is accounted as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_retrain_benchmark_accounts_compute(tmp_path: Path) -> None:
    out = tmp_path / "retrain.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "retrain.py"),
            "--quick",
            "--train-per-class",
            "10",
            "--eval-per-class",
            "5",
            "--every",
            "20",
            "--epochs",
            "2",
            "--timing-images",
            "20",
            "--no-plot",
            "--json",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=120,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    forward_s, epochs = report["meta"]["forward_seconds_per_image"], report["meta"]["epochs"]
    assert forward_s > 0
    assert set(report["results"]) == {"iid", "class-incremental"}
    for kind, result in report["results"].items():
        sprout, retrains = result["sprout"], result["retrain"]
        assert [r["seen"] for r in retrains] == [20, 40, 60, 80, 100], kind
        assert sprout["curve"][-1][0] == 100, kind  # Sprout learned every example of the stream
        # Sprout: one forward per example plus its measured learning time.
        assert sprout["compute_seconds"] == pytest.approx(100 * forward_s + sprout["learning_curve"][-1])
        # Model Maker style: every epoch of every retrain runs the backbone over everything seen so far.
        heads = sum(r["head_seconds"] for r in retrains)
        assert retrains[-1]["compute_mm"] == pytest.approx(epochs * 300 * forward_s + heads)
        assert retrains[-1]["compute_cached"] == pytest.approx(100 * forward_s + heads)
        summary = report["summary"][kind]
        # 600 forwards against Sprout's 100: the Model Maker style baseline always costs more.
        assert summary["compute_ratio_vs_retrain-mm"] < 1
        assert summary["retrain_accuracy"] == retrains[-1]["accuracy"]
