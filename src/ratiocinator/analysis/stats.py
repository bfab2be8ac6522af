"""Statistics for honest noise reporting over replicate runs of experiment arms.

A paper built from a handful of seeds per arm must say how sure it is, and must not
manufacture certainty where the data cannot give any. Everything here is pure (no
I/O) and follows three rules:

* Undefined is ``None``, never ``nan``/``inf`` and never a made-up number: the std of
  one run, a p-value between two zero-variance arms, an F with no residual error.
* Non-finite inputs are rejected with ``ValueError("non-finite value ...")``. A
  diverged run is a fact about the run, not a sample of its noise, so callers filter
  NaN/inf (and report how many they dropped) before calling.
* scipy does the distribution work (t, F, Welch, bootstrap); this module decides
  which question is well posed and packages the answer.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ratiocinator.analysis.lazy import scipy_stats as stats

__all__ = [
    "BOOTSTRAP_MIN_N",
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "Anova",
    "AnovaRow",
    "Comparison",
    "Describe",
    "Interval",
    "LevelMean",
    "anova",
    "describe",
    "holm",
    "marginal_means",
    "welch",
]

CONFIDENCE = 0.95
# Below ~10 points a bootstrap distribution is a handful of distinct means: its
# interval looks precise but is not, so small arms get only the t interval.
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 4999

_ANOVA_KIND = "type II sums of squares, OLS with treatment coding"
# Bound on resampled values held in memory at once by the bootstrap (n * batch).
_BOOTSTRAP_CELLS = 1 << 20


def _bootstrap_rng_arg() -> str:
    """scipy >= 1.15 names the seed argument `rng`; older releases only know `random_state`."""
    return "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"

# A residual sum of squares below n * (factor * eps * max|y|)^2 is rounding, not
# error: an exact fit must read as "no residual", not as a huge F.
_RSS_ROUNDING_FACTOR = 1e3

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Interval:
    """A confidence interval and the method that produced it."""

    low: float
    high: float
    method: str  # "t", "bootstrap-bca", "bootstrap-percentile" or "welch-t"


@dataclass(frozen=True)
class Describe:
    """Summary of one arm's replicate values; fields that need more data are None."""

    n: int
    mean: float | None  # None when n == 0
    std: float | None  # sample std (ddof=1); None when n < 2
    se: float | None  # std / sqrt(n); None when n < 2
    ci: Interval | None  # t interval of the mean; None when n < 2; a point when std == 0
    bootstrap_ci: Interval | None  # only when n >= BOOTSTRAP_MIN_N and std > 0
    min: float | None
    max: float | None


@dataclass(frozen=True)
class Comparison:
    """`other` against `baseline`: diff = mean(other) - mean(baseline)."""

    n_baseline: int
    n_other: int
    diff: float | None  # None if either side has n == 0
    diff_ci: Interval | None  # Welch CI; None if either n < 2 or both variances are 0
    t: float | None
    df: float | None  # Welch-Satterthwaite degrees of freedom
    p: float | None  # two-sided Welch p; None where undefined
    hedges_g: float | None  # pooled-sd standardized difference, small-sample corrected
    baseline_std: float | None  # sample std of baseline
    sigma_units: float | None  # diff / baseline_std: distance in baseline sigma, NOT a z-score


@dataclass(frozen=True)
class AnovaRow:
    """One term of an ANOVA table."""

    term: str  # factor name, or "A × B" for a two-way interaction
    df: int  # 0 when the term is fully confounded with the terms it is adjusted for
    sum_sq: float
    mean_sq: float | None  # None when df == 0
    f: float | None  # None if df == 0 or the residual mean square is 0
    p: float | None
    partial_eta_sq: float | None  # SS_term / (SS_term + SS_resid); None if that is 0 / 0


@dataclass(frozen=True)
class Anova:
    """A factorial ANOVA table over the factors that varied."""

    rows: tuple[AnovaRow, ...]  # main effects in factor order, then two-way interactions
    residual_df: int
    residual_sum_sq: float
    n: int
    interactions: bool  # whether two-way interactions were included
    kind: str


@dataclass(frozen=True)
class LevelMean:
    """The pooled observations at one level of a factor."""

    level: str
    describe: Describe
    indices: tuple[int, ...]  # which observations were pooled


def describe(values: Sequence[float], *, confidence: float = CONFIDENCE, seed: int = 0,
             bootstrap: bool = True) -> Describe:
    """Mean, spread and confidence intervals of one arm's replicate values.

    The t interval is always given for n >= 2; the bootstrap interval only where it
    can add something (n >= BOOTSTRAP_MIN_N, non-zero spread). `seed` makes the
    bootstrap reproducible, so a regenerated report prints the same numbers;
    `bootstrap=False` skips it where no one reads it.
    """
    _check_confidence(confidence)
    return _describe(_as_values(values, "values"), confidence, seed, bootstrap)


def _describe(x: FloatArray, confidence: float, seed: int, bootstrap: bool = True) -> Describe:
    """`describe` of already validated values."""
    n = int(x.size)
    if n == 0:
        return Describe(n=0, mean=None, std=None, se=None, ci=None, bootstrap_ci=None, min=None, max=None)
    mean, std = _mean_std(x)
    assert mean is not None
    low, high = float(x.min()), float(x.max())
    if std is None:
        return Describe(n=n, mean=mean, std=None, se=None, ci=None, bootstrap_ci=None, min=low, max=high)
    se = std / math.sqrt(n)
    boot = _bootstrap_interval(x, confidence, seed) if bootstrap and n >= BOOTSTRAP_MIN_N and std > 0 else None
    return Describe(
        n=n,
        mean=mean,
        std=std,
        se=se,
        ci=_t_interval(mean, se, n - 1, confidence),
        bootstrap_ci=boot,
        min=low,
        max=high,
    )


def welch(baseline: Sequence[float], other: Sequence[float], *, confidence: float = CONFIDENCE) -> Comparison:
    """Compare two arms without assuming equal variances (Welch's t-test).

    Arms routinely differ in spread (a config that sometimes diverges half-way), so
    the pooled-variance t-test is the wrong default. When both arms have zero
    variance the test is undefined (0/0), not infinitely significant: t, df, p and
    the CI are None and only the exact difference is reported.
    """
    _check_confidence(confidence)
    b = _as_values(baseline, "baseline")
    o = _as_values(other, "other")
    n_b, n_o = int(b.size), int(o.size)
    mean_b, std_b = _mean_std(b)
    mean_o, std_o = _mean_std(o)
    diff = mean_o - mean_b if mean_b is not None and mean_o is not None else None
    sigma_units = diff / std_b if diff is not None and std_b else None
    undefined = Comparison(
        n_baseline=n_b,
        n_other=n_o,
        diff=diff,
        diff_ci=None,
        t=None,
        df=None,
        p=None,
        hedges_g=None,
        baseline_std=std_b,
        sigma_units=sigma_units,
    )
    if std_b is None or std_o is None:
        return undefined
    assert diff is not None
    if std_b == 0 and std_o == 0:
        return undefined
    with warnings.catch_warnings():
        # scipy warns of "catastrophic cancellation" for a constant side; that side's
        # variance is exactly 0 here and the test is well defined.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        result = stats.ttest_ind(o, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Comparison(
        n_baseline=n_b,
        n_other=n_o,
        diff=diff,
        diff_ci=Interval(float(ci.low), float(ci.high), "welch-t"),
        t=float(result.statistic),
        df=float(result.df),
        p=float(result.pvalue),
        hedges_g=_hedges_g(diff, std_b, std_o, n_b, n_o),
        baseline_std=std_b,
        sigma_units=sigma_units,
    )


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down adjusted p-values, in input order.

    A paper comparing many arms to one baseline will find "significant" noise
    somewhere; Holm controls the family-wise error rate and is uniformly more
    powerful than plain Bonferroni. None entries (comparisons that had no p-value)
    stay None and do not count toward the family size.
    """
    adjusted: list[float | None] = [None] * len(pvalues)
    present = [i for i, p in enumerate(pvalues) if p is not None]
    if not present:
        return adjusted
    p = np.array([pvalues[i] for i in present], dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also rejects NaN
        raise ValueError(f"p-values must lie in [0, 1], got {[pvalues[i] for i in present]!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(m, 0, -1)))
    for rank, j in enumerate(order):
        adjusted[present[j]] = float(stepped[rank])
    return adjusted


def anova(
    values: Sequence[float],
    factors: Mapping[str, Sequence[str]],
    *,
    interactions: bool = True,
) -> Anova | None:
    """Factorial ANOVA with type II sums of squares; None when not estimable.

    `factors[name][i]` is the level of observation i. Factors with a single observed
    level carry no information and are dropped. Type II tests each term adjusted for
    every term that does not contain it (the marginality principle), so main effects
    stay meaningful on unbalanced data; it matches statsmodels' `anova_lm(typ=2)` and
    R's `car::Anova(type=2)`. Two-way interactions are included only when they are
    estimable: every level pair of every factor pair observed, the interaction
    columns not aliased, and at least one residual degree of freedom left; otherwise
    the table falls back to main effects and says so (`interactions=False`).
    """
    y = _as_values(values, "values")
    n = int(y.size)
    main: list[_Term] = []
    for name, levels in factors.items():
        codes, k = _encode(levels, n, name)
        if k >= 2:
            main.append(_Term(name, (name,), _treatment_columns(codes, k), codes, k))
    if not main:
        return None

    tolerance = n * (_RSS_ROUNDING_FACTOR * np.finfo(np.float64).eps * float(np.max(np.abs(y)))) ** 2
    terms = main
    if interactions and len(main) >= 2 and _cells_filled(main):
        pairs = [
            _Term(f"{a.name} × {b.name}", (a.name, b.name), _product_columns(a.columns, b.columns), None, 0)
            for a, b in combinations(main, 2)
        ]
        full = main + pairs
        _, rank = _fit(y, full, tolerance)
        if rank == 1 + sum(t.columns.shape[1] for t in full) and n - rank >= 1:
            terms = full
    rss, rank = _fit(y, terms, tolerance)
    residual_df = n - rank
    if residual_df < 1:
        return None

    residual_ms = rss / residual_df
    rows = []
    for term in terms:
        marginal = [t for t in terms if t is not term and not set(term.factors) <= set(t.factors)]
        rss_without, rank_without = _fit(y, marginal, tolerance)
        rss_with, rank_with = _fit(y, [*marginal, term], tolerance)
        df = rank_with - rank_without
        sum_sq = max(0.0, rss_without - rss_with) if df > 0 else 0.0
        mean_sq = sum_sq / df if df > 0 else None
        f = mean_sq / residual_ms if mean_sq is not None and residual_ms > 0 else None
        rows.append(
            AnovaRow(
                term=term.name,
                df=df,
                sum_sq=sum_sq,
                mean_sq=mean_sq,
                f=f,
                p=float(stats.f.sf(f, df, residual_df)) if f is not None else None,
                partial_eta_sq=sum_sq / (sum_sq + rss) if sum_sq + rss > 0 else None,
            )
        )
    return Anova(
        rows=tuple(rows),
        residual_df=residual_df,
        residual_sum_sq=rss,
        n=n,
        interactions=terms is not main,
        kind=_ANOVA_KIND,
    )


def marginal_means(
    values: Sequence[float],
    levels: Sequence[str],
    *,
    order: Sequence[str] | None = None,
    confidence: float = CONFIDENCE,
) -> tuple[LevelMean, ...]:
    """Pool the observations at each level of one factor, averaging over the others.

    Levels come in `order` when given (levels of `order` absent from the data are
    skipped; observed levels missing from `order` follow in first-appearance order, so
    no observation is silently dropped), else in first-appearance order. Level means
    carry t intervals only: pooled levels hold many runs, where a bootstrap adds cost
    and nothing the t interval lacks.
    """
    _check_confidence(confidence)
    x = _as_values(values, "values")
    levels = list(levels)
    if len(levels) != x.size:
        raise ValueError(f"got {len(levels)} levels for {x.size} values")
    groups: dict[str, list[int]] = {}
    for i, level in enumerate(levels):
        groups.setdefault(level, []).append(i)
    keys = list(groups)
    if order is not None:
        first = [level for level in dict.fromkeys(order) if level in groups]
        chosen = set(first)
        keys = first + [level for level in keys if level not in chosen]
    return tuple(
        LevelMean(level=level, describe=_describe(x[groups[level]], confidence, 0, bootstrap=False),
                  indices=tuple(groups[level]))
        for level in keys
    )


@dataclass(frozen=True)
class _Term:
    """A model term: its label, the factors it involves and its design columns."""

    name: str
    factors: tuple[str, ...]
    columns: FloatArray
    codes: NDArray[np.intp] | None  # level codes, for main effects only
    k: int  # number of levels, for main effects only


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:  # also rejects NaN
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _as_values(values: Sequence[float], what: str) -> FloatArray:
    """The values as a 1-D float array; raises ValueError on NaN/inf."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a sequence of numbers: {exc}") from exc
    if x.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"non-finite value {x[i]!r} at index {i} of {what}: filter NaN/inf before calling and report them"
        )
    return x


def _mean_std(x: FloatArray) -> tuple[float | None, float | None]:
    """Mean (None if empty) and sample std (None if n < 2).

    Identical values give exactly their value and exactly 0: floating-point
    summation would otherwise turn "no variance" into a tiny made-up one.
    """
    if x.size == 0:
        return None, None
    if np.all(x == x[0]):
        return float(x[0]), (0.0 if x.size >= 2 else None)
    mean = float(np.mean(x))
    std = float(np.std(x, ddof=1)) if x.size >= 2 else None
    if not math.isfinite(mean) or (std is not None and not math.isfinite(std)):
        raise ValueError("values overflow float64 when summarized")
    return mean, std


def _t_interval(center: float, se: float, df: float, confidence: float) -> Interval:
    if se == 0:  # scipy rejects scale=0; an exact value has a point interval
        return Interval(center, center, "t")
    low, high = stats.t.interval(confidence, df, loc=center, scale=se)
    return Interval(float(low), float(high), "t")


def _bootstrap_interval(x: FloatArray, confidence: float, seed: int) -> Interval | None:
    """BCa bootstrap CI of the mean, or the percentile one where BCa degenerates."""
    batch = max(1, _BOOTSTRAP_CELLS // x.size)
    methods: tuple[tuple[Literal["BCa", "percentile"], str], ...] = (
        ("BCa", "bootstrap-bca"), ("percentile", "bootstrap-percentile"))
    for method, label in methods:
        seed_arg: dict[str, Any] = {_bootstrap_rng_arg(): np.random.default_rng(seed)}  # a fresh generator per method
        with warnings.catch_warnings():
            # BCa warns before returning NaN; the NaN is handled by falling back.
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            result = stats.bootstrap(
                (x,),
                _mean_along,
                n_resamples=BOOTSTRAP_RESAMPLES,
                batch=batch,
                vectorized=True,
                confidence_level=confidence,
                method=method,
                **seed_arg,
            )
        low, high = (float(v) for v in result.confidence_interval)
        if math.isfinite(low) and math.isfinite(high):
            return Interval(low, high, label)
    return None


def _mean_along(sample: FloatArray, axis: int = -1) -> FloatArray:
    means: FloatArray = np.mean(sample, axis=axis)
    return means


def _hedges_g(diff: float, std_b: float, std_o: float, n_b: int, n_o: int) -> float | None:
    pooled = math.sqrt(((n_b - 1) * std_b**2 + (n_o - 1) * std_o**2) / (n_b + n_o - 2))
    if pooled == 0:
        return None
    correction = 1.0 - 3.0 / (4.0 * (n_b + n_o) - 9.0)
    return correction * diff / pooled


def _encode(levels: Sequence[Hashable], n: int, name: str) -> tuple[NDArray[np.intp], int]:
    """Integer codes of the levels in first-appearance order, and the level count."""
    levels = list(levels)
    if len(levels) != n:
        raise ValueError(f"factor {name!r} has {len(levels)} levels for {n} values")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(level, len(index)) for level in levels), dtype=np.intp, count=n)
    return codes, len(index)


def _treatment_columns(codes: NDArray[np.intp], k: int) -> FloatArray:
    """Dummy columns for levels 1..k-1; level 0 (first seen) is the reference."""
    columns: FloatArray = (codes[:, None] == np.arange(1, k)).astype(np.float64)
    return columns


def _product_columns(a: FloatArray, b: FloatArray) -> FloatArray:
    products: FloatArray = (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)
    return products


def _cells_filled(main: list[_Term]) -> bool:
    """Whether every level pair of every pair of factors has an observation."""
    for a, b in combinations(main, 2):
        assert a.codes is not None and b.codes is not None
        if np.unique(a.codes * b.k + b.codes).size < a.k * b.k:
            return False
    return True


def _fit(y: FloatArray, terms: list[_Term], tolerance: float) -> tuple[float, int]:
    """Residual sum of squares and design rank of OLS on intercept + `terms`.

    The rank, not the column count, gives degrees of freedom, so a factor confounded
    with another costs no spurious df. Observations sharing a design row (the
    replicates of one cell) are collapsed to their mean, weighted by their count: the
    fit is the same and the residual adds the within-cell sum of squares, so 10,000
    runs in 100 cells cost a 100-row solve.
    """
    design = np.column_stack([np.ones(y.size), *(t.columns for t in terms)])
    # Rows as opaque byte strings: a 1-D unique is far cheaper than a lexicographic one over columns.
    rows = np.ascontiguousarray(design).view(np.dtype((np.void, design.dtype.itemsize * design.shape[1]))).ravel()
    _, first, index, counts = np.unique(rows, return_index=True, return_inverse=True, return_counts=True)
    cells = design[first]
    index = index.reshape(-1)
    sums = np.bincount(index, weights=y, minlength=len(cells))
    means = sums / counts
    within = float(np.sum((y - means[index]) ** 2))
    root = np.sqrt(counts.astype(float))
    beta, _, rank, _ = np.linalg.lstsq(cells * root[:, None], means * root, rcond=None)
    between = float(np.sum(counts * (means - cells @ beta) ** 2))
    rss = within + between
    return (0.0 if rss <= tolerance else rss), int(rank)
