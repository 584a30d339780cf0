"""The health gates of a staged rollout: the new version's figures from the field against the version it replaces.

What each device reported is added up per version in the store (daemon/store/field.py): the new
version's figures are its cohort's, the replaced version's are the rest of the fleet's. A stage moves
on when the new version has been judged on enough devices and predictions, none of its gates is
breached and it has stayed ``min_stage_s``; a breach halts it at once, whatever the time.

Five hundred predictions measure a correction rate to about 1.6 points (at 15% corrected): a fixed
margin on the point estimate stopped 8% of good canaries and let a third of those 3 points worse
through (bench/canary.py, docs/benchmarks.md). So each comparison carries its standard error: a gate
is breached when the difference is past its margin *and* ``Z`` standard errors from none; a stage moves
on when the difference is ``Z`` standard errors inside every margin; in between, more reports decide.

>>> from daemon.common.settings import RolloutSettings
>>> from daemon.store.field import VersionInField
>>> bins = (0,) * 10
>>> old = VersionInField(1, 80, 80, 0, 8000, 7200.0, 80, 0.0, bins, 0.0)
>>> bad = VersionInField(2, 25, 25, 0, 600, 450.0, 6, 0.0, bins, 0.0)
>>> judge(bad, old, RolloutSettings(min_stage_s=0), stage_age_s=10).action
'halt'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from daemon.common.settings import RolloutSettings
from daemon.store.field import VersionInField

Z = 2.5  # standard errors a difference must clear: the gates look after every report (bench/canary.py)


def _score_variance(v: VersionInField) -> float:
    """The variance of the top-1 scores, from their histogram by tenths (each at its tenth's middle)."""
    n, mean = v.predictions, v.mean_confidence
    if not n or mean is None:
        return 0.0
    bins = v.confidence_bins
    return sum(count * ((i + 0.5) / len(bins) - mean) ** 2 for i, count in enumerate(bins)) / n


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Literal["wait", "advance", "halt"]
    reason: str
    figures: dict[str, Any]  # what the verdict was made on, for the registry's history


def figures(v: VersionInField | None) -> dict[str, Any]:
    if v is None:
        return {"devices": 0, "predictions": 0}
    return {
        "devices": v.devices,
        "loads": v.loads,
        "load_failures": v.load_failures,
        "predictions": v.predictions,
        "mean_confidence": v.mean_confidence,
        "correction_share": v.correction_share,
    }


def judge(new: VersionInField | None, old: VersionInField | None, cfg: RolloutSettings, stage_age_s: float) -> Verdict:
    """What to do with the version rolling out, from its figures (``new``) and the replaced one's (``old``)."""
    seen = {"new": figures(new), "replaced": figures(old)}
    if new is None:
        return Verdict("wait", "no device has reported on it yet", seen)
    tries = new.loads + new.load_failures
    failing = new.load_failure_share
    if tries >= cfg.min_devices and failing is not None and failing > cfg.max_load_failure_share:
        return Verdict(
            "halt",
            f"{new.load_failures} of {tries} loads failed on devices ({100 * failing:.1f}%, rollout."
            f"max_load_failure_share {100 * cfg.max_load_failure_share:g}%)",
            seen,
        )
    if new.devices < cfg.min_devices or new.predictions < cfg.min_predictions:
        return Verdict(
            "wait",
            f"{new.devices} devices and {new.predictions} predictions reported; judged from "
            f"{cfg.min_devices} and {cfg.min_predictions} (rollout.min_devices, min_predictions)",
            seen,
        )
    if old is None or old.predictions < cfg.min_predictions or old.mean_confidence is None:
        return Verdict(
            "wait",
            f"too few reports on the version it replaces to compare with ({figures(old)['predictions']} "
            f"predictions): promote it by hand, or wait for them",
            seen,
        )
    assert new.mean_confidence is not None and new.correction_share is not None  # predictions > 0
    assert old.correction_share is not None
    drop = old.mean_confidence - new.mean_confidence
    drop_se = math.sqrt(_score_variance(new) / new.predictions + _score_variance(old) / old.predictions)
    p1, p0 = new.correction_share, old.correction_share
    rise = p1 - p0
    rise_se = math.sqrt(p1 * (1 - p1) / new.predictions + p0 * (1 - p0) / old.predictions)
    seen["standard_errors"] = {"confidence_drop": drop_se, "correction_rise": rise_se}
    if drop > cfg.max_confidence_drop and drop > Z * drop_se:
        return Verdict(
            "halt",
            f"mean top-1 score {new.mean_confidence:.3f} against {old.mean_confidence:.3f} for the version it "
            f"replaces: {100 * drop:.1f} ± {100 * drop_se:.1f} points lower (rollout.max_confidence_drop "
            f"{100 * cfg.max_confidence_drop:g})",
            seen,
        )
    if rise > cfg.max_correction_rise and rise > Z * rise_se:
        return Verdict(
            "halt",
            f"users corrected {100 * p1:.1f}% of its predictions against {100 * p0:.1f}%: {100 * rise:.1f} ± "
            f"{100 * rise_se:.1f} points more (rollout.max_correction_rise {100 * cfg.max_correction_rise:g})",
            seen,
        )
    if drop + Z * drop_se > cfg.max_confidence_drop or rise + Z * rise_se > cfg.max_correction_rise:
        return Verdict(
            "wait",
            f"too close to a gate to tell yet: mean top-1 score {100 * drop:+.1f} ± {100 * drop_se:.1f} points "
            f"lower, corrected {100 * rise:+.1f} ± {100 * rise_se:.1f} points more; more reports decide",
            seen,
        )
    if stage_age_s < cfg.min_stage_s:
        return Verdict("wait", f"figures hold; {cfg.min_stage_s - stage_age_s:.0f} s more at this stage", seen)
    return Verdict(
        "advance",
        f"figures hold on {new.devices} devices, {new.predictions} predictions: mean top-1 score "
        f"{new.mean_confidence:.3f} (replaced {old.mean_confidence:.3f}), corrected {100 * new.correction_share:.1f}% "
        f"({100 * old.correction_share:.1f}%), load failures {100 * (failing or 0):.1f}%",
        seen,
    )
