"""ratiocinator.stats against scipy (and statsmodels, where installed) on planted data."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

import ratiocinator.analysis.stats as rstats
from ratiocinator.analysis.stats import BOOTSTRAP_MIN_N, Interval, anova, describe, holm, marginal_means, welch

REL = 1e-9


def approx(value: float) -> object:
    return pytest.approx(value, rel=REL, abs=1e-12)


# --------------------------------------------------------------------------- describe


@pytest.mark.parametrize("n", [2, 3, 7, 25])
def test_describe_matches_scipy(n: int) -> None:
    x = np.random.default_rng(n).normal(5.0, 2.0, size=n)
    d = describe(x.tolist(), confidence=0.9)
    assert d.n == n
    assert d.mean == approx(float(np.mean(x)))
    assert d.std == approx(float(np.std(x, ddof=1)))
    assert d.se == approx(float(sps.sem(x)))
    low, high = sps.t.interval(0.9, n - 1, loc=np.mean(x), scale=sps.sem(x))
    assert d.ci is not None and d.ci.method == "t"
    assert (d.ci.low, d.ci.high) == (approx(low), approx(high))
    assert (d.min, d.max) == (float(x.min()), float(x.max()))


def test_t_interval_covers_planted_mean_at_nominal_rate() -> None:
    rng = np.random.default_rng(2024)
    mu, sigma, n, sims = 3.0, 0.7, 5, 2000
    draws = rng.normal(mu, sigma, size=(sims, n))
    covered = 0
    for row in draws:
        ci = describe(row).ci
        assert ci is not None
        covered += ci.low <= mu <= ci.high
    assert 0.93 <= covered / sims <= 0.97


def test_bootstrap_only_from_min_n_and_deterministic() -> None:
    rng = np.random.default_rng(7)
    small = rng.normal(size=BOOTSTRAP_MIN_N - 1)
    assert describe(small).bootstrap_ci is None
    x = rng.lognormal(size=BOOTSTRAP_MIN_N + 5)
    first = describe(x, seed=3).bootstrap_ci
    assert first is not None and first.method == "bootstrap-bca"
    assert first.low < float(np.mean(x)) < first.high
    assert describe(x, seed=3).bootstrap_ci == first
    assert describe(x, seed=4).bootstrap_ci != first


def test_bootstrap_falls_back_to_percentile_when_bca_is_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sps.bootstrap
    methods: list[str] = []

    def bca_degenerate(*args: object, **kwargs: object) -> object:
        methods.append(str(kwargs["method"]))
        result = real(*args, **kwargs)
        if kwargs["method"] == "BCa":
            nan_ci = type(result.confidence_interval)(math.nan, math.nan)
            return dataclasses.replace(result, confidence_interval=nan_ci)
        return result

    monkeypatch.setattr(rstats.stats, "bootstrap", bca_degenerate)
    x = np.random.default_rng(1).normal(size=12)
    boot = describe(x).bootstrap_ci
    assert methods == ["BCa", "percentile"]
    assert boot is not None and boot.method == "bootstrap-percentile"
    assert boot.low < float(np.mean(x)) < boot.high


def test_describe_empty_and_single() -> None:
    empty = describe([])
    assert empty == rstats.Describe(
        n=0, mean=None, std=None, se=None, ci=None, bootstrap_ci=None, min=None, max=None
    )
    one = describe([4.5])
    assert (one.n, one.mean, one.min, one.max) == (1, 4.5, 4.5, 4.5)
    assert one.std is None and one.se is None and one.ci is None and one.bootstrap_ci is None


def test_describe_zero_variance_is_exact() -> None:
    d = describe([0.1] * 12)
    assert d.mean == 0.1 and d.std == 0.0 and d.se == 0.0
    assert d.ci == Interval(0.1, 0.1, "t")
    assert d.bootstrap_ci is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_describe_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite value"):
        describe([1.0, bad, 2.0])


def test_describe_rejects_bad_confidence() -> None:
    for confidence in (0.0, 1.0, math.nan):
        with pytest.raises(ValueError, match="confidence"):
            describe([1.0, 2.0], confidence=confidence)


def test_results_are_frozen() -> None:
    d = describe([1.0, 2.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.mean = 0.0  # type: ignore[misc]


# --------------------------------------------------------------------------- welch


def test_welch_matches_scipy_and_hand_ci() -> None:
    rng = np.random.default_rng(11)
    base = rng.normal(1.0, 0.5, size=8)
    other = rng.normal(1.4, 1.5, size=13)
    c = welch(base.tolist(), other.tolist(), confidence=0.9)
    ref = sps.ttest_ind(other, base, equal_var=False)
    assert (c.n_baseline, c.n_other) == (8, 13)
    assert c.t == approx(float(ref.statistic))
    assert c.p == approx(float(ref.pvalue))

    v1, v2, n1, n2 = base.var(ddof=1), other.var(ddof=1), base.size, other.size
    se = math.sqrt(v1 / n1 + v2 / n2)
    df = se**4 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    diff = other.mean() - base.mean()
    half = sps.t.ppf(0.95, df) * se
    assert c.df == approx(df)
    assert c.diff == approx(diff)
    assert c.diff_ci is not None and c.diff_ci.method == "welch-t"
    assert (c.diff_ci.low, c.diff_ci.high) == (approx(diff - half), approx(diff + half))


def test_welch_effect_sizes_by_hand() -> None:
    base = [1.0, 2.0, 4.0, 5.0]
    other = [3.0, 6.0, 7.0]
    c = welch(base, other)
    s1, s2 = np.std(base, ddof=1), np.std(other, ddof=1)
    pooled = math.sqrt((3 * s1**2 + 2 * s2**2) / 5)
    j = 1 - 3 / (4 * 7 - 9)
    diff = np.mean(other) - np.mean(base)
    assert c.hedges_g == approx(j * diff / pooled)
    assert c.baseline_std == approx(s1)
    assert c.sigma_units == approx(diff / s1)


def test_welch_finds_planted_effect() -> None:
    rng = np.random.default_rng(5)
    c = welch(rng.normal(0.0, 0.3, size=10), rng.normal(1.0, 0.3, size=10))
    assert c.p is not None and c.p < 0.01
    assert c.diff_ci is not None and c.diff_ci.low > 0


def test_welch_null_false_positive_rate_is_nominal() -> None:
    rng = np.random.default_rng(99)
    sims = 1000
    draws = rng.normal(2.0, 0.5, size=(sims, 2, 10))
    hits = 0
    for a, b in draws:
        p = welch(a, b).p
        assert p is not None
        hits += p < 0.05
    assert 0.03 <= hits / sims <= 0.07


def test_welch_single_observation_side() -> None:
    c = welch([1.0], [2.0, 3.0, 4.0])
    assert c.diff == 2.0
    assert c.t is c.df is c.p is c.diff_ci is c.hedges_g is None
    assert c.baseline_std is None and c.sigma_units is None

    c = welch([1.0, 2.0, 3.0], [5.0])
    assert c.diff == 3.0 and c.baseline_std == 1.0 and c.sigma_units == 3.0
    assert c.t is c.df is c.p is c.diff_ci is c.hedges_g is None


def test_welch_zero_variance_equal_means_is_undefined() -> None:
    c = welch([2.0, 2.0, 2.0], [2.0, 2.0])
    assert c.diff == 0.0 and c.baseline_std == 0.0
    assert c.t is c.df is c.p is c.diff_ci is c.hedges_g is c.sigma_units is None


def test_welch_zero_variance_different_means_is_not_p_zero() -> None:
    c = welch([0.1, 0.1, 0.1], [0.3, 0.3, 0.3])
    assert c.diff == 0.3 - 0.1
    assert c.t is c.df is c.p is c.diff_ci is c.hedges_g is c.sigma_units is None


def test_welch_one_side_zero_variance_is_defined() -> None:
    base, other = [1.0, 1.0, 1.0, 1.0], [1.5, 2.0, 2.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "catastrophic cancellation" noise from a constant side
        c = welch(base, other)
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sps.ttest_ind(other, base, equal_var=False)
    assert c.p == approx(float(ref.pvalue)) and c.t == approx(float(ref.statistic))
    assert c.sigma_units is None and c.hedges_g is not None


def test_welch_empty_side() -> None:
    c = welch([], [1.0, 2.0])
    assert (c.n_baseline, c.n_other) == (0, 2)
    assert c.diff is c.p is c.baseline_std is c.sigma_units is None
    c = welch([1.0, 2.0], [])
    assert c.diff is None and c.p is None and c.sigma_units is None
    assert c.baseline_std == approx(math.sqrt(0.5))


def test_welch_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="non-finite value"):
        welch([1.0, 2.0], [3.0, math.nan])


# --------------------------------------------------------------------------- holm


def test_holm_hand_worked() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_holm_skips_none() -> None:
    assert holm([None, 0.01, None, 0.04]) == [None, pytest.approx(0.02), None, pytest.approx(0.04)]
    assert holm([None, None]) == [None, None]
    assert holm([]) == []


def test_holm_rejects_invalid() -> None:
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError):
            holm([0.01, bad])


def test_holm_matches_statsmodels() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(0, 0.1, size=12), rng.uniform(size=8), [0.02, 0.02, 0.5]])
    rng.shuffle(p)
    ref = multitest.multipletests(p, method="holm")[1]
    assert holm(p.tolist()) == pytest.approx(ref.tolist(), rel=1e-12)
    with_none: list[float | None] = [*p.tolist(), None]
    with_none.insert(4, None)
    got = holm(with_none)
    assert got[4] is None and got[-1] is None
    assert [v for v in got if v is not None] == pytest.approx(ref.tolist(), rel=1e-12)


# --------------------------------------------------------------------------- anova


def _two_factor(
    seed: int, reps: int = 4, drop: float = 0.0, effect_a: float = 3.0
) -> tuple[np.ndarray, list[str], list[str]]:
    """A 3 x 2 design: a planted effect on A, none on B, sigma 1."""
    rng = np.random.default_rng(seed)
    a = np.repeat(["a0", "a1", "a2"], 2 * reps)
    b = np.tile(["b0", "b1"], 3 * reps)
    y = rng.normal(size=a.size) + effect_a * (a == "a1") + 0.5 * effect_a * (a == "a2")
    keep = rng.random(a.size) >= drop
    return y[keep], a[keep].tolist(), b[keep].tolist()


def test_anova_finds_planted_main_effect() -> None:
    y, a, b = _two_factor(seed=1)
    table = anova(y, {"A": a, "B": b})
    assert table is not None
    assert table.interactions and table.kind == "type II sums of squares, OLS with treatment coding"
    rows = {row.term: row for row in table.rows}
    assert list(rows) == ["A", "B", "A × B"]
    assert (rows["A"].df, rows["B"].df, rows["A × B"].df) == (2, 1, 2)
    assert table.residual_df == 24 - 6 and table.n == 24
    assert rows["A"].p is not None and rows["A"].p < 1e-6
    assert rows["B"].p is not None and rows["B"].p > 0.05
    assert rows["A"].partial_eta_sq is not None and rows["A"].partial_eta_sq > 0.5


def _statsmodels_table(formula: str, data: dict[str, object]) -> object:
    pytest.importorskip("pandas")
    pytest.importorskip("statsmodels")
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    return anova_lm(smf.ols(formula, pd.DataFrame(data)).fit(), typ=2)


def _assert_matches(table: rstats.Anova | None, ref: object, names: dict[str, str]) -> None:
    assert table is not None
    assert [row.term for row in table.rows] == list(names)
    for row in table.rows:
        expected = ref.loc[names[row.term]]  # type: ignore[attr-defined]
        assert row.df == int(expected["df"])
        assert row.sum_sq == pytest.approx(expected["sum_sq"], rel=1e-7)
        assert row.f == pytest.approx(expected["F"], rel=1e-7)
        assert row.p == pytest.approx(expected["PR(>F)"], rel=1e-6)
    residual = ref.loc["Residual"]  # type: ignore[attr-defined]
    assert table.residual_df == int(residual["df"])
    assert table.residual_sum_sq == pytest.approx(residual["sum_sq"], rel=1e-7)


@pytest.mark.parametrize("drop", [0.0, 0.3], ids=["balanced", "unbalanced"])
def test_anova_two_factor_matches_statsmodels(drop: float) -> None:
    y, a, b = _two_factor(seed=2, reps=5, drop=drop, effect_a=1.0)
    y = y + 0.8 * (np.array(a) == "a2") * (np.array(b) == "b1")  # an interaction too
    ref = _statsmodels_table("y ~ C(A) * C(B)", {"y": y, "A": a, "B": b})
    table = anova(y.tolist(), {"A": a, "B": b})
    assert table is not None and table.interactions
    _assert_matches(table, ref, {"A": "C(A)", "B": "C(B)", "A × B": "C(A):C(B)"})


def _three_factor(seed: int, drop: float) -> tuple[np.ndarray, dict[str, list[str]]]:
    rng = np.random.default_rng(seed)
    a = np.repeat(["a0", "a1", "a2"], 12)
    b = np.tile(["b0", "b1"], 18)
    d = np.tile(np.repeat(["d0", "d1"], 2), 9)
    y = rng.normal(size=36) + 1.5 * (a == "a1") + 0.7 * (b == "b1") * (d == "d1")
    keep = rng.random(36) >= drop
    return y[keep], {"A": a[keep].tolist(), "B": b[keep].tolist(), "D": d[keep].tolist()}


def test_anova_three_factors() -> None:
    y, factors = _three_factor(seed=4, drop=0.0)
    table = anova(y, factors)
    assert table is not None and table.interactions
    assert [row.term for row in table.rows] == ["A", "B", "D", "A × B", "A × D", "B × D"]
    assert [row.df for row in table.rows] == [2, 1, 1, 2, 2, 1]
    assert sum(row.df for row in table.rows) + table.residual_df == 36 - 1
    assert all(row.p is not None and 0.0 <= row.p <= 1.0 for row in table.rows)


def test_anova_three_factors_unbalanced_matches_statsmodels() -> None:
    y, factors = _three_factor(seed=6, drop=0.25)
    ref = _statsmodels_table("y ~ (C(A) + C(B) + C(D)) ** 2", {"y": y, **factors})
    table = anova(y, factors)
    names = {"A": "C(A)", "B": "C(B)", "D": "C(D)"}
    names |= {"A × B": "C(A):C(B)", "A × D": "C(A):C(D)", "B × D": "C(B):C(D)"}
    _assert_matches(table, ref, names)


def test_anova_one_factor_equals_f_oneway() -> None:
    rng = np.random.default_rng(8)
    groups = [rng.normal(mu, 1.0, size=size) for mu, size in ((0.0, 4), (0.8, 7), (1.1, 5))]
    y = np.concatenate(groups)
    levels = [name for name, g in zip("xyz", groups, strict=True) for _ in g]
    table = anova(y, {"lr": levels})
    ref = sps.f_oneway(*groups)
    assert table is not None and not table.interactions
    (row,) = table.rows
    assert row.term == "lr" and row.df == 2 and table.residual_df == 16 - 3
    assert row.f == approx(float(ref.statistic))
    assert row.p == approx(float(ref.pvalue))


def test_anova_drops_single_level_factor() -> None:
    y, a, _ = _two_factor(seed=9)
    with_constant = anova(y, {"A": a, "device": ["h100"] * len(a)})
    assert with_constant is not None
    assert with_constant == anova(y, {"A": a})
    assert [row.term for row in with_constant.rows] == ["A"]


def test_anova_not_estimable_is_none() -> None:
    assert anova([], {"A": []}) is None
    assert anova([1.0, 2.0, 3.0], {}) is None
    assert anova([1.0, 2.0, 3.0], {"A": ["x", "x", "x"]}) is None
    assert anova([1.0, 2.0], {"A": ["x", "y"]}) is None  # no residual df
    assert anova([1.0, 2.0, 3.0], {"A": ["x", "y", "z"]}) is None


def _missing_cell() -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(10)
    a = ["a0"] * 6 + ["a1"] * 6 + ["a0"] * 4 + ["a2"] * 5
    b = ["b0"] * 6 + ["b0"] * 6 + ["b1"] * 4 + ["b1"] * 5  # (a1, b1) and (a2, b0) are empty
    return rng.normal(size=21), a, b


def test_anova_missing_cells_drop_interactions() -> None:
    y, a, b = _missing_cell()
    table = anova(y, {"A": a, "B": b})
    assert table is not None and not table.interactions
    assert [row.term for row in table.rows] == ["A", "B"]
    assert table == anova(y, {"A": a, "B": b}, interactions=False)
    assert table.residual_df == 21 - 4


def test_anova_main_effects_only_matches_statsmodels() -> None:
    y, a, b = _missing_cell()
    ref = _statsmodels_table("y ~ C(A) + C(B)", {"y": y, "A": a, "B": b})
    _assert_matches(anova(y, {"A": a, "B": b}), ref, {"A": "C(A)", "B": "C(B)"})


def test_anova_no_residual_room_drops_interactions() -> None:
    table = anova([1.0, 2.0, 3.5, 4.0], {"A": ["x", "x", "y", "y"], "B": ["u", "v", "u", "v"]})
    assert table is not None and not table.interactions
    assert table.residual_df == 1


def test_anova_confounded_factors_get_zero_df() -> None:
    rng = np.random.default_rng(12)
    lr = ["lo", "hi"] * 6
    schedule = ["cos", "lin"] * 6  # always varied together with lr
    table = anova(rng.normal(size=12), {"lr": lr, "schedule": schedule})
    assert table is not None and not table.interactions
    assert table.residual_df == 10
    for row in table.rows:
        assert row.df == 0 and row.sum_sq == 0.0
        assert row.mean_sq is None and row.f is None and row.p is None


def test_anova_exact_fit_has_no_f() -> None:
    # Values determined by the cell, replicated exactly: the full model leaves no error.
    a = ["x", "x", "y", "y"] * 2
    b = ["u", "v", "u", "v"] * 2
    y = [0.1, 0.7, 0.3, 1.3] * 2
    table = anova(y, {"A": a, "B": b})
    assert table is not None and table.interactions and table.residual_sum_sq == 0.0
    assert all(row.f is None and row.p is None for row in table.rows)
    assert all(row.partial_eta_sq == 1.0 for row in table.rows)

    flat = anova([0.1] * 8, {"A": a, "B": b})
    assert flat is not None
    assert all(row.sum_sq == 0.0 and row.f is None and row.partial_eta_sq is None for row in flat.rows)


def test_anova_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="factor 'A'"):
        anova([1.0, 2.0, 3.0], {"A": ["x", "y"]})
    with pytest.raises(ValueError, match="non-finite value"):
        anova([1.0, math.inf, 3.0], {"A": ["x", "y", "y"]})


# --------------------------------------------------------------------------- marginal means


def test_marginal_means_pool_by_level() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    levels = ["a", "b", "a", "c", "b", "a"]
    means = marginal_means(values, levels)
    assert [m.level for m in means] == ["a", "b", "c"]
    assert [m.indices for m in means] == [(0, 2, 5), (1, 4), (3,)]
    assert means[0].describe == describe([1.0, 3.0, 6.0])
    assert means[0].describe.mean == pytest.approx(10 / 3)
    assert means[1].describe.mean == 3.5
    assert means[2].describe.mean == 4.0 and means[2].describe.std is None


def test_marginal_means_order() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    levels = ["lo", "hi", "mid", "hi"]
    means = marginal_means(values, levels, order=["hi", "absent", "lo", "hi"])
    # Levels of `order` come first; levels absent from the data are skipped; observed
    # levels missing from `order` follow, so no observation is dropped.
    assert [m.level for m in means] == ["hi", "lo", "mid"]
    assert means[0].indices == (1, 3) and means[0].describe.mean == 3.0


def test_marginal_means_edge_cases() -> None:
    assert marginal_means([], []) == ()
    with pytest.raises(ValueError, match="levels"):
        marginal_means([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="non-finite value"):
        marginal_means([1.0, math.nan], ["a", "b"])
