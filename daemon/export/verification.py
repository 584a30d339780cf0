"""Verification: run a candidate .tflite on every target interpreter and say how it did against the float model.

Each runtime runs ``edge/probe.py`` (the device-side code, edge/runtime.py) in
its own subprocess: ai-edge-litert with this Python, tflite-runtime with the
Python of its own virtualenv (it needs numpy<2). A subprocess also keeps an
interpreter that crashes on a bad model from taking the daemon down with it.
The runtimes run side by side, one thread each: tflite-runtime 2.14 is the
slow one (no XNNPACK path for these int8 graphs, ~30 ms an image at 128 px)
and sets the pace.

A runtime that cannot load or run the model is a report with ``error`` set
(what it said) and ``fault`` (a :class:`RuntimeFault`); the gates
(daemon/export/gates.py) turn every report into typed refusals.
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import edge

EDGE_ROOT = Path(edge.__file__).resolve().parent.parent  # the folder holding edge/, for PYTHONPATH


class RuntimeFault(enum.StrEnum):
    """How a runtime failed a model: the kind behind a report's ``error`` sentence."""

    UNAVAILABLE = "unavailable"  # no Python with that runtime here
    TIMED_OUT = "timed_out"  # export.verify_timeout_s passed
    CRASHED = "crashed"  # killed by a signal while loading or running the model
    REFUSED = "refused"  # the interpreter exited with its own reason (an op it lacks, a bad file)
    WRONG_OUTPUT = "wrong_output"  # ran, but outputs of the wrong shape


@dataclass(frozen=True)
class RuntimeReport:
    runtime: str
    version: str
    top1: float | None  # on the labelled images given; None without labels or on error
    agreement: float | None  # share of images whose top-1 equals the float model's
    latency_ms: float | None  # median per image, batch 1, one thread
    nonfinite: bool  # any NaN or infinity in any output
    input_dtype: str | None
    error: str | None = None  # why the runtime could not load or run the model
    predicted: tuple[int, ...] | None = field(default=None, repr=False)  # top-1 index per image
    fault: RuntimeFault | None = None  # with ``error``: how it failed
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)  # (N, classes)
    kept: np.ndarray | None = field(default=None, repr=False, compare=False)  # keep_output's values, one per image

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("predicted", "probabilities", "kept")}


_Running = tuple[Path, "subprocess.Popen[str]"]  # a probe under way: where it writes, the process


def default_tflite_runtime_python() -> Path:
    """``<venv>-tflite/bin/python`` beside the virtualenv this daemon runs in (scripts/setup.sh makes it)."""
    return Path(sys.prefix + "-tflite") / "bin" / "python"


def python_for(runtime: str, tflite_runtime_python: Path | None = None) -> Path:
    """The Python that has ``runtime``: this one for ai-edge-litert, tflite-runtime's own virtualenv's otherwise."""
    if runtime == "tflite-runtime":
        return Path(tflite_runtime_python) if tflite_runtime_python else default_tflite_runtime_python()
    return Path(sys.executable)


def pythons(tflite_runtime_python: Path | None) -> dict[str, Path] | None:
    """The ``pythons`` argument of :func:`verify` for ``export.tflite_runtime_python``: None keeps the defaults."""
    return {"tflite-runtime": Path(tflite_runtime_python)} if tflite_runtime_python else None


def unavailable(runtimes: Sequence[str], tflite_runtime_python: Path | None = None) -> list[str]:
    """What is missing for each runtime that cannot run here, with what to do; empty when all can."""
    problems = []
    for runtime in runtimes:
        python = python_for(runtime, tflite_runtime_python)
        if not python.exists():
            problems.append(
                f"{runtime} needs {python}, which does not exist: run scripts/setup.sh (it creates that "
                f"virtualenv), set export.tflite_runtime_python, or drop {runtime} from export.runtimes"
            )
    return problems


def verify(
    tflite: bytes,
    images: np.ndarray,
    labels: np.ndarray | None,
    reference: np.ndarray | None,
    runtimes: Sequence[str],
    pythons: dict[str, Path] | None = None,
    timeout_s: float = 300.0,
) -> list[RuntimeReport]:
    """One report per runtime for the candidate ``tflite`` on uint8 ``images`` against ``reference`` probabilities.

    Without a ``reference`` (scoring the published model, whose classes may differ) agreement is None.

    ``pythons`` maps a runtime to the interpreter that has it installed; by default :func:`python_for`.
    """
    return run_each(tflite, {runtime: images for runtime in runtimes}, labels, reference, pythons, timeout_s)


def run_each(
    tflite: bytes,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    reference: np.ndarray | None,
    pythons: dict[str, Path] | None = None,
    timeout_s: float = 300.0,
    keep_output: int | None = None,
    tensors: bool = False,
) -> list[RuntimeReport]:
    """:func:`verify` with each runtime's own ``inputs``: uint8 images, or (``tensors``) the input tensors as the
    model takes them; ``keep_output``: the position of a further output whose values per image each report
    carries (``kept``)."""
    runtimes = list(inputs)
    pythons = {runtime: python_for(runtime) for runtime in runtimes} | (pythons or {})
    with tempfile.TemporaryDirectory(prefix="sprout-verify-") as tmp:
        model = Path(tmp) / "candidate.tflite"
        model.write_bytes(tflite)
        started: dict[str, RuntimeReport | _Running] = {}
        for runtime in runtimes:
            python = pythons[runtime]
            if not python.exists():
                started[runtime] = _failed(
                    runtime,
                    unavailable([runtime], python)[0] if runtime == "tflite-runtime" else f"no Python at {python}",
                    RuntimeFault.UNAVAILABLE,
                )
                continue
            out, images = Path(tmp) / f"{runtime}.npz", Path(tmp) / f"{runtime}-inputs.npy"
            given = inputs[runtime]
            np.save(images, np.ascontiguousarray(given if tensors else given.astype(np.uint8, copy=False)))
            options = (["--keep-output", str(keep_output)] if keep_output is not None else []) + (
                ["--tensors"] if tensors else []
            )
            started[runtime] = (out, _probe(python, runtime, model, images, out, options))
        return [_report(runtime, job, labels, reference, timeout_s) for runtime, job in started.items()]


def _probe(
    python: Path, runtime: str, model: Path, images: Path, out: Path, options: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """edge/probe.py in ``python``, on one thread (as a phone runs it): its outputs go to ``out``."""
    return subprocess.Popen(
        [
            str(python),
            "-m",
            "edge.probe",
            "--runtime",
            runtime,
            "--threads",
            "1",
            *options,
            str(model),
            str(images),
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(EDGE_ROOT), "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _report(
    runtime: str,
    job: RuntimeReport | _Running,
    labels: np.ndarray | None,
    reference: np.ndarray | None,
    timeout_s: float,
) -> RuntimeReport:
    if isinstance(job, RuntimeReport):
        return job
    out, proc = job
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return _failed(
            runtime, f"did not finish within {timeout_s:.0f} s (export.verify_timeout_s)", RuntimeFault.TIMED_OUT
        )
    if proc.returncode != 0:
        fault = RuntimeFault.CRASHED if proc.returncode < 0 else RuntimeFault.REFUSED
        return _failed(runtime, _why(proc.returncode, stderr), fault)
    with np.load(out) as saved:
        probabilities = saved["probabilities"]
        latencies = saved["latencies_ms"]
        meta = json.loads(str(saved["meta"]))
        kept = saved["kept"] if "kept" in saved else None
    return scored(runtime, meta["version"], meta["input_dtype"], probabilities, latencies, labels, reference, kept)


def scored(
    runtime: str,
    version: str,
    input_dtype: str,
    probabilities: np.ndarray,
    latencies: np.ndarray,
    labels: np.ndarray | None,
    reference: np.ndarray | None,
    kept: np.ndarray | None = None,
) -> RuntimeReport:
    """The report of a runtime that returned ``probabilities`` (N, classes) for the images of ``labels``."""
    expected = reference.shape if reference is not None else (len(labels),) if labels is not None else None
    if expected is not None and probabilities.shape[: len(expected)] != expected:
        return _failed(
            runtime,
            f"returned outputs of shape {probabilities.shape}, expected {expected}",
            RuntimeFault.WRONG_OUTPUT,
            version,
        )
    predicted = probabilities.argmax(1)
    return RuntimeReport(
        runtime=runtime,
        version=version,
        top1=float((predicted == labels).mean()) if labels is not None and len(labels) else None,
        agreement=float((predicted == reference.argmax(1)).mean())
        if reference is not None and len(reference)
        else None,
        latency_ms=float(np.median(latencies)) if len(latencies) else None,
        nonfinite=bool(not np.all(np.isfinite(probabilities))),
        input_dtype=input_dtype,
        predicted=tuple(int(i) for i in predicted),
        probabilities=probabilities,
        kept=kept,
    )


def _failed(runtime: str, error: str, fault: RuntimeFault, version: str = "unknown") -> RuntimeReport:
    return RuntimeReport(runtime, version, None, None, None, False, None, error, fault=fault)


def _why(returncode: int, stderr: str) -> str:
    if returncode < 0:
        return f"crashed (signal {-returncode}) while loading or running the model"
    # The probe's own one-line reason is last; interpreters log their own lines (XNNPACK, op resolver) before it.
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exited {returncode} without a reason"
