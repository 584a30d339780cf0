"""How often the gates refuse a candidate, by holdout size and true difference: the point rule against McNemar's.

Exact, not simulated: each holdout image is independently one the candidate
loses against its reference (probability ``lost``), one it gains (``gained``),
or neither, and every (lost, gained) count is weighed by its multinomial
probability. A candidate is refused under the point rule when its measured
drop passes the limit; under the shipped rule when, in addition, McNemar's
exact one-sided p-value is at most the significance (daemon/export/gates.py).

    .venv/bin/python bench/gates.py
"""

from __future__ import annotations

import argparse
import math

from daemon.export.significance import binomial_tail


def refusal_chance(images: int, lost: float, gained: float, limit_pts: float, alpha: float) -> tuple[float, float]:
    """P(refused) under the point rule and under the point rule plus McNemar at ``alpha``."""
    point = shipped = 0.0
    log_fact = [math.lgamma(i + 1) for i in range(images + 2)]
    same = 1.0 - lost - gained
    for n_lost in range(images + 1):
        for n_gained in range(images - n_lost + 1):
            if 100.0 * (n_lost - n_gained) / images <= limit_pts:
                continue
            rest = images - n_lost - n_gained
            log_p = log_fact[images] - log_fact[n_lost] - log_fact[n_gained] - log_fact[rest]
            log_p += _log(lost, n_lost) + _log(gained, n_gained) + _log(same, rest)
            p = math.exp(log_p) if log_p > -745 else 0.0
            point += p
            if binomial_tail(n_lost, n_lost + n_gained) <= alpha:
                shipped += p
    return point, shipped


def _log(p: float, k: int) -> float:
    if k == 0:
        return 0.0
    return k * math.log(p) if p > 0 else -math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-pts", type=float, default=1.0, help="export.max_drop_pts (default 1.0)")
    ap.add_argument("--alpha", type=float, default=0.05, help="export.refusal_significance (default 0.05)")
    ap.add_argument("--holdouts", default="50,100,260,400", help="holdout sizes, comma-separated")
    args = ap.parse_args()
    # (what it is, share of images lost, share gained): a disagreement rate like int8 against float's, 2-3%.
    cases = [
        ("no worse (1% lost, 1% gained)", 0.01, 0.01),
        ("0.5 points worse (1.5%, 1%)", 0.015, 0.01),
        ("1 point worse, at the limit (2%, 1%)", 0.02, 0.01),
        ("2 points worse (3%, 1%)", 0.03, 0.01),
        ("4 points worse (5%, 1%)", 0.05, 0.01),
    ]
    sizes = [int(s) for s in args.holdouts.split(",")]
    print(
        f"P(refused), limit {args.limit_pts} points; point rule -> with McNemar's exact test at {args.alpha}",
        flush=True,
    )
    print("| true difference | " + " | ".join(f"{n} images" for n in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name, lost, gained in cases:
        cells = []
        for n in sizes:
            point, shipped = refusal_chance(n, lost, gained, args.limit_pts, args.alpha)
            cells.append(f"{100 * point:.0f}% -> {100 * shipped:.0f}%")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
