"""Each mode's last full conversion, kept so that an export whose backbone did not change only writes a new head.

In head mode the frozen part of the model (normalisation and backbone) is the
same at every export, so :meth:`Conversions.convert` writes the new head into
the kept file (head_patch.py, well under a second) instead of converting the
whole network again (15-60 s for EfficientNet-Lite0 on 2 cores, int8's
calibration included). A full conversion runs instead when:

- there is no kept conversion of the mode, or it is unreadable;
- the frozen part changed: a fingerprint of every non-head weight, the mode,
  the input size and the converting libraries' versions (``last_blocks`` and
  ``full`` modes train the backbone: every export of theirs is full);
- the kept one has served ``export.full_conversion_every - 1`` patched exports
  and is ``export.full_conversion_min_interval_s`` old: a full conversion
  recalibrates int8's activation ranges on today's stored examples, which the
  patched exports reuse, and cross-checks the patches. With exports every few
  seconds, every 10th converting in full (35-40 s on 2 cores) held new models
  up for 40% of the time (docs/benchmarks.md);
- the patch was refused (a graph that does not end as the converter makes it).

Every full conversion is checked at once: its own head written into it must
give back its very classifier (head_patch.classifier_difference). A converter
that folded something into the classifier's weights fails that check, and
the mode then converts fully at every export, saying so.

Kept in ``<state>/export-cache/conversions/<mode>.tflite`` with
``<mode>.json`` (the fingerprint, the file's sha256, the patched exports
since), each written by rename, the model first: a crash between the two
leaves a sha256 that does not match, which is a full conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np

from daemon.common.files import write_replacing
from daemon.export.converter import Deployable, convert
from daemon.export.head_patch import Head, PatchUnsupported, classifier_difference, head_of, patch_head
from daemon.export.published_scores import CACHE

log = logging.getLogger("sprout.export")

FORMAT = 1  # of the kept files; a change converts every mode fully once
_LIBRARIES = ("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert")


@dataclass(frozen=True)
class Converted:
    tflite: bytes
    how: Literal["full", "patched"]
    why: str  # why a full conversion ran, or which conversion the patch reused
    base: str  # sha256 of the full conversion this file's backbone comes from


def frozen_fingerprint(model: Deployable, mode: str, input_size: int) -> str:
    """sha256 of everything but the head that makes the converted file: weights, mode, size, libraries."""
    digest = hashlib.sha256()
    versions = {name: _version(name) for name in _LIBRARIES}
    digest.update(json.dumps([FORMAT, mode, input_size, versions], sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


class Conversions:
    def __init__(self, state_dir: Path, full_every: int, full_every_min_s: float = 0.0):
        self.root = state_dir / CACHE / "conversions"
        self.full_every = full_every  # export.full_conversion_every
        self.full_every_min_s = full_every_min_s  # export.full_conversion_min_interval_s

    def convert(
        self,
        model: Deployable,
        mode: str,
        input_size: int,
        calibration: Sequence[np.ndarray] = (),
        full: str | None = None,
        head: Head | None = None,
        fit: Callable[[bytes, str, bool], Head] | None = None,
    ) -> Converted:
        """``model`` in ``mode``: patched into the kept conversion when that is sound, converted in full otherwise
        (and whenever ``full`` gives a reason). ``head``: ``model``'s, as :func:`head_of` gives it for this mode's
        calibration images, when the caller has it already. ``fit``: the head to ship instead, fitted to the
        conversion it goes into (its bytes, its sha256, whether it was converted just now); it must not raise."""
        frozen = frozen_fingerprint(model, mode, input_size)
        head = head if head is not None else head_of(model, calibration if mode == "int8" else ())
        kept, why = (None, full) if full else self._kept(mode, frozen)
        if kept is not None:
            tflite, state = kept
            try:
                patched = patch_head(tflite, fit(tflite, state["sha256"], False) if fit else head, mode)
            except PatchUnsupported as err:
                why = f"the kept conversion could not take the new head ({err})"
            except Exception as err:  # a fault of the patch, not of the model: the full conversion still ships it
                log.warning("%s: writing the new head into the kept conversion failed: %r", mode, err)
                why = f"writing the new head failed ({err!r})"
            else:
                state["patched_since"] = int(state.get("patched_since", 0)) + 1
                try:
                    self._save(mode, None, state)
                except OSError as err:  # the count stays behind: a full conversion comes one export later
                    log.warning("could not count the patched %s export: %s", mode, err)
                why = f"head written into the full conversion of {state['converted']}"
                return Converted(patched, "patched", why, state["sha256"])
        tflite = convert(model, mode, input_size, calibration)
        self._keep(mode, frozen, tflite, head)
        sha = hashlib.sha256(tflite).hexdigest()
        if fit is not None:
            try:
                return Converted(patch_head(tflite, fit(tflite, sha, True), mode), "full", why, sha)
            except Exception as err:  # the fitted head's fault: the conversion ships with the head as trained
                log.warning(
                    "%s: writing the fitted head into the conversion failed (%r); shipping it as converted", mode, err
                )
        return Converted(tflite, "full", why, sha)

    def _kept(self, mode: str, frozen: str) -> tuple[tuple[bytes, dict] | None, str]:
        """(the kept file and its state, "") when a patch may reuse it, else (None, why not)."""
        try:
            state = json.loads((self.root / f"{mode}.json").read_text())
            tflite = (self.root / f"{mode}.tflite").read_bytes()
        except FileNotFoundError:
            return None, "no earlier conversion of this mode"
        except (OSError, ValueError) as err:
            return None, f"the kept conversion is unreadable ({err})"
        if not isinstance(state, dict) or state.get("sha256") != hashlib.sha256(tflite).hexdigest():
            return None, "the kept conversion is incomplete or damaged"
        if not state.get("patchable", False):
            return None, f"the converted file does not hold the head as trained ({state.get('unpatchable', '?')})"
        if state.get("frozen") != frozen:
            return None, "the backbone, the input size or a converting library changed"
        if self.full_every <= 1 or (
            int(state.get("patched_since", 0)) >= self.full_every - 1
            and time.time() - float(state.get("converted_at", 0.0)) >= self.full_every_min_s
        ):
            apart = (
                f", at least {self.full_every_min_s:g} s apart (export.full_conversion_min_interval_s)"
                if self.full_every_min_s > 0 and self.full_every > 1
                else ""
            )
            return None, f"every {self.full_every} exports convert in full (export.full_conversion_every){apart}"
        return (tflite, state), ""

    def _keep(self, mode: str, frozen: str, tflite: bytes, head: Head) -> None:
        """Keep a full conversion, after checking that a patch gives back its own classifier."""
        state: dict = {
            "frozen": frozen,
            "sha256": hashlib.sha256(tflite).hexdigest(),
            "patched_since": 0,
            "converted": _now(),
            "converted_at": time.time(),
            "patchable": True,
        }
        try:
            again = patch_head(tflite, head, mode)
            difference = classifier_difference(again, tflite)
            if difference is not None:
                raise PatchUnsupported(f"{difference} from the trained head's (a constant folded into them?)")
        except PatchUnsupported as err:
            state["patchable"], state["unpatchable"] = False, str(err)
            log.info("%s: every export will convert in full: %s", mode, err)
        try:
            self._save(mode, tflite, state)
        except OSError as err:  # the export stands; the next one converts in full
            log.warning("could not keep the %s conversion for the next export: %s", mode, err)

    def _save(self, mode: str, tflite: bytes | None, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if tflite is not None:
            write_replacing(self.root / f"{mode}.tflite", tflite)
        write_replacing(self.root / f"{mode}.json", json.dumps(state).encode())


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
