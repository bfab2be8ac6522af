"""Keep or discard: the seed's strictly-better rule, and the noise-aware rule.

Greedy hill-climbing on single runs keeps whatever happened to draw a lucky seed (the
kept "seed 42 -> 137" change of autoresearch #466). The noise-aware rule measures the
noise floor first (the baseline run k times; floor = the sample standard deviation of
one run), re-runs a candidate that looks better until it has k values, and keeps it
only if *both*

* Welch's t-test against the current best's values is significant in the right
  direction (one-sided p < 1 - confidence), and
* the mean improvement exceeds the noise floor, so a real but negligible gain
  measured very precisely does not advance the branch either.

A candidate that does not beat the best's mean on its first run is discarded at once:
the reruns are spent only on candidates that could be kept. Every decision carries its
reason in words, recorded in the ledger.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """``keep``/``discard`` once decided, or ``rerun`` when more values are needed first."""

    action: str  # "keep" | "discard" | "rerun"
    reason: str

    @property
    def keep(self) -> bool:
        return self.action == "keep"


def improvement(candidate: float, best: float, *, lower_is_better: bool) -> float:
    """How much better ``candidate`` is than ``best`` (positive = better), in metric units."""
    return best - candidate if lower_is_better else candidate - best


def noise_floor(baseline_values: Sequence[float]) -> float:
    """The spread of one run: the sample standard deviation of the baseline's replicates (0 for one run)."""
    return statistics.stdev(baseline_values) if len(baseline_values) >= 2 else 0.0


def strictly_better(candidate: float, best: float, *, lower_is_better: bool, name: str = "metric") -> Decision:
    """The seed's rule: keep iff strictly better than the current best; ties are discarded."""
    gain = improvement(candidate, best, lower_is_better=lower_is_better)
    if gain > 0:
        return Decision("keep", f"{name} {candidate:.6f} is better than the best {best:.6f}")
    word = "equals" if gain == 0 else "is worse than"
    return Decision("discard", f"{name} {candidate:.6f} {word} the best {best:.6f}")


def noise_aware(candidate: Sequence[float], best: Sequence[float], *, k: int, floor: float, confidence: float,
                lower_is_better: bool, name: str = "metric") -> Decision:
    """The noise-aware rule (module docstring); ``candidate`` grows by one run per ``rerun``."""
    if not candidate:
        raise ValueError("noise_aware needs at least one candidate value")
    best_mean = statistics.fmean(best)
    if len(candidate) == 1:
        first = candidate[0]
        if improvement(first, best_mean, lower_is_better=lower_is_better) <= 0:
            return Decision("discard", f"first run {name} {first:.6f} does not beat the best's mean {best_mean:.6f}")
    if len(candidate) < k:
        return Decision("rerun", f"{len(candidate)} of {k} runs")
    mean = statistics.fmean(candidate)
    gain = improvement(mean, best_mean, lower_is_better=lower_is_better)
    summary = f"mean {name} {mean:.6f} over {len(candidate)} runs vs the best's {best_mean:.6f}"
    if gain <= floor:
        return Decision("discard", f"{summary}: improvement {gain:+.6f} is within the noise floor {floor:.6f}")
    from ratiocinator.analysis.stats import welch  # scipy loads only for noise-aware sessions

    test = welch(best, candidate, confidence=confidence)
    alpha = 1 - confidence
    if test.p is None:  # no spread to test (both sides constant): the difference is exact
        return Decision("keep", f"{summary}: improvement {gain:+.6f} > noise floor {floor:.6f} (no spread to test)")
    one_sided = test.p / 2 if gain > 0 else 1 - test.p / 2
    if not one_sided < alpha or math.isnan(one_sided):
        return Decision("discard", f"{summary}: improvement {gain:+.6f} is not significant "
                                   f"(Welch one-sided p = {one_sided:.3g}, needs < {alpha:.3g})")
    return Decision("keep", f"{summary}: improvement {gain:+.6f} > noise floor {floor:.6f}, "
                            f"Welch one-sided p = {one_sided:.3g} < {alpha:.3g}")
