"""The paper's figures, drawn from a real ledger through the real summary and inference."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.axes
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import to_hex

from ratiocinator.analysis.inference import Inference, infer
from ratiocinator.analysis.summary import summarize_experiment
from ratiocinator.execution.metrics import MetricPoint
from ratiocinator.planning.plan import PlannedArm
from ratiocinator.report import figures
from ratiocinator.report.figures import (
    FigureFile,
    all_figures,
    arm_colors,
    cost_figure,
    curves_figure,
    draw_cost,
    draw_curves,
    draw_goal,
    draw_main_effects,
    goal_figure,
    main_effects_figure,
    render,
    wrap_label,
)
from ratiocinator.store.ledger import Ledger, RunRow

PNG = b"\x89PNG\r\n\x1a\n"
PDF = b"%PDF"
# Digits a caption may hold that no result produced: the CI level and the test level.
CONSTANT_NUMBERS = {"95", "0.05"}


class Book:
    """A ledger holding one experiment whose arms, runs and metric points a test plants."""

    def __init__(self, tmp_path: Path, arms: Sequence[PlannedArm], *, baseline: str | None = None,
                 maximize: bool = True, design: str = "grid") -> None:
        self.tmp = tmp_path
        self.ledger = Ledger(tmp_path / "ledger.db")
        self.id = "exp-1"
        self.maximize = maximize
        self.design = design
        self.ledger.create_experiment(id=self.id, name="figs", spec_path="figs.yaml", spec_text="name: figs\n",
                                      spec_sha256=hashlib.sha256(b"figs").hexdigest(), backend="local")
        self.ledger.record_arms(self.id, 0, arms, baseline=baseline or arms[0].name)
        self.arm_ids = {a.name: a.id for a in self.ledger.arms(self.id)}
        self.replicates: dict[str, int] = {}

    def run(self, arm: str, final: float | None, *, curve: Sequence[float] = (), steps: bool = True,
            status: str = "succeeded", cost: float | None = 0.02, seconds: float = 30.0, metric: str = "acc",
            extra: dict[str, list[float]] | None = None) -> int:
        replicate = self.replicates.get(arm, 0)
        self.replicates[arm] = replicate + 1
        run_id = self.ledger.start_run(
            experiment_id=self.id, arm_id=self.arm_ids[arm], replicate=replicate, seed=replicate, host="localhost",
            slot="slot0", commit_sha="c0ffee", env={}, argv=["python", "train.py"], run_root=self.tmp / "runs",
        )
        series = {metric: list(curve), **(extra or {})}
        points = [MetricPoint(name=name, value=float(v), step=10 * i if steps else None, seq=i)
                  for name, values in series.items() for i, v in enumerate(values)]
        finals = {} if final is None else {metric: final}
        finals.update({name: values[-1] for name, values in (extra or {}).items()})
        started = self.ledger.run(run_id).started_at
        self.ledger.finish_run(
            run_id, status=status, failure=None if status == "succeeded" else "crash", reason="", exit_code=0,
            signal=None, final=finals, counts={name: len(values) for name, values in series.items()}, cost=cost,
            ended_at=started + seconds, points=points,
        )
        return run_id

    @property
    def runs(self) -> list[RunRow]:
        return self.ledger.runs(self.id)

    def inference(self) -> Inference:
        summary = summarize_experiment(self.id, self.ledger.arms(self.id), self.runs, self.ledger.run_metrics(self.id),
                                       goal_metric="acc", maximize=self.maximize)
        return infer(summary, self.design)


def arms(*names: str) -> list[PlannedArm]:
    return [PlannedArm(name=n, env={}) for n in names]


def curve(final: float, n: int = 6) -> list[float]:
    return list(np.linspace(0.1, final, n))


PLANTED = {"base": [0.712, 0.745, 0.688], "fast": [0.915, 0.961, 0.934], "slow": [0.503, 0.481]}


def planted(tmp_path: Path) -> Book:
    book = Book(tmp_path, arms(*PLANTED), baseline="base")
    for arm, values in PLANTED.items():
        for i, v in enumerate(values):
            book.run(arm, v, curve=curve(v), seconds=20.0 + 5 * i)
    return book


def assert_files(fig: FigureFile | None, stem: str) -> FigureFile:
    assert fig is not None
    assert fig.stem == stem
    assert fig.png.startswith(PNG) and len(fig.png) > 1000
    assert fig.pdf.startswith(PDF) and fig.pdf.rstrip().endswith(b"%%EOF")
    assert fig.caption and "\n" not in fig.caption
    return fig


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def assert_no_result_numbers(caption: str, counts: Sequence[int] = ()) -> None:
    """A caption may name counts and the fixed test levels, never a value computed from the runs."""
    assert numbers(caption) <= CONSTANT_NUMBERS | {str(c) for c in counts}, caption


def arm_labels(ax: matplotlib.axes.Axes) -> list[str]:
    """The arm labels of a horizontal arm axis: tick labels, or texts beside the axis with many arms."""
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    return ticks or [t.get_text() for t in ax.texts]


def legend_labels(drawing: figures.Drawing) -> list[str]:
    ax = drawing.figure.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()]


# -- every figure from one small experiment ---------------------------------------------


def test_all_figures_render_png_and_pdf_in_paper_order(tmp_path: Path) -> None:
    book = planted(tmp_path)
    inference = book.inference()
    out = all_figures(book.ledger, inference, book.runs)
    # No factor in this design, so no main-effects figure.
    assert [f.stem for f in out] == ["fig_goal", "fig_curves", "fig_cost"]
    for fig in out:
        assert_files(fig, fig.stem)
        assert_no_result_numbers(fig.caption)
    goal, curves, cost = out
    assert "95% t confidence interval" in goal.caption
    assert "baseline's mean" in goal.caption
    assert "acc" in curves.caption and "step" in curves.caption
    assert "standard deviation" in curves.caption and "min to max" in curves.caption  # slow has two runs
    assert "total cost" not in cost.caption and "dollars" in cost.caption


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    inference = planted(tmp_path).inference()
    first, second = goal_figure(inference), goal_figure(inference)
    assert first is not None and second is not None
    assert first.png == second.png
    assert first.pdf == second.pdf
    assert b"CreationDate" not in first.pdf
    # A caller's matplotlib settings neither change the figure nor get changed by it.
    with matplotlib.rc_context({"font.size": 20, "axes.facecolor": "red", "lines.linewidth": 5}):
        third = goal_figure(inference)
        assert matplotlib.rcParams["font.size"] == 20
    assert third is not None and third.png == first.png


def test_goal_figure_draws_means_cis_runs_and_verdicts(tmp_path: Path) -> None:
    inference = planted(tmp_path).inference()
    assert inference.comparison("fast").verdict.value == "improvement"
    assert inference.comparison("slow").verdict.value == "regression"
    drawing = draw_goal(inference)
    assert drawing is not None
    ax = drawing.figure.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["base\n(baseline)", "fast\n(▲ improvement)", "slow\n(▼ regression)"]
    bars = ax.patches
    assert [round(b.get_height(), 9) for b in bars] == [round(float(np.mean(v)), 9) for v in PLANTED.values()]
    assert [b.get_hatch() for b in bars] == [None, "//", "\\\\"]
    dots = next(c for c in ax.collections if isinstance(c, PathCollection)).get_offsets()
    assert dots[:, 1].tolist() == [v for vs in PLANTED.values() for v in vs]  # one dot per run, in its arm's column
    assert np.round(dots[:, 0]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    # The CI drawn is the inference's t interval of the mean.
    lo, hi = ax.get_ylim()
    ci = inference.goal("fast").describe.ci
    assert ci is not None and lo <= ci.low and ci.high <= hi
    assert "improvement or regression" in drawing.caption
    colors = arm_colors(inference)
    assert [to_hex(b.get_facecolor()[:3]) for b in bars] == [colors[n].lower() for n in PLANTED]
    render(drawing)


def test_goal_figure_zooms_on_close_values_and_says_so(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a", "b"))
    for v in (0.901, 0.903, 0.902):
        book.run("a", v)
    for v in (0.905, 0.904, 0.906):
        book.run("b", v)
    drawing = draw_goal(book.inference())
    assert drawing is not None
    low, _ = drawing.figure.axes[0].get_ylim()
    assert low > 0.8
    assert "does not start at zero" in drawing.caption


def test_goal_figure_omits_arms_without_values_and_counts_them(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a", "b", "c"))
    book.run("a", 0.5)
    book.run("a", 0.6)
    book.run("b", None, status="failed")
    book.run("c", float("nan"))
    drawing = draw_goal(book.inference())
    assert drawing is not None
    assert [t.get_text() for t in drawing.figure.axes[0].get_xticklabels()] == ["a\n(baseline)"]
    assert "2 arms without a finite acc value are not shown" in drawing.caption
    assert_no_result_numbers(drawing.caption, counts=[2])


# -- None cases --------------------------------------------------------------------------


def test_no_values_no_points_no_runs_give_no_figures(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a", "b"))
    inference = book.inference()
    assert goal_figure(inference) is None
    assert curves_figure(book.ledger, inference, book.runs) is None
    assert main_effects_figure(inference) is None
    assert cost_figure(inference, book.runs) is None
    assert all_figures(book.ledger, inference, book.runs) == []

    book.run("a", None, status="failed", cost=None)  # a run, but no value and no points
    book.run("b", 0.4, cost=None)  # a value, but no streamed points
    inference = book.inference()
    assert curves_figure(book.ledger, inference, book.runs) is None
    assert goal_figure(inference) is not None
    cost = assert_files(cost_figure(inference, book.runs), "fig_cost")  # durations exist, dollars do not
    assert "No run recorded a non-zero dollar cost" in cost.caption


def test_single_point_curves_fall_back_to_another_metric_or_none(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a"))
    book.run("a", 0.5, curve=[0.5])
    assert curves_figure(book.ledger, book.inference(), book.runs) is None
    book.run("a", 0.6, curve=[0.6], extra={"loss": [3.0, 2.0, 1.0]})
    drawing = draw_curves(book.ledger, book.inference(), book.runs)
    assert drawing is not None
    assert drawing.figure.axes[0].get_ylabel() == "loss"
    assert "acc is not drawn" in drawing.caption


# -- learning curves ---------------------------------------------------------------------


def test_curves_are_mean_across_replicates_aligned_on_step(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a"))
    book.run("a", 3.0, curve=[1.0, 2.0, 3.0])
    book.run("a", 5.0, curve=[3.0, 4.0, 5.0])
    book.run("a", 7.0, curve=[5.0, 6.0, 7.0, 9.0])  # one step further than the others
    book.run("a", None, curve=[100.0, 100.0], status="failed")  # never drawn
    drawing = draw_curves(book.ledger, book.inference(), book.runs)
    assert drawing is not None
    line = drawing.figure.axes[0].lines[0]
    assert line.get_xdata().tolist() == [0, 10, 20, 30]
    assert line.get_ydata().tolist() == [3.0, 4.0, 5.0, 9.0]
    assert drawing.figure.axes[0].get_xlabel() == "step"
    assert "standard deviation" in drawing.caption and "failed and interrupted runs are not drawn" in drawing.caption


def test_curves_without_steps_align_on_report_index_and_two_runs_span_min_max(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a"))
    book.run("a", 2.0, curve=[1.0, 2.0], steps=False)
    book.run("a", 4.0, curve=[3.0, 4.0, float("inf")], steps=False)
    drawing = draw_curves(book.ledger, book.inference(), book.runs)
    assert drawing is not None
    ax = drawing.figure.axes[0]
    assert ax.lines[0].get_xdata().tolist() == [0, 1]  # the non-finite third point is left out
    assert ax.lines[0].get_ydata().tolist() == [2.0, 3.0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 1.0 and band.max() == 4.0
    assert "report index" in ax.get_xlabel() and "min to max" in drawing.caption


def test_curves_cap_arms_at_baseline_plus_best(tmp_path: Path) -> None:
    names = [f"arm{i}" for i in range(12)]
    book = Book(tmp_path, arms(*names), baseline="arm5")
    means = {n: 0.3 + 0.05 * i for i, n in enumerate(names)}
    for n, m in means.items():
        for d in (-0.01, 0.01):
            book.run(n, m + d, curve=curve(m + d))
    inference = book.inference()
    drawing = draw_curves(book.ledger, inference, book.runs, max_arms=4)
    assert drawing is not None
    assert legend_labels(drawing) == ["arm5 (baseline)", "arm9", "arm10", "arm11"]
    assert ("Of 12 arms with succeeded runs, only the baseline and the 3 arms with the best mean acc are drawn"
            in drawing.caption)
    assert_no_result_numbers(drawing.caption, counts=[12, 3])
    colors = arm_colors(inference)
    lines = drawing.figure.axes[0].lines
    drawn = {label.split(" ")[0]: to_hex(line.get_color())
             for label, line in zip(legend_labels(drawing), lines, strict=True)}
    assert drawn == {n: colors[n].lower() for n in drawn}
    assert len(set(drawn.values())) == 4  # the drawn arms never share a color
    # Minimizing: the best are the lowest means.
    book.maximize = False
    drawing = draw_curves(book.ledger, book.inference(), book.runs, max_arms=4)
    assert drawing is not None
    assert legend_labels(drawing) == ["arm0", "arm1", "arm2", "arm5 (baseline)"]


# -- main effects --------------------------------------------------------------------------


def test_factorial_design_gives_one_panel_per_factor(tmp_path: Path) -> None:
    lrs, widths = ("0.1", "0.3", "1.0"), ("64", "256")
    grid = [PlannedArm(name=f"lr={lr},width={w}", env={"LR": lr, "W": w}, factors={"lr": lr, "width": w})
            for lr in lrs for w in widths]
    book = Book(tmp_path, grid)
    rng = np.random.default_rng(0)
    for arm in grid:
        for _ in range(3):
            book.run(arm.name, 0.5 + 0.1 * lrs.index(arm.factors["lr"]) + rng.normal(0, 0.01))
    inference = book.inference()
    assert inference.factors is not None
    drawing = draw_main_effects(inference)
    assert drawing is not None
    panels = [ax for ax in drawing.figure.axes if ax.get_visible()]
    assert [ax.get_title().rstrip(" *") for ax in panels] == ["lr", "width"]
    assert [[t.get_text() for t in ax.get_xticklabels()] for ax in panels] == [list(lrs), list(widths)]
    assert panels[0].get_title().endswith("*")  # lr drives the planted effect
    assert panels[0].get_ylabel() == "acc"
    # The plotted level means are the inference's.
    lr_means = [lv.describe.mean for lv in inference.factors.effect("lr").levels]
    points = [line for line in panels[0].lines if line.get_marker() == "o"]
    assert len(points) == 1  # one artist for the levels, not one per level
    assert points[0].get_xdata().tolist() == [0, 1, 2]
    assert np.allclose(points[0].get_ydata(), lr_means)
    assert_no_result_numbers(drawing.caption)
    out = all_figures(book.ledger, inference, book.runs)
    assert [f.stem for f in out] == ["fig_goal", "fig_main_effects", "fig_cost"]
    assert_files(out[1], "fig_main_effects")


def test_main_effects_wraps_many_factors_into_rows(tmp_path: Path) -> None:
    names = [f"f{i}" for i in range(5)]
    grid = []
    for i in range(4):
        factors = {n: str((i >> (k % 2)) & 1) for k, n in enumerate(names)}
        grid.append(PlannedArm(name=f"arm{i}", env={}, factors=factors))
    book = Book(tmp_path, grid, design="ablation")
    for arm in grid:
        book.run(arm.name, 0.5)
        book.run(arm.name, 0.6)
    drawing = draw_main_effects(book.inference())
    assert drawing is not None
    assert sum(ax.get_visible() for ax in drawing.figure.axes) == 5
    assert len(drawing.figure.axes) == 8  # 2 rows of 4, the last 3 hidden


# -- scale and labels ----------------------------------------------------------------------


def test_hundred_arms_with_long_names_render(tmp_path: Path) -> None:
    names = [f"optimizer=adamw,lr={i * 1e-4:.4f},weight_decay=0.01,warmup={i}" for i in range(100)]
    book = Book(tmp_path, arms(*names))
    for i, n in enumerate(names):
        for d in (0.0, 0.01):
            book.run(n, 0.5 + i / 1000 + d, curve=curve(0.5 + d, 4), cost=0.01 * (1 + i % 3), seconds=10 + i)
    inference = book.inference()
    fig = assert_files(goal_figure(inference), "fig_goal")
    assert_no_result_numbers(fig.caption, counts=[100, 7])
    curves = draw_curves(book.ledger, inference, book.runs)
    assert curves is not None and len(legend_labels(curves)) == 8
    goal = draw_goal(inference)
    assert goal is not None
    ax = goal.figure.axes[0]
    labels = arm_labels(ax)
    assert len(labels) == 100  # arms are rows
    assert all(len(line) <= figures.LABEL_WIDTH for label in labels for line in label.split("\n"))
    # Every name starts with the same setting: only the first row spells it out.
    assert labels[0].startswith("optimizer=adamw,") and labels[0].endswith("(baseline)")
    assert not any("optimizer" in label for label in labels[1:])
    assert labels[1].replace("\n", "").startswith("lr=0.0001,weight_decay=0.01,")
    assert "only the first row spells it out" in goal.caption
    cost = draw_cost(inference, book.runs)  # the same row layout as the goal figure; drawn, not rendered, for speed
    assert cost is not None and arm_labels(cost.figure.axes[0]) == labels
    width, height = goal.figure.get_size_inches()
    assert width <= figures.MAX_WIDTH_IN and height <= figures.MAX_HEIGHT_IN
    colors = arm_colors(inference)
    assert {n for n, c in colors.items() if c != figures.OTHER_COLOR} == {names[0], *names[-7:]}  # baseline + best
    assert "Only the baseline and the 7 arms with the best mean acc have a color of their own" in goal.caption


LRS = ("0.001", "0.01", "0.1", "0.3", "1.0", "3.0")
WIDTHS = ("8", "16", "32", "64", "128")


def many_factor_arms(tmp_path: Path) -> Book:
    """A 6 x 5 grid (more arms than figures.COMPACT_ARMS) whose goal rises with lr."""
    grid = [PlannedArm(name=f"lr={lr},width={w}", env={"LR": lr, "W": w}, factors={"lr": lr, "width": w})
            for lr in LRS for w in WIDTHS]
    book = Book(tmp_path, grid)
    rng = np.random.default_rng(1)
    for arm in grid:
        for _ in range(3):
            book.run(arm.name, 0.5 + 0.05 * LRS.index(arm.factors["lr"]) + rng.normal(0, 0.005),
                     seconds=20 + rng.random())
    return book


def test_many_factor_arms_are_grouped_rows_with_compact_marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = many_factor_arms(tmp_path)
    inference = book.inference()
    assert len(LRS) * len(WIDTHS) > figures.COMPACT_ARMS
    goal = draw_goal(inference)
    assert goal is not None
    ax = goal.figure.axes[0]
    assert ax.get_yticklabels() == []  # many arms: labels are texts beside the axis, not ticks
    labels = arm_labels(ax)
    # A run of arms with the same lr is a group; only its first row names the lr. An arrow marks a verdict.
    assert labels[:7] == ["lr=0.001,width=8 (baseline)", "width=16", "width=32", "width=64", "width=128",
                          "lr=0.01,width=8 ▲", "width=16 ▲"]
    separators = sorted(line.get_ydata()[0] for line in ax.lines if list(line.get_xdata()) == [0, 1])
    assert separators == [4.5, 9.5, 14.5, 19.5, 24.5]
    # The bars: one collection per hatch, one bar per arm, ending at the arm's mean.
    bars = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert sum(len(c.get_paths()) for c in bars) == 30
    assert {c.get_hatch() for c in bars} == {None, "//"}
    ends = sorted(round(float(p.vertices[:, 0].max()), 9) for c in bars for p in c.get_paths())
    assert ends == sorted(round(g.describe.mean, 9) for g in inference.goals)  # type: ignore[arg-type]
    assert "▲ improvement" in legend_labels(goal)
    assert "▲ (improvement)" in goal.caption and "parted from the next by a faint line" in goal.caption
    assert_no_result_numbers(goal.caption, counts=[7])
    # The cost figure lays the arms out the same way.
    cost = draw_cost(inference, book.runs)
    assert cost is not None
    assert arm_labels(cost.figure.axes[0]) == labels
    for panel in cost.figure.axes:
        assert sorted(line.get_ydata()[0] for line in panel.lines if list(line.get_xdata()) == [0, 1]) == separators
    assert "parted from the next by a faint line" in cost.caption
    assert_no_result_numbers(cost.caption, counts=[7])
    # Dense dots are rasterized in the PDF (the rest stays vector), and rendering stays deterministic.
    monkeypatch.setattr(figures, "RASTER_POINTS", 50)
    goal = draw_goal(inference)
    assert goal is not None
    dots = [c for c in goal.figure.axes[0].collections if isinstance(c, PathCollection)]
    assert len(dots) == 1 and dots[0].get_rasterized()
    first, second = render(goal), render(draw_goal(inference))  # type: ignore[arg-type]
    assert first.png == second.png and first.pdf == second.pdf
    assert b"/Subtype /Image" in first.pdf
    assert_files(first, "fig_goal")


def test_few_arms_keep_vector_dots_and_tick_labels(tmp_path: Path) -> None:
    drawing = draw_goal(planted(tmp_path).inference())
    assert drawing is not None
    ax = drawing.figure.axes[0]
    assert [c.get_rasterized() for c in ax.collections if isinstance(c, PathCollection)] == [False]
    assert len(ax.texts) == 0 and len(ax.get_xticklabels()) == 3
    assert b"/Subtype /Image" not in render(drawing).pdf


@pytest.mark.parametrize(
    "name",
    ["short", "lr=0.001,batch=128,optimizer=adamw,schedule=cosine", "x" * 70,
     "a=1, b=2, c=3 and some words; more/less"],
)
def test_wrap_label_keeps_the_name(name: str) -> None:
    wrapped = wrap_label(name, width=20, max_lines=10)
    lines = wrapped.split("\n")
    assert all(len(line) <= 20 for line in lines)
    assert "".join(lines).replace(" ", "") == name.replace(" ", "")
    assert wrap_label(name * 10, width=20, max_lines=2).count("\n") <= 1


def test_cost_figure_panels(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a", "b"))
    book.run("a", 0.5, cost=0.5, seconds=4000)
    book.run("a", 0.6, cost=0.5, seconds=5000)
    book.run("b", None, cost=0.25, seconds=100, status="failed")
    drawing = draw_cost(book.inference(), book.runs)
    assert drawing is not None
    left, right = drawing.figure.axes
    assert [p.get_width() for p in left.patches] == [1.0, 0.25]
    assert left.get_xlabel() == "total cost ($)"
    assert right.get_xlabel() == "wall time per run (min)"
    assert "Hollow dots are runs that did not succeed" in drawing.caption
    assert_no_result_numbers(drawing.caption)
    render(drawing)


def test_names_with_dollars_and_underscores_are_literal(tmp_path: Path) -> None:
    weird = r"budget=$\nosuchsymbol$,lr_max=1e-3"  # mathtext would fail on this
    book = Book(tmp_path, arms(weird, "plain"))
    for name in (weird, "plain"):
        book.run(name, 0.5, curve=[0.1, 0.5])
        book.run(name, 0.7, curve=[0.2, 0.7])
    drawing = draw_goal(book.inference())
    assert drawing is not None
    labels = [t.get_text() for t in drawing.figure.axes[0].get_yticklabels() + drawing.figure.axes[0].get_xticklabels()]
    assert any(label.replace("\n", "").startswith(weird) for label in labels)
    assert_files(render(drawing), "fig_goal")
