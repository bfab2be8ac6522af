"""The paper reads a real ledger: planted results must come out as the numbers, tests and claims shown."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from planted import PlantedStudy
from ratiocinator.analysis.summary import best_arm, metric_stats
from ratiocinator.planning.plan import PlannedArm
from ratiocinator.report.facts import Kind, format_value
from ratiocinator.report.publish import write_report

LINK = re.compile(r"\[([^\]]*)\]\((?:appendix\.md)?#f[0-9]+\)")


def write(study: PlantedStudy, *, pdf: bool = False) -> tuple[dict[str, str], str, str]:
    files = write_report(study.ledger, study.id, study.report_dir, pdf=pdf)
    recorded = json.loads(files.facts.read_text())
    # The paper and its appendix (the full tables) read as one document.
    md = files.md.read_text() + "\n" + (files.dir / "appendix.md").read_text()
    return {f["key"]: f["text"] for f in recorded["facts"]}, md, files.html.read_text()


def row(md: str, first_cell: str, after: str = "") -> list[str]:
    """The displayed cells of the first table row starting with ``first_cell`` (after a heading, if given)."""
    text = md.split(after, 1)[1] if after else md
    line = next(line for line in text.splitlines()
                if line.startswith(f"| {first_cell} |") or line.startswith(f"| {first_cell} ("))
    return [LINK.sub(r"\1", c).strip() for c in line.strip("|").split(" | ")]


def no_number_is_nan(facts: dict[str, str], md: str) -> bool:
    """False when a fact or a table cell shows NaN or infinity."""
    cells = [c.strip().lower() for line in md.splitlines() if line.startswith("|")
             for c in LINK.sub(r"\1", line).split("|")]
    return not any(t.lower().lstrip("-") in ("nan", "inf") for t in [*facts.values(), *cells])


def metric(value: float) -> str:
    return format_value(Kind.METRIC, value)


def p_text(value: float) -> str:
    return format_value(Kind.P, value)


BASE = [0.712, 0.745, 0.688]
FAST = [0.815, 0.861, 0.834]


def test_arm_statistics_match_scipy(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}, single={"LR": "1.0"}),
                         baseline_arm="base")
    ids = study.plant({"base": BASE, "fast": FAST, "single": [0.503]})
    facts, md, _ = write(study)

    for arm, values in (("base", BASE), ("fast", FAST)):
        low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
        assert facts[f"arm[{arm}].acc.mean"] == metric(np.mean(values))
        assert facts[f"arm[{arm}].acc.std"] == metric(np.std(values, ddof=1))
        assert facts[f"arm[{arm}].acc.se"] == metric(sps.sem(values))
        assert (facts[f"arm[{arm}].acc.ci_low"], facts[f"arm[{arm}].acc.ci_high"]) == (metric(low), metric(high))
        cells = row(md, arm, "Statistics of")
        assert cells[2:8] == ["3 / 3", "3", metric(np.mean(values)), metric(np.std(values, ddof=1)),
                              metric(sps.sem(values)),
                              f"\\[{metric(low)}, {metric(high)}\\]"]
        assert cells[8] == "—"  # no bootstrap below 10 values
    assert row(md, "base")[0] == "base (baseline)" and row(md, "fast")[0] == "fast (best mean)"

    # One run: a value, no spread, no interval, no test — and no invented number.
    assert facts["arm[single].acc.mean"] == metric(0.503)
    assert not any(k.startswith("arm[single].acc.") and k.split(".")[-1] in ("std", "se", "ci_low", "ci_high")
                   for k in facts)
    assert row(md, "single", "Statistics of")[4:8] == [metric(0.503), "—", "—", "—"]
    assert row(md, "single", "Comparison with")[-1] == "too few runs"
    assert no_number_is_nan(facts, md)

    runs = json.loads((study.report_dir / "facts.json").read_text())["facts"]
    mean = next(f for f in runs if f["key"] == "arm[fast].acc.mean")
    assert mean["run_ids"] == ids["fast"]


def test_a_planted_effect_is_found_and_a_null_effect_is_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    values = {
        "base": list(0.70 + 0.02 * rng.standard_normal(8)),
        "better": list(0.80 + 0.02 * rng.standard_normal(8)),
        "same": list(0.70 + 0.02 * rng.standard_normal(8)),
    }
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "1"}, better={"LR": "2"}, same={"LR": "3"}),
                         baseline_arm="base")
    study.plant(values)
    facts, md, _ = write(study)

    welch = {arm: sps.ttest_ind(values[arm], values["base"], equal_var=False) for arm in ("better", "same")}
    assert welch["same"].pvalue > 0.05  # a typical null draw (the false-positive rate itself is tested in test_stats)
    for arm, test in welch.items():
        assert facts[f"cmp[{arm}].p"] == p_text(test.pvalue)
        assert facts[f"cmp[{arm}].t"] == format_value(Kind.STAT, test.statistic)
        assert facts[f"cmp[{arm}].diff"] == metric(np.mean(values[arm]) - np.mean(values["base"]))
    holm = sorted((welch[a].pvalue, a) for a in welch)
    adjusted = {holm[0][1]: min(1, 2 * holm[0][0])}
    adjusted[holm[1][1]] = max(adjusted[holm[0][1]], min(1, holm[1][0]))
    for arm in welch:
        assert facts[f"cmp[{arm}].p_holm"] == p_text(adjusted[arm])
    assert facts["noise.std"] == metric(np.std(values["base"], ddof=1))

    assert row(md, "better", "Comparison with")[-1] == "improvement"
    assert row(md, "same", "Comparison with")[-1] in ("not significant", "within noise floor")
    assert "The best improving arm, better, reached acc" in md

    aggregated = json.loads((study.report_dir / "aggregated_metrics.json").read_text())
    assert aggregated["best_proposed"]["arm"] == "better" and aggregated["best_baseline"]["arm"] == "base"
    expected_gap = (np.mean(values["better"]) - np.mean(values["base"])) / np.mean(values["base"]) * 100
    assert aggregated["gap_percent"] == pytest.approx(expected_gap)
    assert aggregated["verdict"] == "improvement"
    statuses = {line.split("\t")[4].split(" ")[0]: line.split("\t")[3]
                for line in (study.report_dir / "results.tsv").read_text().splitlines()[1:]}
    assert statuses == {"base": "keep", "better": "keep", "same": "discard"}


def test_direction_follows_minimize(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "1"}, lower={"LR": "2"}, higher={"LR": "3"}),
                         baseline_arm="base", maximize=False, goal_metric="loss")
    study.plant({"base": [1.00, 1.02, 0.98, 1.01], "lower": [0.60, 0.62, 0.58, 0.61],
                 "higher": [1.40, 1.42, 1.38, 1.41]}, "loss")
    _, md, _ = write(study)
    assert row(md, "lower", "Comparison with")[-1] == "improvement"
    assert row(md, "higher", "Comparison with")[-1] == "regression"
    assert "(lower is better)" in md
    aggregated = json.loads((study.report_dir / "aggregated_metrics.json").read_text())
    assert aggregated["best_proposed"]["arm"] == "lower" and aggregated["gap_percent"] > 0


def test_a_significant_difference_inside_the_noise_floor_is_not_an_improvement(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = list(rng.standard_normal(60))
    other = list(0.85 + rng.standard_normal(60))
    test = sps.ttest_ind(other, base, equal_var=False)
    diff = np.mean(other) - np.mean(base)
    assert test.pvalue < 0.001 and 0 < diff <= np.std(base, ddof=1)  # the planted situation holds
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "1"}, other={"LR": "2"}), baseline_arm="base")
    study.plant({"base": base, "other": other}, curves=False)
    facts, md, _ = write(study)
    assert row(md, "other", "Comparison with")[-1] == "within noise floor"
    assert "improvement" not in row(md, "other", "Comparison with")[-1]
    assert "No arm improved on the baseline" in md
    assert facts["arm[base].acc.boot_low"] and facts["arm[base].acc.boot_high"]  # n = 60: a bootstrap interval too


def test_edge_cases_give_clear_output_not_crashes(tmp_path: Path) -> None:
    study = PlantedStudy(
        tmp_path,
        PlantedStudy.arms(base={"LR": "1"}, flat={"LR": "2"}, flat2={"LR": "3"}, broken={"LR": "4"},
                          diverged={"LR": "5"}),
        baseline_arm="flat",
    )
    study.plant({"base": BASE, "flat": [0.5, 0.5, 0.5], "flat2": [0.6, 0.6, 0.6]})
    for _ in range(3):
        study.run("broken", status="failed", failure="exit_nonzero", reason="runner exited with code 1", exit_code=1,
                  stderr="Traceback\nImportError: no module named torch\n")
    nan_run = study.run("diverged", final={"acc": math.nan}, curve={"acc": [0.2, math.nan]})
    study.run("diverged", final={"acc": 0.4})
    facts, md, html = write(study)

    assert (facts["arm[flat].acc.std"] == "0"
            and facts["arm[flat].acc.ci_low"] == facts["arm[flat].acc.ci_high"] == "0.5")
    assert row(md, "flat2", "Comparison with")[-1] == "untestable"
    assert row(md, "broken", "Statistics of")[2:5] == ["0 / 3", "0", "—"]
    assert row(md, "broken", "Comparison with")[-1] == "too few runs"
    assert row(md, "diverged", "Statistics of")[2:5] == ["2 / 2", "1", metric(0.4)]
    assert f"Runs {nan_run} succeeded without a finite acc and are left out." in md
    assert "exit\\_nonzero" in md and "ImportError: no module named torch" in md
    assert no_number_is_nan(facts, md)


def test_an_experiment_where_every_run_failed(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "1"}, fast={"LR": "2"}), baseline_arm="base")
    for arm in ("base", "fast"):
        study.run(arm, status="failed", failure="exit_nonzero", reason="ImportError", exit_code=1,
                  stderr="ModuleNotFoundError: No module named 'torch'\n")
    stale = study.report_dir / "fig_goal.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    facts, md, html = write(study)
    assert "No run produced a finite acc, so the study has no result." in md
    assert not stale.exists()  # an earlier report's figure does not outlive its data
    assert sorted(p.name for p in study.report_dir.glob("fig_*.png")) == ["fig_cost.png"] and html.count("<img") == 1
    assert facts["failures[exit_nonzero].runs"] == "2"
    assert md.count("No module named 'torch'") == 2
    assert (study.report_dir / "results.tsv").read_text().count("\tcrash\t") == 2


def test_factor_analysis_finds_the_planted_factor_and_not_the_null_one(tmp_path: Path) -> None:
    arms = PlantedStudy.grid(DEPTH=["1", "2", "4"], WIDTH=["8", "16"])
    study = PlantedStudy(tmp_path, arms, baseline_arm="DEPTH=1,WIDTH=8", arms=None,
                         factors={"DEPTH": [1, 2, 4], "WIDTH": [8, 16]})
    rng = np.random.default_rng(11)
    values = {a.name: list(0.5 + 0.05 * ["1", "2", "4"].index(a.factors["DEPTH"]) + 0.005 * rng.standard_normal(4))
              for a in arms}
    study.plant(values)
    facts, md, _ = write(study)

    for level in ("1", "2", "4"):
        pooled = [v for name, vs in values.items() if f"DEPTH={level}," in name for v in vs]
        assert facts[f"factor[DEPTH].level[{level}].mean"] == metric(np.mean(pooled))
        assert facts[f"factor[DEPTH].level[{level}].n"] == "8"
    assert "DEPTH matters more than WIDTH here" in md
    assert "DEPTH affects acc (F = " in md and "its best level is DEPTH=4" in md
    assert "No detectable effect of WIDTH" in md and "absence of evidence is not evidence of absence" in md
    assert "- WIDTH affects" not in md
    assert row(md, "DEPTH", "Analysis of variance")[1] == "2"
    assert row(md, "Residual", "Analysis of variance")[1] == "18"
    assert (study.report_dir / "fig_main_effects.png").read_bytes().startswith(b"\x89PNG")


def test_ablation_levels_hold_the_other_factors_at_the_baseline(tmp_path: Path) -> None:
    arms = [PlannedArm(name=n, env=lv, factors=lv) for n, lv in (
        ("A=a0,B=b0", {"A": "a0", "B": "b0"}), ("A=a1,B=b0", {"A": "a1", "B": "b0"}),
        ("A=a0,B=b1", {"A": "a0", "B": "b1"}))]
    study = PlantedStudy(tmp_path, arms, baseline_arm="A=a0,B=b0", arms=None,
                         factors={"A": ["a0", "a1"], "B": ["b0", "b1"]},
                         design="ablation", baseline={"A": "a0", "B": "b0"})
    study.plant({"A=a0,B=b0": [1.0, 1.1, 0.9], "A=a1,B=b0": [2.0, 2.1, 1.9], "A=a0,B=b1": [5.0, 5.1, 4.9]})
    facts, md, _ = write(study)
    assert facts["factor[A].level[a0].n"] == "3"  # the B=b1 arm is not pooled into A=a0
    assert facts["factor[A].level[a0].mean"] == metric(1.0)
    assert "other factors held at the baseline (B=b0)" in md


def test_html_is_self_contained_and_every_number_shows_its_runs(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base")
    ids = study.plant({"base": BASE, "fast": FAST})
    study.ledger.event(study.id, "host", "host probed", name="box-7", cpus=16, gpus=["NVIDIA A100"], ram_gb=125.5)
    _, md, html = write(study)

    assert html.startswith("<!DOCTYPE html>") and "<title>Planted Means: A Report Test</title>" in html
    assert not re.search(r"<(link|script)\b", html) and "http://" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    fast_mean = re.search(r'<a class="fact" href="appendix.html#(f[0-9]+)" title="([^"]*)">'
                          + re.escape(metric(np.mean(FAST))), html)
    assert fast_mean and f"runs {ids['fast'][0]}–{ids['fast'][-1]}" in fast_mean.group(2)
    assert f'<tr id="{fast_mean.group(1)}">' in (study.report_dir / "appendix.html").read_text()
    for section in ("Abstract", "Hypotheses", "Design", "Results", "Cost", "Conclusion", "Threats to validity",
                    "Reproducibility", "Configuration", "Every arm's command", "Every number and its runs"):
        assert section in md
    assert "box-7" in md and "NVIDIA A100" in md and study.sha in md and "c0ffee1234" in md
    assert "LR=0.3 RATIOCINATOR_SEED=$SEED python ./train.py" in md.replace("\\_", "_")


def test_failed_runs_are_listed_by_class_with_log_tails(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base")
    study.plant({"base": BASE, "fast": FAST})
    stderr = "".join(f"\x1b[31merror line {i}\x1b[0m <script>\n" for i in range(1, 51))
    crashed = study.run("fast", status="failed", failure="unknown", reason="runner exited with code 3", exit_code=3,
                        stderr=stderr, stdout="stdout is not shown when stderr has text\n")
    timed_out = [study.run("base", status="failed", failure="timeout", reason="killed after 120 s", exit_code=None,
                           signal=9,
                           stderr="", stdout=f"epoch {i}\n") for i in range(3)]
    _, md, html = write(study)

    section = md.split("## Failure analysis", 1)[1].split("## Cost", 1)[0]
    assert row(section, "timeout")[1:] == ["killed at the spec's train\\_timeout\\_s", "3", "base (3)"]
    assert row(section, "unknown")[1:] == ["failed without recognisable evidence", "1", "fast (1)"]
    section = md.split("## Failed runs", 1)[1].split("## Every arm", 1)[0]  # the log tails are in the appendix
    assert f"Run {crashed}: arm fast" in section
    for i in range(31, 51):
        assert f"error line {i} <script>" in section
    assert "error line 30 " not in section and "stdout is not shown" not in section
    assert f"1 more timeout runs: {timed_out[2]}." in section  # two examples per class, the rest by id
    appendix_html = (study.report_dir / "appendix.html").read_text()
    assert "\x1b" not in md and "&lt;script&gt;" in appendix_html and "<script>" not in appendix_html + html
    assert row(md, "fast", "Statistics of")[2] == "3 / 4"
    assert "fast lost 1 of 4" in md


latex = pytest.mark.skipif(
    shutil.which("pdflatex") is None and os.environ.get("RATIOCINATOR_REQUIRE_LATEX") != "1",
    reason="no LaTeX engine installed (CI installs one and sets RATIOCINATOR_REQUIRE_LATEX=1)",
)


@pytest.mark.latex
@latex
def test_paper_tex_compiles_to_pdf_even_with_hostile_text(tmp_path: Path) -> None:
    arms = PlantedStudy.grid(OPT=["adam_w", "sgd&m"], LR=["1e-3", "50%"])
    study = PlantedStudy(tmp_path, arms, baseline_arm=arms[0].name, arms=None,
                         factors={"OPT": ["adam_w", "sgd&m"], "LR": ["1e-3", "50%"]},
                         topic="Does σ_{lr} matter? ~ $5 & #1 {braces} \\backslash — 日本語 too", goal_metric="val_acc")
    rng = np.random.default_rng(1)
    study.plant({a.name: list(0.5 + 0.01 * rng.standard_normal(3)) for a in arms}, "val_acc")
    study.run(arms[1].name, status="failed", failure="exit_nonzero", reason="boom", exit_code=1,
              stderr="C:\\path\\to\\file {x} $HOME \\end{verbatim} 100% done ±σ\n")
    files = write_report(study.ledger, study.id, study.report_dir, pdf=True)
    assert files.pdf is not None, files.pdf_note
    assert files.pdf.read_bytes().startswith(b"%PDF")
    assert (study.report_dir / "fig_goal.pdf").read_bytes().startswith(b"%PDF")
    assert "U+65E5" in files.tex.read_text()  # a glyph pdflatex lacks is named, not dropped


def test_metric_stats_keep_non_finite_and_missing_values_apart() -> None:
    finals = {1: {"m": (2.0, True)}, 2: {"m": (2.0, True)}, 3: {"m": (None, False)}, 4: {}}
    equal = metric_stats("m", [1, 2, 3, 4], finals)
    assert (equal.n, equal.mean, equal.std, equal.min, equal.max) == (2, 2.0, 0.0, 2.0, 2.0)
    assert (equal.nonfinite_run_ids, equal.missing_run_ids) == ((3,), (4,))
    empty = metric_stats("m", [3, 4], finals)
    assert (empty.n, empty.mean, empty.std, empty.min, empty.max, empty.min_run_id) == (0, None, None, None, None, None)
    inf = metric_stats("m", [5], {5: {"m": (math.inf, True)}})
    assert (inf.n, inf.nonfinite_run_ids) == (0, (5,))
    assert best_arm([], "m", maximize=True) is None


def test_constant_knobs_are_shown_once_in_the_design_and_arms_show_what_varies(tmp_path: Path) -> None:
    # As the planner records them: every arm carries the spec's constants under its own knobs.
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"EPOCHS": "40", "SIZE": "9257", "LR": "0.1"},
                                                     fast={"EPOCHS": "40", "SIZE": "9257", "LR": "0.3"},
                                                     long={"EPOCHS": "80", "SIZE": "9257", "LR": "0.1"}),
                         baseline_arm="base", env={"EPOCHS": 40, "SIZE": 9257})
    study.plant({"base": BASE, "fast": FAST, "long": BASE})
    _, paper, _ = write(study)  # the paper, then its appendix
    assert row(paper, "base", "Statistics of")[1] == "LR=0.1"
    assert row(paper, "fast", "Statistics of")[1] == "LR=0.3"
    assert row(paper, "long", "Statistics of")[1] == "EPOCHS=80, LR=0.1"  # an arm's own setting of a constant
    design = paper.split("## Design", 1)[1].split("\n## ", 1)[0]
    assert "EPOCHS=40, SIZE=9257" in design  # the constants, once
