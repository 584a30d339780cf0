"""What the published version predicted on each holdout example, per runtime: scored once, not at every export.

The gates compare a candidate with the published version on the candidate's
holdout (:func:`published_baseline`, daemon/export/gates.py). Running the published model over 400 images
on both runtimes took 10-25 s of every export at 128 px, most of it
tflite-runtime's int8 kernels, and gave the same answers each time: a
stored example never changes and the interpreters run one thread,
deterministically. So each version's top-1 prediction per holdout example
(by the store's ``seq``) is kept in ``<state>/export-cache/`` and only
examples it has not seen yet are run. The candidate that becomes a version
was just run on its own holdout: its predictions seed the file at publish.

Predictions are kept as class names, so a published model that lacks a class
the holdout now has simply misses it. A file that cannot be read is scored
anew; an interpreter of another version scores anew too (its kernels may
round differently). Written by rename, so a kill leaves the old file whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.common.files import replacing
from daemon.export.gates import Baseline
from daemon.export.job import ExportJob
from daemon.export.verification import RuntimeReport, pythons, verify
from daemon.registry.versions import Registry

log = logging.getLogger("sprout.export")

CACHE = "export-cache"


@dataclass
class RuntimePredictions:
    version: str  # the interpreter's version that made them
    by_seq: dict[int, str] = field(default_factory=dict)  # holdout example seq -> predicted class name


class PublishedScores:
    """One published version's predictions on holdout examples, for every runtime that ran it."""

    def __init__(self, root: Path, model_version: int):
        self.path = root / CACHE / f"published-v{model_version}.json"
        self.model_version = model_version
        self.runtimes: dict[str, RuntimePredictions] = {}
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("model_version") == model_version:
                self.runtimes = {
                    name: RuntimePredictions(r["version"], {int(k): v for k, v in r["by_seq"].items()})
                    for name, r in doc["runtimes"].items()
                }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.runtimes = {}  # none yet, or unreadable: scored anew

    def missing(self, runtime: str, seqs: list[int]) -> list[int]:
        known = self.runtimes.get(runtime)
        return list(seqs) if known is None else [s for s in seqs if s not in known.by_seq]

    def add(self, runtime: str, runtime_version: str, seqs: list[int], predicted: list[str]) -> None:
        known = self.runtimes.get(runtime)
        if known is None or known.version != runtime_version:
            known = self.runtimes[runtime] = RuntimePredictions(runtime_version)
        known.by_seq.update(zip(seqs, predicted, strict=True))

    def right(self, runtime: str, seqs: list[int], truth: list[str]) -> np.ndarray | None:
        """Whether each of ``seqs`` was predicted as its ``truth`` name; None unless every one was scored."""
        known = self.runtimes.get(runtime)
        if known is None or not seqs or any(s not in known.by_seq for s in seqs):
            return None
        return np.array([known.by_seq[s] == t for s, t in zip(seqs, truth, strict=True)], dtype=bool)

    def top1(self, runtime: str, seqs: list[int], truth: list[str]) -> float | None:
        """Share of ``seqs`` predicted as their ``truth`` name; None unless every one was scored."""
        right = self.right(runtime, seqs, truth)
        return None if right is None else float(right.mean())

    def save(self, keep: set[int] | None = None) -> None:
        """Write by rename; remove the files of versions other than this one and ``keep``."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "model_version": self.model_version,
            "runtimes": {
                name: {"version": r.version, "by_seq": {str(k): v for k, v in r.by_seq.items()}}
                for name, r in self.runtimes.items()
            },
        }
        with replacing(self.path, "w") as f:
            json.dump(doc, f)
        wanted = {self.path.name} | {f"published-v{v}.json" for v in (keep or set())}
        for old in folder.glob("published-v*.json"):
            if old.name not in wanted:
                old.unlink(missing_ok=True)


def remove_temporaries(root: Path) -> int:
    """Remove what killed exports left in ``<root>/export-cache`` (``.tmp-*``): the daemon calls it at start.

    A ``sprout export`` running beside it may lose its own temporary; its save then fails, is logged,
    and the next export scores anew: these files are a cache.
    """
    removed = 0
    for stale in (root / CACHE).glob(".tmp-*"):
        try:
            stale.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def published_baseline(
    registry: Registry, job: ExportJob, seqs: list[int], images: np.ndarray, names: list[str]
) -> Baseline | None:
    """The latest published version's top-1 on the candidate's holdout images, on every runtime.

    Its top-1 at publish time was measured on the holdout of that day; the holdout grows and shifts (new
    classes, new examples), so only a score on the same images says whether the candidate is worse.
    A class the published model does not know counts as a miss for it. Only holdout examples it has not
    been run on yet are run.
    """
    latest = registry.latest()
    if latest is None:
        return None
    size = job.model.input_size
    if list(latest["input"]["shape"][1:3]) != [size, size]:
        log.info(
            "published version %d takes %s input, this config %d px: no comparison with it",
            latest["version"],
            latest["input"]["shape"],
            size,
        )
        return None
    scores = PublishedScores(job.state_dir, latest["version"])
    rescored = _score_missing(scores, registry, latest, job, seqs, images)
    try:
        scores.save()
    except OSError as err:  # a cache: the comparison stands, the next export scores these examples again
        log.warning("could not keep version %d's holdout predictions: %s", latest["version"], err)
    right: dict[str, np.ndarray] = {
        r: hits for r in job.export.runtimes if (hits := scores.right(r, seqs, names)) is not None
    }
    return Baseline(latest["version"], {r: float(hits.mean()) for r, hits in right.items()}, rescored, right)


def _score_missing(
    scores: PublishedScores, registry: Registry, latest: dict, job: ExportJob, seqs: list[int], images: np.ndarray
) -> int:
    """Run the published version on the holdout examples ``scores`` lacks; how many were run."""
    at = {seq: i for i, seq in enumerate(seqs)}
    rescored: set[int] = set()
    failed: set[str] = set()
    # A second pass only when an interpreter reports another version than the one that made the kept
    # predictions (an upgrade): those are dropped and every example is run on it again.
    for _ in range(2):
        runtimes = [r for r in job.export.runtimes if r not in failed]
        missing = sorted({s for r in runtimes for s in scores.missing(r, seqs)})
        if not missing:
            break
        model = registry.model_path(latest["version"]).read_bytes()
        cfg = job.export
        reports = verify(
            model,
            images[[at[s] for s in missing]],
            None,
            None,
            runtimes,
            pythons(cfg.tflite_runtime_python),
            cfg.verify_timeout_s,
        )
        rescored.update(missing)
        for r in reports:
            if r.error is not None or r.predicted is None:
                failed.add(r.runtime)
                log.warning(
                    "published version %d could not be scored on %s (%s): no comparison there",
                    latest["version"],
                    r.runtime,
                    r.error,
                )
                continue
            scores.add(r.runtime, r.version, missing, [latest["labels"][i] for i in r.predicted])
    return len(rescored)


def remember(job: ExportJob, version: int, reports: list[RuntimeReport], seqs: list[int], labels: list[str]) -> None:
    """The new version's predictions on the holdout it was just verified on: the next export's baseline."""
    scores = PublishedScores(job.state_dir, version)
    for r in reports:
        if r.error is None and r.predicted is not None:
            scores.add(r.runtime, r.version, seqs, [labels[i] for i in r.predicted])
    try:
        scores.save()
    except OSError as err:  # published all the same; the next export scores this version itself
        log.warning("could not keep version %d's holdout predictions: %s", version, err)
