"""The paper's figures, drawn from the inference and the ledger's metric points.

Each figure is a ``matplotlib.figure.Figure`` built directly on an Agg canvas (never
pyplot, so no figure stays registered anywhere) under a fixed style, and saved twice
from the same object: a PNG for HTML/Markdown and a vector PDF (TrueType fonts, which
paper venues accept where Type 3 fonts are rejected) for LaTeX; only a cloud of
thousands of run dots is rasterized inside the PDF. Output is deterministic for a given
matplotlib: the PNG carries no software tag and the PDF no creation date.

Text dominates the drawing time of a figure with many arms, so above ``COMPACT_ARMS``
arms the labels say less (a verdict as an arrow; a group of arms sharing their first
setting names it once) and are plain texts rather than ticks, and bars are collections.

Captions describe what is drawn and never quote a number computed from the results,
so every number of the paper stays a traceable fact; counts of arms are the exception.
Every arm keeps one color in every figure (``arm_colors``), from the Okabe-Ito
palette, which stays distinguishable under the common color-vision deficiencies.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory, offset_copy

from ratiocinator.analysis.inference import ALPHA, Inference, Verdict
from ratiocinator.analysis.stats import CONFIDENCE
from ratiocinator.store import instances
from ratiocinator.store.ledger import NO_STEP

if TYPE_CHECKING:
    from ratiocinator.store.ledger import Ledger, RunRow

P = ParamSpec("P")
R = TypeVar("R")

GOAL_STEM = "fig_goal"
CURVES_STEM = "fig_curves"
MAIN_EFFECTS_STEM = "fig_main_effects"
INTERACTION_STEM = "fig_interaction"
COST_STEM = "fig_cost"

FIGURE_DPI = 100
# Dots of more runs than RASTER_POINTS are rasterized in the PDF, at RASTER_DPI: thousands
# of vector markers make a slow and heavy PDF, and a cloud of them shows no single one anyway.
RASTER_DPI = 150
RASTER_POINTS = 1000
# zlib level of the PNG: 3 packs these figures tighter than the default 6, in about two thirds of the time.
PNG_COMPRESSION = 3
# Okabe & Ito (2008), with black (the color of dots and error bars here) swapped for
# Paul Tol's wine, and yellow last (it is faint on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#882255", "#F0E442")
# Arms past the palette: a hundred arms cannot have a hundred distinguishable colors.
OTHER_COLOR = "#BBBBBB"
INK = "#222222"
# Above this many arms, or with labels longer than this, arm axes are laid out
# horizontally (one row per arm, labels left of the axis, read without tilting).
HORIZONTAL_ARMS = 12
HORIZONTAL_LABEL = 24
LABEL_WIDTH = 28
LABEL_LINES = 4
MAX_WIDTH_IN = 14.0
MAX_HEIGHT_IN = 40.0
# A column of more arms than this gets its value axis repeated on top.
TOP_AXIS_ARMS = 25
# Above this many arms, an arm label marks a verdict with its arrow alone (see _arm_label).
COMPACT_ARMS = 25
# Points between an arm label and its axis when labels are texts rather than ticks (as ticks
# they sit the tick length plus its pad away; those rows have no tick marks).
LABEL_PAD_PT = 4.0
# A learning curve with fewer points than this gets a marker on every point.
MARKER_POINTS = 30
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": INK,
    "text.color": INK,
    "axes.labelcolor": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "text.parse_math": False,  # an arm named "lr=$a$" is a name, not mathtext
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.hashsalt": "ratiocinator",
}


@dataclass(frozen=True)
class FigureFile:
    """One rendered figure: ``{stem}.png`` for HTML/Markdown, ``{stem}.pdf`` for LaTeX."""

    stem: str
    caption: str
    png: bytes
    pdf: bytes
    # Areas of the PNG that show a text on hover in HTML: (left, top, width, height) as fractions, text.
    regions: tuple[tuple[float, float, float, float, str], ...] = ()


@dataclass(frozen=True)
class Drawing:
    """A figure before rendering: what tests and callers can inspect."""

    stem: str
    figure: Figure
    caption: str
    # (axes, (x0, y0, x1, y1) in its data coordinates, text): what HTML shows on hover over that area.
    hover: tuple[tuple[Any, tuple[float, float, float, float], str], ...] = ()


# -- rendering -----------------------------------------------------------------------


@contextmanager
def _style() -> Iterator[None]:
    """Matplotlib's defaults plus ours, whatever a matplotlibrc or caller has set; restored on exit."""
    with matplotlib.style.context(["default", _STYLE]):
        yield


def _styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Build a figure under the fixed style, so a drawing looks the same however it is later saved."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _style():
            return draw(*args, **kwargs)

    return wrapper


def render(drawing: Drawing) -> FigureFile:
    """PNG (dpi 100) and vector PDF of one drawing, both cropped to their content."""
    fig = drawing.figure
    with _style():
        # One layout pass finds the content's box for both files (text layout is the slow
        # part of a figure with a hundred labels); matplotlib's "tight" would redo it per file.
        box = _content_box(fig)
        png = _png(fig, box)
        pdf = _pdf(fig, box)
        regions = tuple(_region(ax, corners, text, box) for ax, corners, text in drawing.hover)
    fig.clear()
    return FigureFile(drawing.stem, drawing.caption, png, pdf, regions)


def render_all(drawings: Sequence[Drawing]) -> list[FigureFile]:
    """Every drawing rendered, as ``render`` does, with the PDFs made by a forked process beside this one.

    The two halves take about as long (the PDF side also imports matplotlib's PDF backend), so a
    second core halves the figures' time. Each side lays the figure out itself: layout is
    deterministic, so both find the same box and the files are byte for byte those of ``render``.
    Where forking is unsafe or pays nothing (see ``_can_fork``), or the child fails, this process
    renders everything itself.
    """
    if not drawings or not _can_fork():
        return [render(d) for d in drawings]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the PDFs, pickled down the pipe; it never returns to the caller
        status = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump([_pdf_of(d) for d in drawings], pipe)
            status = 0
        finally:
            os._exit(status)  # whatever happened, the child must not run on as the caller
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            pngs = [_png_of(d) for d in drawings]
            made = pipe.read()
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
    pdfs: list[bytes] = pickle.loads(made) if status == 0 else [_pdf_of(d) for d in drawings]
    for drawing in drawings:
        drawing.figure.clear()
    return [FigureFile(d.stem, d.caption, png, pdf, regions)
            for d, (png, regions), pdf in zip(drawings, pngs, pdfs, strict=True)]


def _can_fork() -> bool:
    """Whether a forked process may render beside this one: on Linux (macOS' system libraries are not
    fork-safe), with a second core to run on, and no other thread, whose locks a fork would copy
    in whatever state they are."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) > 1 and threading.active_count() == 1


def _png_of(drawing: Drawing) -> tuple[bytes, tuple[tuple[float, float, float, float, str], ...]]:
    with _style():
        box = _content_box(drawing.figure)
        png = _png(drawing.figure, box)
        return png, tuple(_region(ax, corners, text, box) for ax, corners, text in drawing.hover)


def _pdf_of(drawing: Drawing) -> bytes:
    with _style():
        return _pdf(drawing.figure, _content_box(drawing.figure))


def _content_box(fig: Figure) -> Any:
    """The box (inches) both files are cropped to: the figure's content, padded."""
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(FIGURE_DPI)
    if fig.get_layout_engine() is not None:  # panels are placed at draw time...
        fig.draw_without_rendering()
        fig.set_layout_engine(None)  # ...once: each save would place them again (they keep their places)
    return fig.get_tightbbox(canvas.get_renderer()).padded(matplotlib.rcParams["savefig.pad_inches"])


def _png(fig: Figure, box: Any) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=FIGURE_DPI, bbox_inches=box, metadata={"Software": None},
                pil_kwargs={"compress_level": PNG_COMPRESSION})
    return out.getvalue()


def _pdf(fig: Figure, box: Any) -> bytes:
    out = io.BytesIO()
    # dpi only sets the resolution of rasterized artists (dense dots); everything else stays vector.
    fig.savefig(out, format="pdf", dpi=RASTER_DPI, bbox_inches=box, metadata={"CreationDate": None})
    return out.getvalue()


def _region(ax: Any, corners: tuple[float, float, float, float], text: str,
            box: Any) -> tuple[float, float, float, float, str]:
    """A data-coordinate rectangle as fractions of the cropped image, measured from its top left."""
    x0, y0, x1, y1 = corners
    (px0, py0), (px1, py1) = ax.transData.transform([(x0, y0), (x1, y1)]) / FIGURE_DPI  # inches
    left, right = sorted((px0, px1))
    bottom, top = sorted((py0, py1))
    return ((left - box.x0) / box.width, (box.y1 - top) / box.height, (right - left) / box.width,
            (top - bottom) / box.height, text)


def _rendered(drawing: Drawing | None) -> FigureFile | None:
    return None if drawing is None else render(drawing)


def _new_figure(width: float, height: float, *, constrained: bool = False) -> Figure:
    """A figure on its own Agg canvas. Saving crops to the content (``bbox_inches="tight"``), so
    labels reaching past the edge are kept; constrained layout, slow with many labels, is only
    used to space several panels."""
    fig = Figure(figsize=(min(width, MAX_WIDTH_IN), min(height, MAX_HEIGHT_IN)),
                 layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


# -- labels and colors -----------------------------------------------------------------


def wrap_label(text: str, width: int = LABEL_WIDTH, max_lines: int = LABEL_LINES) -> str:
    """Break a long arm name into lines after ``,``, spaces, ``;`` or ``/``; cut very long names with an ellipsis."""
    if len(text) <= width:
        return text
    tokens: list[str] = []
    current = ""
    for ch in text:
        current += ch
        if ch in ", ;/":
            tokens.append(current)
            current = ""
    if current:
        tokens.append(current)
    lines: list[str] = []
    line = ""
    for token in tokens:
        while len(token) > width:  # one token longer than a line: hard break
            if line:
                lines.append(line)
                line = ""
            lines.append(token[:width])
            token = token[width:]
        if len(line) + len(token.rstrip()) > width and line:
            lines.append(line)
            line = ""
        line += token
    if line:
        lines.append(line)
    lines = [ln.strip() for ln in lines if ln.strip()]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)


def _goal_rank(inference: Inference) -> list[str]:
    """Arm names, best goal mean first; arms without a mean last, in spec order."""
    sign = -1.0 if inference.summary.maximize else 1.0
    with_mean = [(g.describe.mean, g.name) for g in inference.goals if g.describe.mean is not None]
    ranked = sorted(with_mean, key=lambda pair: sign * pair[0])
    return [name for _, name in ranked] + [g.name for g in inference.goals if g.describe.mean is None]


def arm_colors(inference: Inference) -> dict[str, str]:
    """One color per arm, the same in every figure.

    Up to ``len(PALETTE)`` arms take the palette in spec order. With more arms, every
    figure labels each arm on its axis or panel instead, so color only marks the baseline:
    repeating colors would suggest groups that do not exist, and greying arms out would
    hide them.
    """
    names = [a.name for a in inference.summary.arms]
    if len(names) <= len(PALETTE):
        return {name: PALETTE[i] for i, name in enumerate(names)}
    return {name: PALETTE[1] if name == inference.baseline else PALETTE[0] for name in names}


def _arm_label(inference: Inference, name: str, *, compact: bool = False, shown: str | None = None) -> str:
    """An arm's axis label: its wrapped name (or ``shown``), with the baseline and a verdict marked.

    ``compact`` (many arms) marks a verdict with its arrow alone, on the name's last line when
    it fits: a hundred repeats of "(▲ improvement)" double the text to read (and to draw) and
    say nothing the hatching and the legend do not.
    """
    comparison = inference.comparison(name)
    verdict = None if comparison is None else comparison.verdict
    label = wrap_label(name if shown is None else shown)
    if compact:
        marks = ["(baseline)"] if name == inference.baseline else []
        marks += ["▲"] if verdict is Verdict.IMPROVEMENT else ["▼"] if verdict is Verdict.REGRESSION else []
        if not marks:
            return label
        suffix = " ".join(marks)
        last = label.rsplit("\n", 1)[-1]
        return f"{label} {suffix}" if len(last) + 1 + len(suffix) <= LABEL_WIDTH else f"{label}\n{suffix}"
    marks = ["baseline"] if name == inference.baseline else []
    if verdict is Verdict.IMPROVEMENT:
        marks.append("▲ improvement")
    elif verdict is Verdict.REGRESSION:
        marks.append("▼ regression")
    return f"{label}\n({', '.join(marks)})" if marks else label


def _first_setting(name: str) -> str | None:
    """``lr=0.1`` of an arm named by its settings, ``lr=0.1,width=64``; None for other names."""
    head, comma, rest = name.partition(",")
    return head if comma and rest and "=" in head else None


@dataclass(frozen=True)
class _ArmAxis:
    """Where arms sit on a categorical axis: columns, or rows for many or long labels.

    ``groups`` (many arms named by their settings; empty otherwise) are the rows that start a
    run of arms sharing their first setting; the other rows of a run show only the rest of their name.
    """

    horizontal: bool
    labels: tuple[str, ...]
    fontsize: float
    groups: tuple[int, ...] = ()

    @staticmethod
    def of(labels: Sequence[str]) -> _ArmAxis:
        longest = max((max(len(line) for line in label.split("\n")) for label in labels), default=0)
        horizontal = len(labels) > HORIZONTAL_ARMS or longest > HORIZONTAL_LABEL
        fontsize = 8.0 if len(labels) <= 40 else max(5.0, 8.0 - (len(labels) - 40) / 20)
        return _ArmAxis(horizontal, tuple(labels), fontsize)

    @staticmethod
    def of_arms(inference: Inference, names: Sequence[str]) -> _ArmAxis:
        """The axis of these arms, in this order, labelled by ``_arm_label``.

        Many arms named by their settings are grouped: a hundred rows that begin with the
        same ten ``lr=...`` are harder to scan, and twice the text to draw, than ten groups.
        """
        if len(names) <= COMPACT_ARMS:
            return _ArmAxis.of([_arm_label(inference, n) for n in names])
        firsts = [_first_setting(n) for n in names]
        short = [i > 0 and firsts[i] is not None and firsts[i] == firsts[i - 1] for i in range(len(names))]
        labels = [_arm_label(inference, n, compact=True, shown=n.partition(",")[2] if cut else None)
                  for n, cut in zip(names, short, strict=True)]
        groups = tuple(i for i in range(len(names)) if not short[i]) if any(short) else ()
        return replace(_ArmAxis.of(labels), groups=groups)

    def extent(self) -> float:
        """Inches the arm axis needs."""
        lines = sum(max(1, label.count("\n") + 1) for label in self.labels)
        per_line = self.fontsize / 72 * 1.25
        if self.horizontal:
            return max(2.4, lines * per_line + 0.15 * len(self.labels) + 0.8)
        return max(3.0, 0.75 * len(self.labels) + 1.2)

    @property
    def many(self) -> bool:
        """More arms than ``COMPACT_ARMS``: compact labels, drawn as texts; bars as collections."""
        return len(self.labels) > COMPACT_ARMS

    def apply(self, ax: Any) -> None:
        positions = range(len(self.labels))
        if self.horizontal and self.many:
            # Plain texts rather than ticks: a tick is five artists, and a hundred of them
            # cost more to build and draw than the labels they carry.
            ax.set_yticks([])
            at = offset_copy(blended_transform_factory(ax.transAxes, ax.transData), fig=ax.get_figure(),
                             x=-LABEL_PAD_PT, units="points")
            for i, label in enumerate(self.labels):
                ax.text(0.0, i, label, transform=at, fontsize=self.fontsize, ha="right", va="center")
            ax.set_ylim(len(self.labels) - 0.5, -0.5)
            self.separate(ax)
        elif self.horizontal:
            ax.set_yticks(positions, self.labels, fontsize=self.fontsize)
            ax.set_ylim(len(self.labels) - 0.5, -0.5)  # first arm on top
        else:
            tilt = len(self.labels) > 3 or any(len(line) > 12 for label in self.labels for line in label.split("\n"))
            ax.set_xticks(positions, self.labels, fontsize=self.fontsize,
                          rotation=30 if tilt else 0, ha="right" if tilt else "center",
                          rotation_mode="anchor" if tilt else "default")
            ax.set_xlim(-0.6, len(self.labels) - 0.4)

    def separate(self, ax: Any) -> None:
        """A faint line between groups of rows (see ``groups``)."""
        for row in self.groups[1:]:
            ax.axhline(row - 0.5, color=INK, linewidth=0.6, alpha=0.35, zorder=0.5)

    def group_note(self) -> str:
        """The caption's word on grouped rows."""
        if not self.groups:
            return ""
        if len(self.groups) == 1:
            return " Every arm shares the first setting of its name; only the first row spells it out."
        return (" Consecutive arms that share the first setting of their name form a group, parted from the next"
                " by a faint line; only the group's first row spells that setting out.")


_HATCH: dict[Verdict | None, str] = {Verdict.IMPROVEMENT: "//", Verdict.REGRESSION: "\\\\"}
BAR_WIDTH = 0.6


def _bars(ax: Any, values: np.ndarray, colors: Sequence[str], *, alpha: float, horizontal: bool,
          hatches: Sequence[str | None] | None = None, many: bool = False) -> None:
    """A bar from zero per arm, at positions 0, 1, ...; hatched where ``hatches`` says.

    With many arms the bars are one collection per hatch rather than a patch each: a hundred
    patches cost more to build and to draw than the bars are worth.
    """
    hatches = list(hatches) if hatches is not None else [None] * len(values)
    if not many:
        bars = (ax.barh if horizontal else ax.bar)(np.arange(len(values)), values, BAR_WIDTH, color=colors,
                                                   alpha=alpha, edgecolor=INK, linewidth=0.6)
        for patch, hatch in zip(bars.patches, hatches, strict=True):
            patch.set_hatch(hatch)
        return
    half = BAR_WIDTH / 2
    for hatch in dict.fromkeys(hatches):  # first-seen order, so the output is deterministic
        idx = [i for i, h in enumerate(hatches) if h == hatch]
        boxes = [[(0, i - half), (values[i], i - half), (values[i], i + half), (0, i + half)] for i in idx]
        if not horizontal:
            boxes = [[(y, x) for x, y in box] for box in boxes]
        bars = PolyCollection(boxes, facecolors=[colors[i] for i in idx], edgecolors=INK, linewidths=0.6,
                              alpha=alpha, hatch=hatch, zorder=1)
        (bars.sticky_edges.x if horizontal else bars.sticky_edges.y).append(0.0)
        ax.add_collection(bars, autolim=True)
    ax.autoscale_view()


def _zoom_to_data(ax: Any, values: Sequence[float], *, axis: str = "y") -> bool:
    """Zoom the value axis when the spread between arms is tiny next to the values themselves.

    Bars from zero make a 0.92 vs 0.90 difference invisible; hiding it would mislead more
    than a truncated axis that the caption announces.
    """
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return False
    low, high = min(values), max(values)
    get, set_ = (ax.get_ylim, ax.set_ylim) if axis == "y" else (ax.get_xlim, ax.set_xlim)
    bottom, top = get()
    spread = high - low
    if spread <= 0 or spread > 0.25 * (top - bottom):
        return False
    pad = 0.15 * spread
    set_(low - pad, high + pad)
    return True


def _jitter(n: int, width: float = 0.18) -> np.ndarray:
    return np.linspace(-width, width, n) if n > 1 else np.zeros(max(n, 0))


def _ci_text() -> str:
    return f"{CONFIDENCE:.0%} t confidence interval"


def _grey_note(inference: Inference, shown: Sequence[str], what: str) -> str:
    """The caption's word on grey arms, when there are more arms than colors."""
    colors = arm_colors(inference)
    if not any(colors[name] == OTHER_COLOR for name in shown):
        return ""
    best = len(PALETTE) - (1 if inference.baseline is not None else 0)
    who = f"the baseline and the {best} arms" if inference.baseline is not None else f"the {best} arms"
    return (f" Only {who} with the best mean {inference.summary.goal_metric} have a color of their own;"
            f" grey {what} are the other arms.")


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


# -- goal metric per arm --------------------------------------------------------------


@_styled
def draw_goal(inference: Inference) -> Drawing | None:
    """Goal metric per arm: bar at the mean, CI error bar, a dot per run, baseline and verdicts marked."""
    summary = inference.summary
    goal = summary.goal_metric
    goals = [g for g in inference.goals if g.describe.mean is not None]
    if not goals:
        return None
    colors = arm_colors(inference)
    # Past the palette the arms are a sorted dot plot: best first, every arm a labelled row, no bar
    # to compare against zero (so the axis fits the data), no arm set apart by a grey.
    dot_plot = len(goals) > len(PALETTE)
    if dot_plot:
        rank = {name: i for i, name in enumerate(_goal_rank(inference))}
        goals = sorted(goals, key=lambda g: rank[g.name])
    layout = _ArmAxis.of_arms(inference, [g.name for g in goals])
    if dot_plot:
        layout = replace(layout, horizontal=True)
    extent = layout.extent()
    fig = _new_figure(7.0, extent) if layout.horizontal else _new_figure(extent, 4.2)
    ax = fig.add_subplot()
    horizontal = layout.horizontal
    value_axis: Literal["x", "y"] = "x" if horizontal else "y"
    # One artist per kind (bars, error bars, dots) rather than per arm: a hundred arms stay quick to draw.
    means = np.asarray([g.describe.mean for g in goals], dtype=float)
    verdicts = [c.verdict if (c := inference.comparison(g.name)) is not None else None for g in goals]
    hatches = [_HATCH.get(v) for v in verdicts]
    if dot_plot:
        rows = np.arange(len(goals), dtype=float)
        x, y = (means, rows) if horizontal else (rows, means)
        ax.scatter(x, y, marker="D", s=30, zorder=6, linewidths=0.6, c=[colors[g.name] for g in goals],
                   edgecolors=INK)
    else:
        _bars(ax, means, [colors[g.name] for g in goals], alpha=0.6, horizontal=horizontal, hatches=hatches,
              many=layout.many)
    marked = {"improvement": Verdict.IMPROVEMENT in verdicts, "regression": Verdict.REGRESSION in verdicts}
    with_ci = [(i, g.describe.ci) for i, g in enumerate(goals) if g.describe.ci is not None]
    shown = means.tolist()
    if with_ci:
        at = np.asarray([i for i, _ in with_ci], dtype=float)
        center = means[at.astype(int)]
        low = np.asarray([ci.low for _, ci in with_ci])
        high = np.asarray([ci.high for _, ci in with_ci])
        err = np.vstack([center - low, high - center])
        kw: dict[str, Any] = {"fmt": "none", "ecolor": INK, "capsize": 4 if len(goals) <= 40 else 2, "linewidth": 1.2,
                              "zorder": 4}
        ax.errorbar(center, at, xerr=err, **kw) if horizontal else ax.errorbar(at, center, yerr=err, **kw)
        shown += low.tolist() + high.tolist()
    values = [np.asarray(g.stats.values, dtype=float) for g in goals]
    dots = np.concatenate(values)
    offsets = np.concatenate([i + _jitter(v.size) for i, v in enumerate(values)])
    most = max(v.size for v in values)
    size, alpha = (14, 0.9) if most <= 20 else (6, 0.5)
    xy = (dots, offsets) if horizontal else (offsets, dots)
    ax.scatter(*xy, color=INK, s=size, alpha=alpha, zorder=5, linewidths=0, rasterized=dots.size > RASTER_POINTS)
    shown += dots.tolist()
    base = next((g for g in goals if g.name == inference.baseline), None)
    if base is not None and base.describe.mean is not None and len(goals) > 1:  # every goal drawn has a mean
        line = ax.axvline if horizontal else ax.axhline
        line(float(base.describe.mean), color=INK, linestyle="--", linewidth=0.9, zorder=1)
    layout.apply(ax)
    direction = "higher" if summary.maximize else "lower"
    (ax.set_xlabel if horizontal else ax.set_ylabel)(f"{goal} ({direction} is better)")
    ax.grid(axis=value_axis, alpha=0.3)
    zoomed = not dot_plot and _zoom_to_data(ax, shown, axis=value_axis)
    top_axis = horizontal and len(goals) > TOP_AXIS_ARMS
    if top_axis:
        ax.tick_params(axis="x", top=True, labeltop=True)

    handles: list[Any] = [
        Line2D([], [], color=INK, marker="o", linestyle="none", markersize=4, label="run"),
        Line2D([], [], color=INK, marker="|", linestyle="-", markersize=8, label=f"{CONFIDENCE:.0%} CI of the mean"),
    ]
    if dot_plot:
        handles.insert(0, Line2D([], [], color=PALETTE[0], marker="D", markeredgecolor=INK, linestyle="none",
                                 label="arm mean"))
    if base is not None and len(goals) > 1:
        handles.append(Line2D([], [], color=INK, linestyle="--", linewidth=0.9, label="baseline mean"))
    if marked["improvement"] and not dot_plot:  # a dot plot names verdicts in its arm labels
        handles.append(Patch(facecolor="white", edgecolor=INK, hatch="//", label="▲ improvement"))
    if marked["regression"] and not dot_plot:
        handles.append(Patch(facecolor="white", edgecolor=INK, hatch="\\\\", label="▼ regression"))
    # Above the axes, where it can cover no bar.
    width = fig.get_size_inches()[0]
    ncol = len(handles) if horizontal or width >= 6 else 2 if width < 4.5 else 3
    above = offset_copy(ax.transAxes, fig=fig, y=0.3 if top_axis else 0.0, units="inches")  # clear of top tick labels
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), bbox_transform=above, ncol=ncol,
              frameon=False, borderaxespad=0.2, handlelength=1.6, columnspacing=1.2)

    if dot_plot:
        caption = (
            f"{goal} per arm ({direction} is better), every arm a row, sorted best first. Each diamond is the mean of"
            f" the arm's succeeded runs, its error bar the {_ci_text()} of that mean, and each dot one run's final"
            " value; the baseline's diamond is orange."
        )
    else:
        caption = (
            f"{goal} per arm ({direction} is better). Each bar is the mean of the arm's succeeded runs, its error bar "
            f"the {_ci_text()} of that mean, and each dot one run's final value."
        )
    if base is not None and len(goals) > 1:
        caption += " The dashed line marks the baseline's mean."
    if dot_plot and inference.comparisons:
        caption += (" An arm labelled ▲ improvement or ▼ regression differs from the baseline in a Holm-corrected"
                    f" Welch test at level {ALPHA:g} by more than the baseline's run-to-run standard deviation.")
        if not any(marked.values()):
            caption += " No arm does."
    elif inference.comparisons:
        caption += (
            " Hatched bars, " + ("with ▲ (improvement) or ▼ (regression) after the arm's name" if layout.many
                                 else "labelled improvement or regression")
            + f", differ from the baseline in a Holm-corrected "
            f"Welch test at level {ALPHA:g} by more than the baseline's run-to-run standard deviation."
        )
        if not any(marked.values()):
            caption += " No arm does."
    if any(g.describe.ci is None for g in goals):
        caption += " An arm with a single run has no error bar."
    if zoomed:
        caption += (" The value axis is zoomed to the data and does not start at zero:"
                    " compare bar ends, not bar lengths.")
    caption += layout.group_note() + _grey_note(inference, [g.name for g in goals], "bars")
    omitted = len(inference.goals) - len(goals)
    if omitted:
        caption += (f" {_plural(omitted, 'arm')} without a finite {goal} value"
                    f" {'is' if omitted == 1 else 'are'} not shown.")
    return Drawing(GOAL_STEM, fig, caption)


def goal_figure(inference: Inference) -> FigureFile | None:
    """``fig_goal``: the goal metric per arm (see ``draw_goal``); None when no arm has a finite value."""
    return _rendered(draw_goal(inference))


# -- learning curves ------------------------------------------------------------------


@dataclass(frozen=True)
class _Curve:
    """One arm's mean curve over its succeeded runs."""

    arm: str
    n_runs: int
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray | None  # the band, None with a single run
    high: np.ndarray | None


_Series = tuple[np.ndarray, np.ndarray, np.ndarray]

# A metric named for its split (train_loss, val_loss, loss/train) shares a panel with its siblings.
_SPLIT = re.compile(r"^(?:(?P<pre>train|training|val|valid|validation|eval|test)[_./-](?P<rest>.+)"
                    r"|(?P<base>.+?)[_./-](?P<post>train|training|val|valid|validation|eval|test))$", re.IGNORECASE)
# Streamed bookkeeping, not a quantity learned: drawn only when report.curves names it.
COUNTERS = frozenset({"epoch", "step", "global_step", "iter", "iteration", "batch", "samples", "tokens"})
# The share of the x range whose values set the y-axis when early training would squash the rest.
LATE_START = 0.3
# The y-axis fits the late region when the whole range is more than this many times the late one.
LATE_SQUASH = 2.5


def _split_of(name: str) -> tuple[str, str]:
    """(what the metric measures, which split): ``val_loss`` -> ("loss", "val"); ``acc`` -> ("acc", "")."""
    match = _SPLIT.match(name)
    if match is None:
        return name, ""
    split = (match.group("pre") or match.group("post")).lower()
    return match.group("rest") or match.group("base"), "train" if split.startswith("train") else split


def curve_panels(names: Sequence[str], goal: str) -> list[tuple[str, ...]]:
    """The metrics drawn together: siblings of one quantity (train and val) share a panel; the goal's comes first."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key, split = _split_of(name)
        groups.setdefault(key if split else f"\0{name}", []).append(name)
    panels = [tuple(sorted(members, key=lambda n: (_split_of(n)[1] != "train", n))) for members in groups.values()]
    return sorted(panels, key=lambda p: goal not in p)


def _linestyle(name: str, panel: Sequence[str]) -> Literal["-", "--"]:
    """Dashed for a training metric drawn beside its held-out sibling; solid otherwise."""
    return "--" if len(panel) > 1 and _split_of(name)[1] == "train" else "-"


def _load(ledger: Ledger, run_ids: Sequence[int], metric: str) -> dict[int, _Series] | None:
    """Every run's series of ``metric``, or None when no run has two finite points of it."""
    series = {rid: ledger.series(rid, metric) for rid in run_ids}
    if any(np.count_nonzero(np.isfinite(v)) >= 2 for _, _, v in series.values()):
        return series
    return None


def _aggregate(arm: str, per_run: Sequence[tuple[np.ndarray, np.ndarray]]) -> _Curve | None:
    """Mean (and band) across runs at each x, over the runs with a finite value there."""
    xs, vs = [], []
    n_runs = 0
    for x, v in per_run:
        if x.size > 1 and np.any(np.diff(x) <= 0):  # a step logged twice: its last value counts
            _, first_in_reversed = np.unique(x[::-1], return_index=True)
            keep = x.size - 1 - first_in_reversed
            x, v = x[keep], v[keep]
        finite = np.isfinite(v)
        if not finite.any():
            continue
        n_runs += 1
        xs.append(x[finite])
        vs.append(v[finite])
    if not n_runs:
        return None
    x_all = np.concatenate(xs)
    v_all = np.concatenate(vs)
    ux, inverse = np.unique(x_all, return_inverse=True)
    count = np.bincount(inverse, minlength=ux.size).astype(float)
    mean = np.bincount(inverse, weights=v_all, minlength=ux.size) / count
    if n_runs == 1:
        return _Curve(arm, 1, ux, mean, None, None)
    if n_runs == 2:
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate(([0], np.cumsum(count[:-1]).astype(np.int64)))
        low = np.minimum.reduceat(v_all[order], starts)
        high = np.maximum.reduceat(v_all[order], starts)
        return _Curve(arm, 2, ux, mean, low, high)
    sq = np.bincount(inverse, weights=(v_all - mean[inverse]) ** 2, minlength=ux.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(count >= 2, np.sqrt(sq / (count - 1)), np.nan)
    return _Curve(arm, n_runs, ux, mean, mean - std, mean + std)


@dataclass(frozen=True)
class _MetricCurves:
    """One metric's mean curve per arm, on a common x (steps when every run reported them)."""

    metric: str
    steps: bool
    curves: dict[str, _Curve]


def _metric_curves(ledger: Ledger, metric: str, run_ids: dict[str, list[int]]) -> _MetricCurves | None:
    series = _load(ledger, [rid for ids in run_ids.values() for rid in ids], metric)
    if series is None:
        return None
    steps = all(not np.any(step == NO_STEP) for _, step, _ in series.values())
    curves = {}
    for arm, ids in run_ids.items():
        per_run = [(step if steps else np.arange(value.size), value)
                   for _, step, value in (series[rid] for rid in ids) if value.size]
        curve = _aggregate(arm, per_run)
        if curve is not None:
            curves[arm] = curve
    return _MetricCurves(metric, steps, curves) if curves else None


def _late_limits(curves: Sequence[_Curve]) -> tuple[float, float] | None:
    """y-limits that fit the late part of training, or None when the whole range reads well already.

    Early training (a loss starting at 10 that ends near 0.3) would squash the differences that
    matter into a flat line; the caption says when early values run off the axis.
    """
    xs = np.concatenate([c.x for c in curves])
    start = xs.min() + LATE_START * (xs.max() - xs.min())
    every, late = [], []
    for c in curves:
        bands = [b for b in (c.low, c.high) if b is not None]
        for values in (c.mean, *bands):
            finite = np.isfinite(values)
            every.append(values[finite])
            late.append(values[finite & (c.x >= start)])
    every_values, late_values = np.concatenate(every), np.concatenate(late)
    if not late_values.size:
        return None
    low, high = float(late_values.min()), float(late_values.max())
    whole = float(every_values.max() - every_values.min())
    if high <= low or whole <= LATE_SQUASH * (high - low):
        return None
    pad = 0.12 * (high - low)
    return low - pad, high + pad


def _x_label(steps: bool, metric: str) -> str:
    return "step" if steps else f"report index (k-th {metric} value of a run)"


@_styled
def draw_curve_figures(ledger: Ledger, inference: Inference, runs: Sequence[RunRow], *,
                       metrics: Sequence[str] | None = None) -> list[Drawing]:
    """Learning curves of every streamed metric (or of ``metrics``), one panel per metric or train/val pair.

    Up to ``len(PALETTE)`` arms share each panel, one color per arm. With more arms each
    panel becomes small multiples, one per arm with the baseline in grey behind it, so
    no arm is dropped and every arm is labelled.
    """
    summary = inference.summary
    arms = [a.name for a in summary.arms]
    run_ids: dict[str, list[int]] = {a: [] for a in arms}
    for r in runs:
        if r.status == "succeeded" and r.arm in run_ids:
            run_ids[r.arm].append(r.id)
    run_ids = {a: ids for a, ids in run_ids.items() if ids}
    if not run_ids:
        return []
    if metrics is None:
        seen: dict[str, None] = {}
        for ids in run_ids.values():
            for rid in ids:
                seen.update(dict.fromkeys(ledger.point_names(rid)))
        names = [summary.goal_metric,
                 *sorted(n for n in seen if n != summary.goal_metric and n.lower() not in COUNTERS)]
    else:
        names = list(metrics)
    loaded = {n: c for n in names if (c := _metric_curves(ledger, n, run_ids)) is not None}
    if not loaded:
        return []
    missing = [n for n in names if n not in loaded]
    panels = [tuple(n for n in panel if n in loaded) for panel in curve_panels(list(loaded), summary.goal_metric)]
    drawn_arms = [a for a in arms if any(a in c.curves for c in loaded.values())]
    if len(drawn_arms) <= len(PALETTE):
        drawings = [_overlaid_curves(inference, panels, loaded, drawn_arms)]
    else:
        drawings = [_small_multiple_curves(inference, panel, loaded, drawn_arms, k) for k, panel in enumerate(panels)]
    note = ""
    if metrics is None and summary.goal_metric not in loaded:
        note = f" {summary.goal_metric} is not drawn: no run reported more than one finite value of it."
    elif metrics is not None and missing:
        note = (f" Not drawn, as no run reported more than one finite value of {'it' if len(missing) == 1 else 'them'}:"
                f" {', '.join(missing)}.")
    return [replace(d, caption=d.caption + note) for d in drawings]


def _curve_caption(inference: Inference, panels: Sequence[tuple[str, ...]], loaded: dict[str, _MetricCurves],
                   arms: Sequence[str]) -> str:
    metrics = [m for panel in panels for m in panel]
    steps = all(loaded[m].steps for m in metrics)
    curves = [c for m in metrics for a, c in loaded[m].curves.items() if a in arms]
    caption = (f"Learning curves of {', '.join(metrics)}: per arm, the mean over its succeeded runs at each "
               + ("step" if steps else "report index (runs did not report steps, so the k-th values are aligned)")
               + ", over the runs that reported a finite value there; failed and interrupted runs are not drawn.")
    if any(_split_of(m)[1] == "train" for m in metrics) and any(len(p) > 1 for p in panels):
        caption += " Dashed lines are training metrics, solid lines their held-out counterparts."
    bands = {c.n_runs >= 3 for c in curves if c.n_runs >= 2}
    if True in bands:
        caption += " Shaded bands span ± one sample standard deviation across runs"
        caption += "; for an arm with two runs, the band spans the two runs (min to max)." if False in bands else "."
    elif False in bands:
        caption += " Shaded bands span the two runs of an arm (min to max)."
    if any(c.n_runs == 1 for c in curves):
        caption += " An arm with a single run has no band."
    return caption


def _late_note(clipped: bool) -> str:
    return (" The y-axis fits the later part of training; early values beyond it run off the axis."
            if clipped else "")


def _overlaid_curves(inference: Inference, panels: Sequence[tuple[str, ...]], loaded: dict[str, _MetricCurves],
                     arms: Sequence[str]) -> Drawing:
    colors = arm_colors(inference)
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.4 * ncols + 2.2, 3.3 * nrows, constrained=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    clipped = False
    for k, panel in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        drawn = []
        for metric in panel:
            for arm in arms:
                curve = loaded[metric].curves.get(arm)
                if curve is None:
                    continue
                drawn.append(curve)
                marker = "." if curve.x.size < MARKER_POINTS else None
                ax.plot(curve.x, curve.mean, color=colors[arm], linestyle=_linestyle(metric, panel), marker=marker,
                        linewidth=2.0 if arm == inference.baseline else 1.3)
                if curve.low is not None and curve.high is not None:
                    ax.fill_between(curve.x, curve.low, curve.high, color=colors[arm], alpha=0.15, linewidth=0)
        limits = _late_limits(drawn)
        if limits is not None:
            ax.set_ylim(*limits)
            clipped = True
        ax.set_title(" and ".join(panel))
        ax.set_ylabel(panel[0] if len(panel) == 1 else _split_of(panel[0])[0])
        ax.set_xlabel(_x_label(all(loaded[m].steps for m in panel), panel[0]))
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    handles: list[Any] = [Line2D([], [], color=colors[a], linewidth=2.0 if a == inference.baseline else 1.3,
                                 label=wrap_label(a, 22, 3) + (" (baseline)" if a == inference.baseline else ""))
                          for a in arms]
    if any(len(p) > 1 for p in panels):
        handles += [Line2D([], [], color=INK, linestyle="--", label="training"),
                    Line2D([], [], color=INK, linestyle="-", label="held-out")]
    fig.legend(handles=handles, loc="outside right upper", frameon=False)
    caption = _curve_caption(inference, panels, loaded, arms)
    if inference.baseline in arms:
        caption += " The thicker line is the baseline."
    return Drawing(CURVES_STEM, fig, caption + _late_note(clipped))


SMALL_MULTIPLE_COLUMNS = 5


def _small_multiple_curves(inference: Inference, panel: tuple[str, ...], loaded: dict[str, _MetricCurves],
                           arms: Sequence[str], k: int) -> Drawing:
    ncols = min(SMALL_MULTIPLE_COLUMNS, len(arms))
    nrows = math.ceil(len(arms) / ncols)
    # A fixed grid rather than constrained layout, which is slow for a hundred panels; axes given the same
    # limits at the end rather than shared, since matplotlib sorts all of a shared group's axes at every look
    # at one's limits (100 panels took 11 s).
    height = 1.55 * nrows + 0.9
    fig = _new_figure(1.9 * ncols + 0.6, height)
    # The bottom margin in inches, not a share of the height: a tall grid kept inches of blank above its x label.
    axes = fig.subplots(nrows, ncols, squeeze=False,
                        gridspec_kw={"hspace": 0.6, "wspace": 0.12, "bottom": min(0.11, 0.8 / height)})
    base = inference.baseline
    drawn = []
    for i, arm in enumerate(arms):
        ax = axes[i // ncols][i % ncols]
        for metric in panel:
            behind = loaded[metric].curves.get(base) if base is not None and arm != base else None
            if behind is not None:
                ax.plot(behind.x, behind.mean, color=OTHER_COLOR, linestyle=_linestyle(metric, panel), linewidth=1.0)
            curve = loaded[metric].curves.get(arm)
            if curve is None:
                continue
            drawn.append(curve)
            color = PALETTE[1] if arm == base else PALETTE[0]
            ax.plot(curve.x, curve.mean, color=color, linestyle=_linestyle(metric, panel), linewidth=1.3)
            if curve.low is not None and curve.high is not None:
                ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.2, linewidth=0)
        ax.set_title(wrap_label(arm, 24, 2) + (" (baseline)" if arm == base else ""), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for i in range(len(arms), nrows * ncols):
        axes[i // ncols][i % ncols].set_visible(False)
    panels = [axes[i // ncols][i % ncols] for i in range(len(arms))]
    _same_axes(panels, ncols)
    limits = _late_limits(drawn) if drawn else None
    if limits is not None:
        for ax in panels:
            ax.set_ylim(*limits)
    fig.supxlabel(_x_label(all(loaded[m].steps for m in panel), panel[0]), fontsize=8)
    fig.supylabel(" and ".join(panel), fontsize=8)
    handles: list[Any] = []
    if len(panel) > 1:
        handles += [Line2D([], [], color=INK, linestyle=_linestyle(m, panel), label=m) for m in panel]
    if base is not None:
        handles.append(Line2D([], [], color=OTHER_COLOR, label=f"baseline {wrap_label(base, 30, 1)}"))
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.9 + 0.1 / nrows),
                   ncol=len(handles), frameon=False)
    caption = _curve_caption(inference, [panel], loaded, arms)
    caption += (f" One panel per arm ({_plural(len(arms), 'arm')}), on shared axes"
                + (", with the baseline's mean curve in grey behind each." if base is not None else "."))
    return Drawing(CURVES_STEM if k == 0 else f"{CURVES_STEM}_{k + 1}", fig, caption + _late_note(limits is not None))


def _same_axes(panels: Sequence[Any], ncols: int) -> None:
    """Every panel's limits fit all panels' data (as sharing the axes would), and only the outer panels
    label their ticks: the first column its y ticks, the lowest panel of each column its x ticks."""
    bounds = [ax.dataLim for ax in panels if np.all(np.isfinite(ax.dataLim.get_points()))]
    if bounds:
        corners = [(min(b.x0 for b in bounds), min(b.y0 for b in bounds)),
                   (max(b.x1 for b in bounds), max(b.y1 for b in bounds))]
        for ax in panels:
            ax.update_datalim(corners)
            ax.autoscale_view()
    for i, ax in enumerate(panels):
        ax.label_outer()
        if i + ncols >= len(panels):  # nothing drawn below it (a short last row): its x ticks say the steps
            ax.tick_params(axis="x", labelbottom=True)


def draw_curves(ledger: Ledger, inference: Inference, runs: Sequence[RunRow], *,
                metrics: Sequence[str] | None = None) -> Drawing | None:
    """The first learning-curve figure (see ``draw_curve_figures``), or None."""
    drawings = draw_curve_figures(ledger, inference, runs, metrics=metrics)
    return drawings[0] if drawings else None


def curves_figure(ledger: Ledger, inference: Inference, runs: Sequence[RunRow], *,
                  metrics: Sequence[str] | None = None) -> FigureFile | None:
    """``fig_curves``: mean learning curves (see ``draw_curve_figures``); None when no metric was streamed twice."""
    return _rendered(draw_curves(ledger, inference, runs, metrics=metrics))


def curve_figures(ledger: Ledger, inference: Inference, runs: Sequence[RunRow], *,
                  metrics: Sequence[str] | None = None) -> list[FigureFile]:
    """``fig_curves`` (and ``fig_curves_2``... with small multiples of many arms)."""
    return [render(d) for d in draw_curve_figures(ledger, inference, runs, metrics=metrics)]


# -- main effects ---------------------------------------------------------------------


def _tick_step(labels: Sequence[str], spacing_in: float, fontsize: float = 8.0) -> int:
    """Label every ``step``-th tick: tick labels tilted by 30° overlap when neighbours sit closer than twice
    a label's height, and two hundred overlapping labels are a grey smear (and the slowest part to draw)."""
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    needed = 2 * lines * fontsize / 72 * 1.25
    return max(1, math.ceil(needed / spacing_in - 1e-9))


@_styled
def draw_main_effects(inference: Inference) -> Drawing | None:
    """One panel per factor: each level's mean goal value with its CI, levels in spec order."""
    analysis = inference.factors
    if analysis is None:
        return None
    effects = [e for e in analysis.effects if any(lv.describe.mean is not None for lv in e.levels)]
    if not effects:
        return None
    goal = inference.summary.goal_metric
    ncols = min(len(effects), 4)
    nrows = math.ceil(len(effects) / ncols)
    most_levels = max(len(e.levels) for e in effects)
    panel_width = max(2.6, 0.9 + 0.55 * most_levels)
    fig = _new_figure(ncols * panel_width, 3.2 * nrows, constrained=len(effects) > 1)  # spaces panels: not one
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    single = False
    for k, effect in enumerate(effects):
        ax = axes[k // ncols][k % ncols]
        labels = [wrap_label(lv.level, 14, 3) for lv in effect.levels]
        # One errorbar for the levels with a CI and one plot for those without, not an artist per level.
        levels = [(i, lv.describe) for i, lv in enumerate(effect.levels) if lv.describe.mean is not None]
        with_ci = [(i, d, d.ci) for i, d in levels if d.ci is not None]
        without = [(i, d) for i, d in levels if d.ci is None]
        if with_ci:
            mean = np.asarray([d.mean for _, d, _ in with_ci], dtype=float)
            low = np.asarray([ci.low for _, _, ci in with_ci])
            high = np.asarray([ci.high for _, _, ci in with_ci])
            ax.errorbar([i for i, _, _ in with_ci], mean, yerr=np.vstack([mean - low, high - mean]), fmt="o",
                        color=PALETTE[0], ecolor=INK, capsize=4, markersize=5)
        if without:
            single = True
            ax.plot([i for i, _ in without], [d.mean for _, d in without], "o", color=PALETTE[0], markersize=5)
        tilt = len(labels) > 5 or any(len(line) > 6 for label in labels for line in label.split("\n"))
        step = _tick_step(labels, ax.get_position().width * fig.get_size_inches()[0] / len(labels)) if tilt else 1
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=30 if tilt else 0,
                      ha="right" if tilt else "center", rotation_mode="anchor" if tilt else "default")
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_title(wrap_label(effect.factor, 30, 2) + (" *" if effect.significant else ""))
        ax.grid(axis="y", alpha=0.3)
        if k % ncols == 0:
            ax.set_ylabel(goal)
    for k in range(len(effects), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)

    held = any(e.pooling.startswith("other factors held") for e in effects)
    pooled = any(e.pooling.startswith("pooled") for e in effects)
    caption = (
        f"Main effects on {goal}: one panel per factor, levels in the spec's order; each point is the mean goal "
        f"value of the succeeded runs at that level, its error bar the {_ci_text()} of that mean."
    )
    if pooled:
        caption += " A level pools the runs of every arm at that level, over the other factors' levels."
    if held:
        caption += " A level uses only the arms whose other factors sit at the baseline's levels."
    if single:
        caption += " A level with a single run has no error bar."
    if any(e.significant for e in effects):
        caption += (" An asterisk marks a factor whose ANOVA term is significant after Holm correction"
                    f" at level {ALPHA:g}.")
    elif analysis.anova is not None:
        caption += " No factor's ANOVA term is significant after Holm correction."
    elif analysis.why_no_anova:
        caption += f" No factor is tested: {analysis.why_no_anova}."
    return Drawing(MAIN_EFFECTS_STEM, fig, caption)


def main_effects_figure(inference: Inference) -> FigureFile | None:
    """``fig_main_effects``: level means per factor; None without a factor analysis."""
    return _rendered(draw_main_effects(inference))


# -- two factors: the grid of means and the interaction plot -------------------------


@dataclass(frozen=True)
class _Cell:
    """One combination of the two drawn factors: an arm, or the arms pooled over the other factors."""

    name: str
    describe: Any  # analysis.stats.Describe
    baseline: bool


@dataclass(frozen=True)
class _Crossing:
    rows: str  # the factor drawn as lines (the heatmap's rows)
    row_levels: list[str]
    cols: str
    col_levels: list[str]
    cells: dict[tuple[str, str], _Cell]
    pooled: tuple[str, ...]  # the other factors, pooled over in each cell


def _crossed_pair(analysis: Any) -> tuple[Any, Any]:
    """The two factors to cross: those of the most significant interaction term, else the first two."""
    by_name = {e.factor: e for e in analysis.effects}
    terms = sorted((i for i in analysis.interactions if i.p_holm is not None), key=lambda i: i.p_holm)
    for term in terms:
        a, _, b = term.row.term.partition(" × ")
        if a in by_name and b in by_name:
            return by_name[a], by_name[b]
    return analysis.effects[0], analysis.effects[1]


def _crossing(inference: Inference) -> _Crossing | None:
    """The cells of two crossed factors of a grid, each with the mean and interval of its runs."""
    from ratiocinator.analysis.stats import describe

    analysis = inference.factors
    # A grid crosses every level with every level; an ablation's L of cells cannot show an interaction.
    if analysis is None or analysis.design != "grid" or len(analysis.effects) < 2:
        return None
    first, second = _crossed_pair(analysis)
    # The factor with fewer levels draws the lines (and the heatmap's rows): fewer lines read better.
    rows, cols = (first, second) if len(first.levels) <= len(second.levels) else (second, first)
    pooled = tuple(e.factor for e in analysis.effects if e.factor not in (rows.factor, cols.factor))
    members: dict[tuple[str, str], list[Any]] = {}
    for goal in inference.goals:
        levels = goal.summary.arm.factors
        r, c = levels.get(rows.factor), levels.get(cols.factor)
        if r is not None and c is not None and goal.describe.mean is not None:
            members.setdefault((str(r), str(c)), []).append(goal)
    cells = {}
    for key, goals in members.items():
        if not pooled:
            (goal,) = goals
            cells[key] = _Cell(goal.name, goal.describe, goal.name == inference.baseline)
        else:
            values = [v for g in goals for v in g.stats.values]
            name = f"{rows.factor}={key[0]}, {cols.factor}={key[1]} ({_plural(len(goals), 'arm')} pooled)"
            cells[key] = _Cell(name, describe(values, bootstrap=False), False)
    if len({r for r, _ in cells}) < 2 or len({c for _, c in cells}) < 2:
        return None
    return _Crossing(rows.factor, [lv.level for lv in rows.levels], cols.factor, [lv.level for lv in cols.levels],
                     cells, pooled)


@_styled
def draw_interaction(inference: Inference) -> Drawing | None:
    """Left: a heatmap of the goal mean of every cell of two crossed factors; right: the interaction plot.

    With more than two factors, the pair of the most significant interaction term is drawn,
    each cell pooling the runs of every arm at that combination.
    """
    crossing = _crossing(inference)
    if crossing is None:
        return None
    row_factor, row_levels, col_factor, col_levels = (crossing.rows, crossing.row_levels, crossing.cols,
                                                      crossing.col_levels)
    cells = crossing.cells
    summary = inference.summary
    goal = summary.goal_metric
    direction = "higher" if summary.maximize else "lower"
    fig = _new_figure(max(7.5, 2.2 + 0.75 * len(col_levels) * 2), max(3.2, 1.4 + 0.45 * len(row_levels)),
                      constrained=True)
    heat, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1.0]})

    grid = np.full((len(row_levels), len(col_levels)), np.nan)
    for (r, c), g in cells.items():
        grid[row_levels.index(r), col_levels.index(c)] = g.describe.mean
    # Better is brighter, whichever way the goal points.
    image = heat.imshow(grid, cmap="viridis" if summary.maximize else "viridis_r", aspect="auto")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2
    hover: list[tuple[Any, tuple[float, float, float, float], str]] = []
    for (r, c), g in cells.items():
        i, j = row_levels.index(r), col_levels.index(c)
        mean = float(g.describe.mean)
        dark = (mean < middle) == summary.maximize  # viridis is dark at its low end
        mark = " (baseline)" if g.baseline else ""
        heat.text(j, i, f"{mean:.4g}" + ("\nbaseline" if mark else ""), ha="center", va="center", fontsize=7,
                  color="white" if dark else INK)
        ci = g.describe.ci
        interval = f"95% CI [{ci.low:.4g}, {ci.high:.4g}]" if ci is not None else "no interval (one run)"
        hover.append((heat, (j - 0.5, i - 0.5, j + 0.5, i + 0.5),
                      f"{g.name}{mark}: mean {goal} {mean:.4g}, {interval}, n = {g.describe.n}"))
    for i, j in zip(*np.nonzero(~np.isfinite(grid)), strict=True):
        heat.text(j, i, "no runs", ha="center", va="center", fontsize=7, color=INK)
    heat.set_xticks(range(len(col_levels)), [wrap_label(lv, 10, 2) for lv in col_levels])
    heat.set_yticks(range(len(row_levels)), [wrap_label(lv, 10, 2) for lv in row_levels])
    heat.set_xlabel(col_factor)
    heat.set_ylabel(row_factor)
    heat.spines[:].set_visible(False)
    fig.colorbar(image, ax=heat, label=f"mean {goal}", shrink=0.9)

    offsets = _jitter(len(row_levels), 0.12)
    for k, r in enumerate(row_levels):
        at = [(j, cells[(r, c)]) for j, c in enumerate(col_levels) if (r, c) in cells]
        if not at:
            continue
        x = np.asarray([j + offsets[k] for j, _ in at])
        level_means = np.asarray([g.describe.mean for _, g in at], dtype=float)
        color = PALETTE[k % len(PALETTE)]
        style = "-" if k < len(PALETTE) else "--"
        lines.plot(x, level_means, color=color, linestyle=style, marker="o", markersize=4, label=f"{row_factor}={r}")
        with_ci = [(xi, g.describe.ci, m) for xi, (_, g), m in zip(x, at, level_means, strict=True) if g.describe.ci]
        if with_ci:
            below = [m - ci.low for _, ci, m in with_ci]
            above = [ci.high - m for _, ci, m in with_ci]
            lines.errorbar([w[0] for w in with_ci], [w[2] for w in with_ci], yerr=np.vstack([below, above]),
                           fmt="none", ecolor=color, capsize=3, linewidth=1.0)
    lines.set_xticks(range(len(col_levels)), [wrap_label(lv, 10, 2) for lv in col_levels])
    lines.set_xlim(-0.5, len(col_levels) - 0.5)
    lines.set_xlabel(col_factor)
    lines.set_ylabel(f"mean {goal} ({direction} is better)")
    lines.grid(axis="y", alpha=0.3)
    lines.legend(loc="best", fontsize=7, framealpha=0.85)

    caption = (
        f"The {row_factor} × {col_factor} design. Left: the mean {goal} of every combination (one arm per cell;"
        f" brighter is better), the number written in each cell."
        " In the HTML paper, hovering over a cell shows the arm, its mean and its 95% confidence interval."
        f" Right: the same means as one line per level of {row_factor}, with {_ci_text()}s as error bars"
        " (lines nudged sideways so the bars do not overlap). Parallel lines mean the factors act independently;"
        " lines that cross or diverge mean the effect of one depends on the other."
    )
    if crossing.pooled:
        caption = caption.replace("(one arm per cell;", f"(pooled over {', '.join(crossing.pooled)};", 1)
        caption += (" The two factors drawn are those of the most significant interaction term, or the first two"
                    " when none was tested.")
    if inference.factors is not None and any(i.row.term for i in inference.factors.interactions):
        caption += " The analysis of variance tests the interaction."
    return Drawing(INTERACTION_STEM, fig, caption, hover=tuple(hover))


def interaction_figure(inference: Inference) -> FigureFile | None:
    """``fig_interaction``: heatmap and interaction plot of two crossed factors; None for other designs."""
    return _rendered(draw_interaction(inference))


# -- cost and wall time --------------------------------------------------------------


def _time_unit(seconds: Sequence[float]) -> tuple[str, float]:
    top = max(seconds, default=0.0)
    if top >= 7200:
        return "h", 3600.0
    if top >= 180:
        return "min", 60.0
    return "s", 1.0


@_styled
def draw_cost(inference: Inference, runs: Sequence[RunRow]) -> Drawing | None:
    """Total dollars per arm, and every run's wall time per arm with the succeeded runs' mean ± std."""
    by_arm: dict[str, list[RunRow]] = {}
    for r in runs:
        by_arm.setdefault(r.arm, []).append(r)
    arms = [a.name for a in inference.summary.arms if a.name in by_arm]
    costs = {a: [r.cost for r in by_arm[a] if r.cost is not None] for a in arms}
    has_cost = any(c for values in costs.values() for c in values)
    timed = {a: [r for r in by_arm[a] if r.duration_s is not None and r.duration_s >= 0] for a in arms}
    has_time = any(timed.values())
    if not arms or (not has_cost and not has_time):
        return None
    colors = arm_colors(inference)
    layout = replace(_ArmAxis.of_arms(inference, arms), horizontal=True)
    panels = int(has_cost) + int(has_time)
    fig = _new_figure(4.0 * panels + 1.5, layout.extent())
    axes = fig.subplots(1, panels, sharey=True, squeeze=False, gridspec_kw={"wspace": 0.08})[0]
    caption_parts = []
    if has_cost:
        ax = axes[0]
        _bars(ax, np.asarray([sum(costs[a]) for a in arms], dtype=float), [colors[a] for a in arms], alpha=0.8,
              horizontal=True, many=layout.many)
        ax.set_xlabel("total cost ($)")
        ax.grid(axis="x", alpha=0.3)
        where = "Left" if has_time else "Per arm"
        caption_parts.append(f"{where}: the dollars each arm cost, summed over all of its attempts, failed ones"
                             " included.")
    if has_time:
        ax = axes[-1]
        unit, scale = _time_unit([r.duration_s for rs in timed.values() for r in rs if r.duration_s is not None])
        ok_x, ok_y, other_x, other_y, mean_at, mean_x, mean_err, mean_color = [], [], [], [], [], [], [], []
        for i, a in enumerate(arms):
            ok = np.asarray([r.duration_s for r in timed[a] if r.status == "succeeded"], dtype=float) / scale
            other = np.asarray([r.duration_s for r in timed[a] if r.status != "succeeded"], dtype=float) / scale
            ok_x.append(ok)
            ok_y.append(i + 0.25 + _jitter(ok.size, 0.08))
            other_x.append(other)
            other_y.append(i + 0.25 + _jitter(other.size, 0.08))
            if ok.size:
                mean_at.append(i)
                mean_x.append(float(ok.mean()))
                mean_err.append(float(ok.std(ddof=1)) if ok.size >= 2 else 0.0)
                mean_color.append(colors[a])
        if mean_at:
            ax.errorbar(mean_x, mean_at, xerr=mean_err, fmt="none", ecolor=INK, capsize=3, linewidth=1.0, zorder=4)
            ax.scatter(mean_x, mean_at, marker="D", c=mean_color, edgecolors=INK, s=36, linewidths=0.6, zorder=5)
        ok_dots = np.concatenate(ok_x)
        ax.scatter(ok_dots, np.concatenate(ok_y), color=INK, s=8, zorder=5, linewidths=0,
                   rasterized=ok_dots.size > RASTER_POINTS)
        any_failed = any(x.size for x in other_x)
        if any_failed:
            ax.scatter(np.concatenate(other_x), np.concatenate(other_y), facecolors="none", edgecolors=INK, s=12,
                       zorder=5, linewidths=0.8)
        ax.set_xlabel(f"wall time per run ({unit})")
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
        where = "Right" if has_cost else "Per arm"
        part = (f"{where}: wall time of each run (dots), with a diamond at the mean over the arm's succeeded runs and "
                "an error bar of ± one sample standard deviation.")
        if any_failed:
            part += " Hollow dots are runs that did not succeed."
        caption_parts.append(part)
    layout.apply(axes[0])
    for ax in axes:
        if len(arms) > TOP_AXIS_ARMS:
            ax.tick_params(axis="x", top=True, labeltop=True)
    for ax in axes[1:]:
        ax.tick_params(axis="y", left=False)
        layout.separate(ax)
    caption = " ".join(caption_parts) + layout.group_note() + _grey_note(inference, arms, "bars and diamonds")
    if not has_cost:
        caption += " No run recorded a non-zero dollar cost, so cost is not drawn."
    return Drawing(COST_STEM, fig, caption)


def cost_figure(inference: Inference, runs: Sequence[RunRow]) -> FigureFile | None:
    """``fig_cost``: dollars and wall time per arm; None when no run has a cost or a duration."""
    return _rendered(draw_cost(inference, runs))


# -- all of them -----------------------------------------------------------------------


def all_drawings(ledger: Ledger, inference: Inference, runs: Sequence[RunRow], *,
                 curves: Sequence[str] | None = None) -> list[Drawing]:
    """The figures the data supports, in paper order (goal, curves, main effects, interaction, cost), not yet
    rendered: drawing is quick, rendering is most of a figure's time."""
    drawings = [
        draw_goal(inference),
        *draw_curve_figures(ledger, inference, runs, metrics=curves),
        draw_main_effects(inference),
        draw_interaction(inference),
        draw_cost(inference, _with_instance_shares(ledger, inference, runs)),
    ]
    return [d for d in drawings if d is not None]


def all_figures(ledger: Ledger, inference: Inference, runs: Sequence[RunRow], *,
                curves: Sequence[str] | None = None) -> list[FigureFile]:
    """The figures the data supports, rendered, in paper order (see ``all_drawings``)."""
    return render_all(all_drawings(ledger, inference, runs, curves=curves))


def _with_instance_shares(ledger: Ledger, inference: Inference, runs: Sequence[RunRow]) -> Sequence[RunRow]:
    """On rented instances money is per instance: each run carries its wall-time share of its instance's cost."""
    rented = instances.rows(ledger, experiment_id=inference.summary.experiment_id)
    if not rented:
        return runs
    shares = instances.run_shares(rented, {r.id: (r.slot or "", r.duration_s or 0.0) for r in runs})
    return [replace(r, cost=shares.get(r.id)) for r in runs]
