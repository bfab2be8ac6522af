"""The paper's figures, drawn from a real ledger through the real summary and inference."""

from __future__ import annotations

import hashlib
import os
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


def test_curves_never_drop_an_arm_past_the_palette(tmp_path: Path) -> None:
    names = [f"arm{i}" for i in range(12)]
    book = Book(tmp_path, arms(*names), baseline="arm5")
    means = {n: 0.3 + 0.05 * i for i, n in enumerate(names)}
    for n, m in means.items():
        for d in (-0.01, 0.01):
            book.run(n, m + d, curve=curve(m + d))
    inference = book.inference()
    drawing = draw_curves(book.ledger, inference, book.runs)
    assert drawing is not None
    panels = [ax for ax in drawing.figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [n + (" (baseline)" if n == "arm5" else "") for n in names]
    for ax, name in zip(panels, names, strict=True):  # each arm drawn, with the baseline behind the others
        assert len(ax.lines) == (1 if name == "arm5" else 2)
    assert "One panel per arm (12 arms)" in drawing.caption and "baseline's mean curve in grey" in drawing.caption
    # "on shared axes": every panel shows the same limits, which hold every panel's curves and bands...
    assert len({(ax.get_xlim(), ax.get_ylim()) for ax in panels}) == 1
    low, high = panels[0].get_ylim()
    assert all(low <= y <= high for ax in panels for line in ax.lines for y in line.get_ydata())
    # ...and only the outer panels label their ticks: 5 columns, so y on arm0, arm5 and arm10; x on the lowest
    # panel of each column (the last row holds arm10 and arm11: arm7, arm8 and arm9 have nothing below them)
    def labelled(ticks: str) -> list[str]:
        return [ax.get_title() for ax in panels
                if any(t.get_visible() for t in getattr(ax, f"get_{ticks}ticklabels")())]

    assert labelled("y") == ["arm0", "arm5 (baseline)", "arm10"]
    assert labelled("x") == ["arm7", "arm8", "arm9", "arm10", "arm11"]
    assert_no_result_numbers(drawing.caption, counts=[12])
    colors = arm_colors(inference)
    assert set(colors.values()) == {figures.PALETTE[0], figures.PALETTE[1]} and colors["arm5"] == figures.PALETTE[1]


def test_train_and_validation_metrics_share_a_panel_and_the_spec_can_choose(tmp_path: Path) -> None:
    assert figures.curve_panels(["acc", "train_loss", "val_loss", "lr", "f1/train", "f1/val"], "acc") == [
        ("acc",), ("train_loss", "val_loss"), ("lr",), ("f1/train", "f1/val")]
    book = Book(tmp_path, arms("a", "b"))
    for arm, shift in (("a", 0.0), ("b", 0.1)):
        for _ in range(2):
            book.run(arm, 0.8 + shift, curve=curve(0.8 + shift),
                     extra={"train_loss": [2.0, 1.0, 0.5 - shift], "val_loss": [2.1, 1.2, 0.7], "epoch": [1, 2, 3]})
    drawing = draw_curves(book.ledger, book.inference(), book.runs)
    assert drawing is not None
    titles = [ax.get_title() for ax in drawing.figure.axes if ax.get_visible()]
    assert titles == ["acc", "train_loss and val_loss"]  # a counter such as epoch is not a learning curve
    pair = drawing.figure.axes[1]
    assert [line.get_linestyle() for line in pair.lines] == ["--", "--", "-", "-"]
    assert "Dashed lines are training metrics" in drawing.caption

    chosen = draw_curves(book.ledger, book.inference(), book.runs, metrics=["val_loss", "epoch", "grad_norm"])
    assert chosen is not None
    assert [ax.get_title() for ax in chosen.figure.axes if ax.get_visible()] == ["val_loss", "epoch"]
    assert "Not drawn, as no run reported more than one finite value of it: grad_norm." in chosen.caption


def test_the_y_axis_fits_late_training(tmp_path: Path) -> None:
    book = Book(tmp_path, arms("a"))
    loss = [10.0, 3.0] + [0.5 - 0.01 * i for i in range(18)]
    book.run("a", 0.9, extra={"loss": loss})
    book.run("a", 0.9, extra={"loss": [v + 0.02 for v in loss]})
    drawing = draw_curves(book.ledger, book.inference(), book.runs)
    assert drawing is not None
    low, high = drawing.figure.axes[0].get_ylim()
    assert 0.25 < low < 0.33 and 0.45 < high < 0.52  # the values after the first 30% of steps
    assert "early values beyond it run off the axis" in drawing.caption


# -- main effects --------------------------------------------------------------------------


def test_factorial_design_gives_one_panel_per_factor(tmp_path: Path) -> None:
    lrs, widths = GRID_LRS, GRID_WIDTHS
    book = grid_book(tmp_path, curves=False)
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
    assert [f.stem for f in out] == ["fig_goal", "fig_main_effects", "fig_interaction", "fig_cost"]
    assert_files(out[1], "fig_main_effects")
    assert_files(out[2], "fig_interaction")


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


GRID_LRS, GRID_WIDTHS = ("0.1", "0.3", "1.0"), ("64", "256")


def grid_book(tmp_path: Path, *, curves: bool = True) -> Book:
    """Two crossed factors with replicates, lr with a planted effect: every figure (learning curves only
    with ``curves``), the interaction's hover regions included."""
    grid = [PlannedArm(name=f"lr={lr},width={w}", env={"LR": lr, "W": w}, factors={"lr": lr, "width": w})
            for lr in GRID_LRS for w in GRID_WIDTHS]
    book = Book(tmp_path, grid)
    rng = np.random.default_rng(0)
    for arm in grid:
        for _ in range(3):
            final = 0.5 + 0.1 * GRID_LRS.index(arm.factors["lr"]) + rng.normal(0, 0.01)
            book.run(arm.name, final, curve=curve(final) if curves else ())
    return book


def test_render_all_in_two_processes_gives_the_files_of_render(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    book = grid_book(tmp_path)
    inference = book.inference()
    alone = [render(d) for d in figures.all_drawings(book.ledger, inference, book.runs)]
    monkeypatch.setattr(figures, "_can_fork", lambda: True)  # a test runner's threads would rule the fork out
    together = figures.render_all(figures.all_drawings(book.ledger, inference, book.runs))
    assert [f.stem for f in together] == ["fig_goal", "fig_curves", "fig_main_effects", "fig_interaction", "fig_cost"]
    assert together == alone  # the same bytes, captions and hover regions
    assert together[3].regions


def test_render_all_renders_the_pdfs_itself_when_its_child_fails(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    inference = planted(tmp_path).inference()
    first, second = draw_goal(inference), draw_goal(inference)
    assert first is not None and second is not None
    alone = render(first)
    parent, pdf_of = os.getpid(), figures._pdf_of

    def fails_in_the_child(drawing: figures.Drawing) -> bytes:
        if os.getpid() != parent:
            raise RuntimeError("a child that cannot render")
        return pdf_of(drawing)

    monkeypatch.setattr(figures, "_can_fork", lambda: True)
    monkeypatch.setattr(figures, "_pdf_of", fails_in_the_child)
    assert figures.render_all([second]) == [alone]


def test_a_factor_of_many_levels_labels_every_kth_level(tmp_path: Path) -> None:
    levels = [str(i) for i in range(200)]
    grid = [PlannedArm(name=f"k={k}", env={"K": k}, factors={"k": k}) for k in levels]
    book = Book(tmp_path, grid)
    for i, arm in enumerate(grid):
        book.run(arm.name, float(i))
    drawing = draw_main_effects(book.inference())
    assert drawing is not None
    ax = drawing.figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    step = int(ax.get_xticks()[1])
    assert 1 < step < 20 and labels == levels[::step]
    assert ax.get_xticks().tolist() == list(range(0, 200, step))
    assert_files(render(drawing), "fig_main_effects")


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
    assert curves is not None and sum(ax.get_visible() for ax in curves.figure.axes) == 100  # no arm dropped
    goal = draw_goal(inference)
    assert goal is not None
    ax = goal.figure.axes[0]
    labels = arm_labels(ax)
    assert len(labels) == 100  # arms are rows
    assert all(len(line) <= figures.LABEL_WIDTH for label in labels for line in label.split("\n"))
    # Sorted best first (the goal rises with i), every name starting with the same setting: only the first row
    # spells it out.
    assert labels[0].startswith("optimizer=adamw,") and "warmup=99" in labels[0].replace("\n", "")
    assert not any("optimizer" in label for label in labels[1:])
    assert "warmup=98" in labels[1].replace("\n", "") and labels[-1].endswith("(baseline)")
    assert "only the first row spells it out" in goal.caption and "sorted best first" in goal.caption
    cost = draw_cost(inference, book.runs)  # drawn, not rendered, for speed
    assert cost is not None and len(arm_labels(cost.figure.axes[0])) == 100
    width, height = goal.figure.get_size_inches()
    assert width <= figures.MAX_WIDTH_IN and height <= figures.MAX_HEIGHT_IN
    colors = arm_colors(inference)  # no arm greyed out: color marks the baseline only
    assert figures.OTHER_COLOR not in colors.values() and colors[names[0]] == figures.PALETTE[1]
    assert "grey" not in goal.caption


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
    # A dot plot sorted best first: the goal rises with lr, so the lr=3.0 arms come first, and an arrow marks a
    # verdict. A run of arms with the same lr is a group; only its first row names the lr.
    assert len(labels) == 30 and labels[0].startswith("lr=3.0,") and labels[5].startswith("lr=1.0,")
    assert "lr=0.001,width=8 (baseline)" in labels and sum("▲" in label for label in labels) == 25
    rows = sorted(range(30), key=lambda i: -(inference.goals[i].describe.mean or 0.0))
    diamonds = next(c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets()) == 30)
    assert np.allclose(diamonds.get_offsets()[:, 0], [inference.goals[i].describe.mean for i in rows])
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no bars
    assert "▲ improvement" in goal.caption and "parted from the next by a faint line" in goal.caption
    assert_no_result_numbers(goal.caption)
    cost = draw_cost(inference, book.runs)
    assert cost is not None and len(arm_labels(cost.figure.axes[0])) == 30
    for panel in cost.figure.axes:  # the cost figure keeps the spec's order, one group per lr
        assert sorted(line.get_ydata()[0] for line in panel.lines
                      if list(line.get_xdata()) == [0, 1]) == [4.5, 9.5, 14.5, 19.5, 24.5]
    assert "parted from the next by a faint line" in cost.caption
    assert_no_result_numbers(cost.caption)
    # Dense dots are rasterized in the PDF (the rest stays vector), and rendering stays deterministic.
    monkeypatch.setattr(figures, "RASTER_POINTS", 50)
    goal = draw_goal(inference)
    assert goal is not None
    dots = [c for c in goal.figure.axes[0].collections if isinstance(c, PathCollection)]
    assert [c.get_rasterized() for c in dots] == [False, True]  # the 30 diamonds stay vector, the 90 runs do not
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


def test_two_factors_draw_a_heatmap_of_cell_means_and_an_interaction_plot(tmp_path: Path) -> None:
    depths, widths = ("1", "2"), ("4", "16", "64")
    grid = [PlannedArm(name=f"DEPTH={d},WIDTH={w}", env={"D": d, "W": w}, factors={"DEPTH": d, "WIDTH": w})
            for d in depths for w in widths]
    book = Book(tmp_path, grid)
    planted_means = {(d, w): 0.5 + 0.1 * widths.index(w) * (1 if d == "1" else -1) for d in depths for w in widths}
    for arm in grid:
        for shift in (-0.01, 0.0, 0.01):
            book.run(arm.name, planted_means[(arm.factors["DEPTH"], arm.factors["WIDTH"])] + shift)
    inference = book.inference()
    drawing = figures.draw_interaction(inference)
    assert drawing is not None
    heat, lines = drawing.figure.axes[:2]
    # Rows are the factor with fewer levels; each cell is its arm's mean.
    expected = [[planted_means[(d, w)] for w in widths] for d in depths]
    assert np.allclose(heat.images[0].get_array(), expected)
    assert [t.get_text() for t in heat.get_yticklabels()] == list(depths)
    assert [t.get_text() for t in heat.get_xticklabels()] == list(widths)
    drawn = [line for line in lines.lines if not line.get_label().startswith("_")]  # not the error bars' caps
    assert [line.get_label() for line in drawn] == ["DEPTH=1", "DEPTH=2"]
    assert [np.allclose(line.get_ydata(), row) for line, row in zip(drawn, expected, strict=True)] == [True] * 2
    assert len(drawing.hover) == 6 and all("95% CI [" in text for _, _, text in drawing.hover)
    assert_no_result_numbers(drawing.caption)
    rendered = render(drawing)
    assert len(rendered.regions) == 6
    for left, top, width, height, _ in rendered.regions:
        assert 0 <= left and left + width <= 1 and 0 <= top and top + height <= 1
    # The cell of DEPTH=1,WIDTH=4 is left of DEPTH=1,WIDTH=16's and above DEPTH=2,WIDTH=4's.
    by_arm = {text.split(":")[0].removesuffix(" (baseline)"): region for *region, text in rendered.regions}
    assert by_arm["DEPTH=1,WIDTH=4"][0] < by_arm["DEPTH=1,WIDTH=16"][0]
    assert by_arm["DEPTH=1,WIDTH=4"][1] < by_arm["DEPTH=2,WIDTH=4"][1]
    # One factor: nothing to cross.
    assert figures.draw_interaction(planted(tmp_path / "one").inference()) is None


def test_report_curves_is_a_checked_spec_key(tmp_path: Path) -> None:
    from planted import spec_text
    from ratiocinator.errors import SpecError
    from ratiocinator.spec.models import load_spec

    good = tmp_path / "good.yaml"
    good.write_text(spec_text(report={"curves": ["train_loss", "val_loss"]}))
    assert load_spec(good).spec.report.curves == ["train_loss", "val_loss"]
    for name, report, message in (("empty", {"curves": []}, "name at least one metric"),
                                  ("typo", {"curve": ["loss"]}, "curves")):
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(spec_text(report=report))
        with pytest.raises(SpecError, match=message) as info:
            load_spec(bad)
        assert f"{name}.yaml:" in str(info.value)


def test_more_factors_cross_the_pair_of_the_strongest_interaction_pooling_the_rest(tmp_path: Path) -> None:
    levels = {"opt": ("sgd", "adam"), "seedset": ("a", "b"), "lr": ("0.01", "0.1", "1.0")}
    grid = [PlannedArm(name=f"opt={o},seedset={s},lr={lr}", env={}, factors={"opt": o, "seedset": s, "lr": lr})
            for o in levels["opt"] for s in levels["seedset"] for lr in levels["lr"]]
    book = Book(tmp_path, grid)
    rng = np.random.default_rng(5)
    for arm in grid:
        o, lr = arm.factors["opt"], levels["lr"].index(arm.factors["lr"])
        for _ in range(4):  # adam gains with lr, sgd loses: an opt × lr interaction; seedset does nothing
            book.run(arm.name, 0.6 + (0.08 if o == "adam" else -0.08) * lr + rng.normal(0, 0.005))
    inference = book.inference()
    drawing = figures.draw_interaction(inference)
    assert drawing is not None
    heat = drawing.figure.axes[0]
    assert heat.get_ylabel() == "opt" and heat.get_xlabel() == "lr"
    pooled = {(o, lr): np.mean([v for g in inference.goals if g.summary.arm.factors["opt"] == o
                                and g.summary.arm.factors["lr"] == lr for v in g.stats.values])
              for o in levels["opt"] for lr in levels["lr"]}
    expected = [[pooled[(o, lr)] for lr in levels["lr"]] for o in levels["opt"]]
    assert np.allclose(heat.images[0].get_array(), expected)
    assert all("(2 arms pooled)" in text for _, _, text in drawing.hover)
    assert "pooled over seedset" in drawing.caption and "most significant interaction term" in drawing.caption
    assert_no_result_numbers(drawing.caption)
