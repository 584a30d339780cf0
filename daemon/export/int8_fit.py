"""An int8 file's classifier fitted to its own int8 backbone: bias corrected, then distilled where data allow.

The steps (bias_correction.py, int8_head.py) each fall back to the one
before: a fault in either is logged and the file ships with the classifier
it had, still verified and gated like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from daemon.export import images as stored
from daemon.export.bias_correction import KeptErrors, apply, correct_int8
from daemon.export.conversions import Converted, frozen_fingerprint
from daemon.export.converter import Deployable
from daemon.export.head_patch import Head
from daemon.export.int8_head import distillation_sample, distilled
from daemon.export.job import ExportJob
from daemon.export.verification import pythons
from daemon.store.reader import StoreReader

log = logging.getLogger("sprout.export")

# Fewer examples than this overfit the distilled head (on Fashion-MNIST, 100 lost what bias correction won;
# 300 matched it): only the bias is corrected then.
MIN_DISTILLATION_EXAMPLES = 300


def fitted_int8(
    job: ExportJob,
    model: Deployable,
    conversion: Converted,
    head: Head,
    calibration: list[np.ndarray],
    distillation_seqs: Sequence[int],
) -> tuple[bytes, dict[str, Any]]:
    """The int8 file with its classifier fitted (per ``export.int8_bias_correction`` and
    ``export.int8_distillation_examples``), and the manifest metrics that say how."""
    cfg = job.export
    if not cfg.int8_bias_correction:
        return conversion.tflite, {}
    runtime, python_of = cfg.runtimes[0], pythons(cfg.tflite_runtime_python)
    started = time.perf_counter()
    try:
        corrected_file, correction = correct_int8(
            conversion.tflite,
            conversion.base,
            head,
            calibration,
            KeptErrors(job.state_dir),
            runtime,
            python_of,
            cfg.verify_timeout_s,
        )
    except Exception as err:  # the correction's fault, not the model's: the file as converted is still judged
        log.warning("int8: bias correction failed (%s); verifying the file as converted", err)
        return conversion.tflite, {}
    metrics: dict[str, Any] = {"int8_bias_correction_logits": round(correction.logit_shift, 4)}
    log.info(
        "int8: bias corrected in %.1fs for the embedding error measured on %d calibration images "
        "(logits moved by up to %.3f)",
        time.perf_counter() - started,
        correction.error.images,
        correction.logit_shift,
    )
    if len(distillation_seqs) < MIN_DISTILLATION_EXAMPLES:
        return corrected_file, metrics
    started = time.perf_counter()
    reader = StoreReader(job.state_dir / "examples.db")
    try:
        sample = distillation_sample(
            distillation_seqs,
            lambda seqs: stored.decoded(reader, seqs, job.model.input_size),
            lambda pixels: float_embeddings(model, pixels),
            frozen_fingerprint(model, "float", job.model.input_size),
            conversion.tflite,
            conversion.base,
            job.state_dir,
            runtime,
            python_of,
            cfg.verify_timeout_s,
        )
        fitted = apply(conversion.tflite, distilled(head, correction.head, sample))
    except Exception as err:  # the distillation's fault: the bias-corrected classifier ships
        log.warning("int8: distilling the classifier failed (%s); the bias-corrected one is verified", err)
        return corrected_file, metrics
    finally:
        reader.close()
    log.info(
        "int8: classifier distilled on %d training examples' int8 embeddings in %.1fs (%d run now, the rest kept)",
        len(sample.int8_embeddings),
        time.perf_counter() - started,
        sample.computed,
    )
    metrics["int8_distillation_examples"] = len(sample.int8_embeddings)
    return fitted, metrics


@torch.no_grad()
def float_embeddings(model: Deployable, pixels: np.ndarray) -> np.ndarray:
    """The float backbone's embeddings of uint8 (N, H, W, 3) ``pixels``."""
    out = []
    for start in range(0, len(pixels), 64):
        x = torch.from_numpy(pixels[start : start + 64].astype(np.float32)).permute(0, 3, 1, 2)
        out.append(model.backbone(x * model.scale - model.shift).numpy())
    return np.concatenate(out)
