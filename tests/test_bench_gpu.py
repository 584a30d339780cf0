"""bench/gpu.py's smoke run on the CPU: every section gives figures, and the CUDA-only variant says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    # One decoder process in the daemon (a CPU's "auto" is none): the end-to-end run reads ahead as on a GPU.
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--device",
            "cpu",
            "--quick",
            "--json",
            str(out),
            "--e2e-env",
            "SPROUT_TRAINING__DECODE_WORKERS=1",
            "--e2e-modes",
            "full,head",
        ],
        check=True,
        cwd=ROOT,
        timeout=300,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["machine"]["cores"]

    training = report["training"]
    assert training["batches"] == [2] and training["input_size"] == 64
    variants = training["variants"]
    assert set(variants) == {"eager fp32", "eager bf16 channels_last", "graphed bf16 channels_last", "compiled"}
    for name in ("eager fp32", "eager bf16 channels_last"):
        cell = variants[name]["2"]
        assert cell["images_per_second"] > 0 and cell["speedup_vs_eager_fp32"] > 0, name
    assert variants["eager fp32"]["2"]["speedup_vs_eager_fp32"] == 1.0
    graphed = variants["graphed bf16 channels_last"]["2"]
    assert graphed["images_per_second"] is None and graphed["note"] == "needs CUDA"
    assert variants["compiled"]["2"]["images_per_second"] is None  # --quick skips compilation
    assert "skipped" in variants["compiled"]["2"]["note"]

    decode = report["decode"]
    assert decode["images"] == 200 and 20 <= decode["jpeg_kb_median"] <= 45
    assert "0" in decode["workers"] and len(decode["workers"]) >= 2  # the learner's thread and a pool
    assert all(w["images_per_second"] > 0 for w in decode["workers"].values())

    e2e = report["end_to_end"]
    assert e2e["examples"] == 300 and 0 < e2e["train_examples"] <= 300
    assert e2e["learned_per_second_steady"] > 0 and e2e["learned_per_second_overall"] > 0
    assert e2e["last_publish_to_learned_s"] > 0 and e2e["idle_publish_to_learned_s"] > 0
    # The daemon decoded the next step's images beside each step (full mode, replay: every step has some).
    assert e2e["images_decoded_ahead"] > e2e["train_examples"] / 2 and e2e["decoder_fallbacks"] == 0
    # Two steps' worth of shared slots: a read-ahead always finds room.
    assert e2e["images_decoded_short_of_slots"] == 0
    # Head mode beside full, each in its own daemon: the report's first stays the full one.
    by_mode = report["end_to_end_by_mode"]
    assert list(by_mode) == ["full", "head"] and by_mode["full"] == e2e
    assert by_mode["head"]["mode"] == "head" and by_mode["head"]["env"]["SPROUT_TRAINING__MODE"] == "head"
    assert by_mode["head"]["learned_per_second_steady"] > 0 and by_mode["head"]["examples"] == 300
