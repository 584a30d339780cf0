"""int8 bias correction: the classifier's bias moved by the mean error the int8 backbone makes on the embedding.

An int8 backbone does not hand the classifier the float embedding e but
e + d, and its rounding and clipping do not average out: each embedding
channel comes out shifted by a mean error of its own. The float classifier
W e + b then sees W e + W d + b, a bias on every class logit that favours
some classes over others. Its expectation, W E[d], is measured on the int8
export's calibration images (the float embeddings are computed for the
int8 head anyway; the int8 ones by running the converted file with its
embedding as a second output on the first runtime, ~0.3 s for 100 images on
ai-edge-litert) and taken out of the bias: b' = b - W E[d]. The weights and
the backbone stay as converted; only the bias is written, by the same patch
that writes a new head (head_patch.py).

The error belongs to the int8 backbone, not to the head: it is measured once
per full conversion and kept (``<state>/export-cache/int8-embedding-error.npz``),
so an export that only writes a new head into that conversion corrects its
bias at no cost.

This is the last-layer case of the bias correction of Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction" (2019), with
the expectation measured on data rather than derived. docs/quantization.md
records what it gained on Fashion-MNIST and on a second data set.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.common.files import replacing
from daemon.export.head_patch import Head, PatchUnsupported, embedding_quantization, patch_head, with_embedding_output
from daemon.export.published_scores import CACHE
from daemon.export.verification import run_each

log = logging.getLogger("sprout.export")


class CorrectionFailed(Exception):
    """The int8 embeddings could not be measured; the uncorrected file still ships if it passes the gates."""


@dataclass(frozen=True)
class EmbeddingError:
    """The mean of int8 minus float embedding over ``images`` calibration images, for one int8 backbone."""

    mean: np.ndarray  # (embedding_size,) float64
    images: int


@dataclass(frozen=True)
class Correction:
    head: Head  # the classifier with the corrected bias
    error: EmbeddingError
    logit_shift: float  # largest change of any class's logit (the bias moved by it), in logits


def embedding_error(head: Head, int8_embeddings: np.ndarray) -> EmbeddingError:
    """The mean error of dequantised ``int8_embeddings`` (N, embedding_size) against the float ones of the same
    calibration images (``head.calibration_embeddings``)."""
    if head.calibration_embeddings is None or len(head.calibration_embeddings) == 0:
        raise CorrectionFailed("no float embeddings of calibration images to compare with")
    if int8_embeddings.shape != head.calibration_embeddings.shape:
        raise CorrectionFailed(
            f"int8 embeddings of shape {int8_embeddings.shape} against float ones of "
            f"{head.calibration_embeddings.shape}"
        )
    difference = int8_embeddings.astype(np.float64) - head.calibration_embeddings.astype(np.float64)
    return EmbeddingError(difference.mean(axis=0), len(int8_embeddings))


def corrected(head: Head, error: EmbeddingError) -> Correction:
    """``head`` with its bias moved so that, on the int8 backbone's embeddings, its logits average the float
    head's on the float embeddings. The weights stay, and so does the output range (PT2E's, from the float
    logits of the calibration images: the corrected int8 logits have their mean)."""
    if error.mean.shape != head.weight.shape[1:]:
        raise CorrectionFailed(
            f"an embedding error of shape {error.mean.shape} for a classifier of {head.weight.shape}"
        )
    shift = head.weight.astype(np.float64) @ error.mean
    bias = (head.bias.astype(np.float64) - shift).astype(np.float32)
    return Correction(
        Head(head.weight, bias, head.calibration_logits, head.calibration_embeddings), error, float(np.abs(shift).max())
    )


def int8_embeddings(
    tflite: bytes,
    images: Sequence[np.ndarray],
    runtime: str,
    pythons: dict[str, Path] | None,
    timeout_s: float,
) -> np.ndarray:
    """The dequantised embeddings the int8 ``tflite`` computes for uint8 (H, W, 3) ``images`` on ``runtime``, in
    a process of its own as every verification run (an interpreter that crashes takes only that process)."""
    quantization = embedding_quantization(tflite)
    if quantization is None:
        raise CorrectionFailed("the classifier's input is not quantised: not an int8 file")
    exposing = with_embedding_output(tflite)
    [report] = run_each(exposing, {runtime: np.stack(images)}, None, None, pythons, timeout_s, keep_output=1)
    if report.error is not None or report.kept is None:
        raise CorrectionFailed(f"{runtime} could not run the calibration images: {report.error}")
    scale, zero_point = quantization
    return ((report.kept.astype(np.float32) - zero_point) * scale).reshape(len(images), -1)


def apply(tflite: bytes, head: Head) -> bytes:
    """``tflite`` (an int8 file without metadata) with a corrected ``head`` written in."""
    try:
        return patch_head(tflite, head, "int8")
    except PatchUnsupported as err:
        raise CorrectionFailed(f"the corrected head could not be written: {err}") from err


class KeptErrors:
    """The embedding error measured for each int8 backbone, kept by the sha256 of its full conversion: the error
    depends on the backbone alone, so the exports that patch a new head into it reuse it (no interpreter run)."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / CACHE / "int8-embedding-error.npz"

    def load(self, base: str) -> EmbeddingError | None:
        try:
            with np.load(self.path) as saved:
                if str(saved["base"]) != base:
                    return None
                return EmbeddingError(saved["mean"].astype(np.float64), int(saved["images"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # unreadable: measured again
            log.warning("the kept int8 embedding error is unreadable (%s); measuring it again", err)
            return None

    def save(self, base: str, error: EmbeddingError) -> None:
        with replacing(self.path) as f:
            np.savez(f, base=np.array(base), mean=error.mean, images=np.array(error.images))


def correction_for(
    tflite: bytes,
    base: str,
    head: Head,
    images: Sequence[np.ndarray],
    kept: KeptErrors,
    runtime: str,
    pythons: dict[str, Path] | None,
    timeout_s: float,
) -> Correction:
    """``head`` bias-corrected for ``tflite`` (an int8 file from the full conversion whose sha256 is ``base``).
    The embedding error is ``base``'s kept one, or measured on ``images`` (the calibration images ``head``'s
    calibration embeddings are of) and kept."""
    error = kept.load(base)
    if error is None:
        error = embedding_error(head, int8_embeddings(tflite, images, runtime, pythons, timeout_s))
        try:
            kept.save(base, error)
        except OSError as err:  # this export is corrected all the same; the next one measures again
            log.warning("could not keep the int8 embedding error: %s", err)
    return corrected(head, error)
