"""Verifying a patched export in about a second: the new classifier on the embeddings each interpreter computed.

A patched file (head_patch.py) holds its kept full conversion's backbone byte
for byte, and an interpreter computes the same embedding from the same image
with the same bytes. So each runtime's embedding of each holdout image is
kept (``<state>/export-cache/embeddings/<mode>.npz``, tied to the kept
conversion's sha256), and a patched candidate is verified on each runtime by:

1. the classifier alone (head_patch.classifier_only: the file's own ops on its
   own constants) on the embeddings that runtime computed before: the
   probabilities the whole file gives for those images;
2. the whole file, with its embedding as a second output
   (head_patch.with_embedding_output), on the holdout images never run on this
   backbone (new examples; all of them at the first patched export), whose
   embeddings are kept for the next export;
3. the very file, as devices run it, on a sample of the holdout (``SAMPLE``
   images spread over it): it loads and runs, and its predictions must be
   those of 1 and 2 (top-1 equal, probabilities within ``TOLERANCE``), or the
   kept embeddings are dropped and every image is run on the file as before.

The gates then judge every holdout image, as after a whole verification: no
image is left out, so no statistical bound is needed. tflite-runtime 2.14
runs int8 EfficientNet-Lite0 at ~30 ms an image (docs/quantization.md): 400
images were 12 s of every export; the classifier alone takes microseconds.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from daemon.common.files import replacing
from daemon.export.head_patch import PatchUnsupported, classifier_only, with_embedding_output
from daemon.export.published_scores import CACHE
from daemon.export.verification import RuntimeReport, run_each, scored

log = logging.getLogger("sprout.export")

SAMPLE = 16  # kept holdout images the whole file is run on beside the new ones, to check step 1 against it
TOLERANCE = 1e-4  # most a probability may differ between the classifier alone and the whole file


class Embeddings:
    """Each runtime's embedding of each holdout image (by store seq), for one network: ``name``'s kept
    conversion (a mode), or the float model (float_reference.py)."""

    def __init__(self, state_dir: Path, name: str):
        self.path = state_dir / CACHE / "embeddings" / f"{name}.npz"

    def load(self, base: str) -> dict[str, dict[int, np.ndarray]]:
        """runtime -> seq -> embedding, of the conversion whose sha256 is ``base``; empty for another one."""
        try:
            with np.load(self.path) as saved:
                if str(saved["base"]) != base:
                    return {}
                found: dict[str, dict[int, np.ndarray]] = {}
                for runtime in [str(r) for r in saved["runtimes"]]:
                    seqs, values = saved[f"{runtime}/seqs"], saved[f"{runtime}/values"]
                    found[runtime] = {int(s): v for s, v in zip(seqs, values, strict=True)}
                return found
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:  # a cut .npz is a BadZipFile
            if not isinstance(err, FileNotFoundError):
                log.info("kept embeddings unreadable (%s): the whole holdout is run on the file", err)
            return {}

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    def save(self, base: str, embeddings: dict[str, dict[int, np.ndarray]], holdout: Sequence[int]) -> None:
        """Keep ``embeddings`` of the ``holdout`` seqs (older ones are dropped: the holdout moves on)."""
        wanted = set(holdout)
        arrays: dict[str, Any] = {"base": np.array(base), "runtimes": np.array(list(embeddings))}
        for runtime, by_seq in embeddings.items():
            seqs = sorted(s for s in by_seq if s in wanted)
            arrays[f"{runtime}/seqs"] = np.array(seqs, dtype=np.int64)
            arrays[f"{runtime}/values"] = np.stack([by_seq[s] for s in seqs]) if seqs else np.zeros((0,))
        with replacing(self.path) as f:
            np.savez(f, **arrays)


def keep_embeddings(embeddings: Embeddings, base: str, reports: list[RuntimeReport], seqs: Sequence[int]) -> None:
    """Keep the holdout's embeddings that :func:`verify_patched`'s reports carry."""
    kept = {r.runtime: dict(zip(seqs, r.kept, strict=True)) for r in reports if r.error is None and r.kept is not None}
    if not kept:
        return
    try:
        embeddings.save(base, kept, seqs)
    except OSError as err:  # the verification stands; the next patched export runs its new images again
        log.warning("could not keep the holdout's embeddings: %s", err)


def verify_patched(
    tflite: bytes,
    base: str,
    embeddings: Embeddings,
    seqs: Sequence[int],
    images: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    runtimes: Sequence[str],
    pythons: dict[str, Path] | None,
    timeout_s: float,
) -> tuple[list[RuntimeReport], int] | None:
    """(the reports of a whole-holdout verification of ``tflite``, computed as above; how many images came from
    kept embeddings), or None when it cannot be (a graph without the converter's classifier, a runtime failed,
    the sample disagreed): then verify the file on every image."""
    try:
        exposing = with_embedding_output(tflite)
        head = classifier_only(tflite)
    except PatchUnsupported:
        return None
    known = embeddings.load(base)
    cached = [i for i, s in enumerate(seqs) if all(s in known.get(r, {}) for r in runtimes)]
    new = sorted(set(range(len(seqs))) - set(cached))
    sample = sorted({int(k) for k in np.linspace(0, len(seqs) - 1, min(SAMPLE, len(seqs))).round()})
    runs: dict[str, Callable[[], list[RuntimeReport]]] = {
        # The very file, as devices run it, on a sample.
        "file": lambda: run_each(
            tflite, {r: images[sample] for r in runtimes}, labels[sample], reference[sample], pythons, timeout_s
        ),
    }
    if cached:  # the classifier alone on the embeddings each runtime computed earlier
        runs["head"] = lambda: run_each(
            head,
            {r: np.stack([known[r][seqs[i]] for i in cached]) for r in runtimes},
            None,
            None,
            pythons,
            timeout_s,
            tensors=True,
        )
    if new:  # the images never run on this backbone: the whole file, with its embedding as a second output
        runs["new"] = lambda: run_each(
            exposing, {r: images[new] for r in runtimes}, None, None, pythons, timeout_s, keep_output=1
        )
    # Every runtime's runs at once: processes that mostly wait on their imports.
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
        done = {name: dict(zip(runtimes, future.result(), strict=True)) for name, future in futures.items()}
    reports = []
    for runtime in runtimes:
        ran = {name: by_runtime[runtime] for name, by_runtime in done.items()}
        if any(r.error is not None or r.probabilities is None for r in ran.values()):
            return None  # the whole verification says what failed, in its own words
        on_file = ran["file"]
        assert on_file.probabilities is not None
        classes = {r.probabilities.shape[1:] for r in ran.values() if r.probabilities is not None}
        if len(classes) != 1:  # the classifier alone and the file disagree on the outputs: not this shortcut's case
            return None
        probabilities = np.zeros((len(seqs), on_file.probabilities.shape[1]), np.float32)
        kept: list[np.ndarray | None] = [known.get(runtime, {}).get(s) for s in seqs]
        if cached:
            probabilities[cached] = ran["head"].probabilities
        if new:
            probabilities[new] = ran["new"].probabilities
            for k, i in enumerate(new):
                kept[i] = None if ran["new"].kept is None else ran["new"].kept[k]
        if not np.array_equal(on_file.probabilities.argmax(1), probabilities[sample].argmax(1)) or (
            np.abs(on_file.probabilities - probabilities[sample]).max() > TOLERANCE
        ):
            log.warning(
                "%s: the classifier on kept embeddings disagreed with the whole file on a sample; verifying every "
                "holdout image on the file",
                runtime,
            )
            embeddings.forget()
            return None
        reports.append(
            scored(
                runtime,
                on_file.version,
                on_file.input_dtype or "uint8",
                probabilities,
                np.array([on_file.latency_ms or 0.0]),
                labels,
                reference,
                np.stack(kept) if all(k is not None for k in kept) else None,  # type: ignore[arg-type]
            )
        )
    return reports, len(cached)
