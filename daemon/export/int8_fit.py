"""An int8 file's classifier fitted to its own int8 backbone: bias corrected, then distilled where data allow.

The steps (bias_correction.py, int8_head.py) each fall back to the one
before: a fault in either is logged and the file ships with the classifier
it had, still verified and gated like any other. The head is written into
the conversion once (conversions.py ``fit``): each patch of EfficientNet-
Lite0's int8 file costs ~1.7 s on 2 cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from daemon.export import images as stored
from daemon.export.bias_correction import KeptErrors, correction_for
from daemon.export.conversions import frozen_fingerprint
from daemon.export.converter import Deployable
from daemon.export.float_reference import backbone_embeddings
from daemon.export.head_patch import Head
from daemon.export.int8_head import distillation_sample, distilled
from daemon.export.job import ExportJob
from daemon.export.verification import pythons
from daemon.store.reader import StoreReader

log = logging.getLogger("sprout.export")

# Fewer examples than this overfit the distilled head (on Fashion-MNIST, 100 lost what bias correction won;
# 300 matched it): only the bias is corrected then.
MIN_DISTILLATION_EXAMPLES = 300


class Int8Fit:
    """The head to write into an int8 conversion, fitted to it (per ``export.int8_bias_correction`` and
    ``export.int8_distillation_examples``): called with the conversion's bytes, its sha256 and whether it was
    converted just now; :attr:`metrics` then says how, for the manifest. Never raises: a step that fails is
    logged and the one before it ships."""

    def __init__(
        self,
        job: ExportJob,
        model: Deployable,
        head: Head,
        calibration: list[np.ndarray],
        distillation_seqs: Sequence[int],
    ):
        self.job, self.model, self.head = job, model, head
        self.calibration, self.distillation_seqs = calibration, list(distillation_seqs)
        self.metrics: dict[str, Any] = {}

    def __call__(self, tflite: bytes, base: str, converted_now: bool) -> Head:
        self.metrics = {}
        cfg = self.job.export
        if not cfg.int8_bias_correction:
            return self.head
        started = time.perf_counter()
        try:
            correction = correction_for(
                tflite,
                base,
                self.head,
                self.calibration,
                KeptErrors(self.job.state_dir),
                cfg.runtimes[0],
                pythons(cfg.tflite_runtime_python),
                cfg.verify_timeout_s,
            )
        except Exception as err:  # the correction's fault, not the model's: the head as trained is still judged
            log.warning("int8: bias correction failed (%s); the head as trained is verified", err)
            return self.head
        self.metrics["int8_bias_correction_logits"] = round(correction.logit_shift, 4)
        log.info(
            "int8: bias corrected in %.1fs for the embedding error measured on %d calibration images "
            "(logits moved by up to %.3f)",
            time.perf_counter() - started,
            correction.error.images,
            correction.logit_shift,
        )
        if len(self.distillation_seqs) < MIN_DISTILLATION_EXAMPLES:
            return correction.head
        try:
            fitted, used = self._distilled(tflite, base, correction.head, converted_now)
        except Exception as err:  # the distillation's fault: the bias-corrected head ships
            log.warning("int8: distilling the classifier failed (%s); the bias-corrected one is verified", err)
            return correction.head
        if fitted is None:
            return correction.head
        self.metrics["int8_distillation_examples"] = used
        return fitted

    def _distilled(self, tflite: bytes, base: str, start: Head, converted_now: bool) -> tuple[Head | None, int]:
        """The distilled head and the examples it saw; (None, 0) when too few are at hand. Only a conversion
        made now embeds the sample (a quarter of it at most on the float backbone, all on the int8 file): a
        patched export distils on the embeddings kept for its conversion and runs nothing."""
        cfg, size = self.job.export, self.job.model.input_size
        started = time.perf_counter()
        reader = StoreReader(self.job.store)
        try:
            sample = distillation_sample(
                self.distillation_seqs,
                lambda seqs: stored.decoded(reader, seqs, size),
                lambda pixels: backbone_embeddings(self.model, pixels),
                frozen_fingerprint(self.model, "float", size),
                tflite,
                base,
                self.job.state_dir,
                cfg.runtimes[0],
                pythons(cfg.tflite_runtime_python),
                cfg.verify_timeout_s,
                # Nothing is run in a patched export: the float backbone on a few hundred images cost the
                # freshness run's patched exports 5-15 s; a full conversion embeds them.
                float_budget=max(MIN_DISTILLATION_EXAMPLES, cfg.int8_distillation_examples // 4)
                if converted_now
                else 0,
                int8_now=converted_now,
            )
        finally:
            reader.close()
        if sample is None or len(sample.int8_embeddings) < MIN_DISTILLATION_EXAMPLES:
            log.info("int8: too few training examples' int8 embeddings kept to distil on; the bias is corrected")
            return None, 0
        head = distilled(self.head, start, sample)
        log.info(
            "int8: classifier distilled on %d training examples' int8 embeddings in %.1fs (%d images run now, the "
            "rest kept)",
            len(sample.int8_embeddings),
            time.perf_counter() - started,
            sample.computed,
        )
        return head, len(sample.int8_embeddings)
