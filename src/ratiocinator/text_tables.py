"""Text tables that fit the terminal without ever cutting what tells two arms apart.

Factor arms are named after their levels (``CONV_TYPE=SAGE,HIDDEN_DIM=128``); at 80 columns
a table would cut such names to ``CONV_TYPE=SAGE,HIDDEN_DIM=…`` and two siblings would look
identical. So a table that does not fit is built again with the knob names abbreviated the
same way in every cell (``CT=SAGE,HD=128``) and a legend under it (``CT = CONV_TYPE``);
cells that still do not fit wrap (fold) instead of being cut. ``--wide`` keeps full names. A long
borderless list is laid out here as plain columns, one line per row, since rich's layout of every
cell would take seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

_ASSIGNED = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)=")
UNBOUNDED = 1_000_000
MIN_ABBREVIATED = 6  # shorter names (LR, BATCH) stay as they are: abbreviating saves nothing worth a legend
# A borderless list this long is laid out here, one line per row: rich measures and renders every cell (about
# 0.45 ms a row; `runs` of 10,000 took 4.7 s). Such a list is read through a pager or a pipe anyway.
PLAIN_FROM_ROWS = 500


@dataclass(frozen=True)
class KnobAbbreviations:
    """One short name per long knob name, unique among each other and among the names left whole."""

    short_of: dict[str, str]

    @classmethod
    def of(cls, texts: Iterable[str]) -> KnobAbbreviations:
        """Abbreviations for every ``NAME=`` in the texts (arm names, knob lists)."""
        names = sorted({m.group(1) for text in texts for m in _ASSIGNED.finditer(text)})
        taken = {n for n in names if len(n) < MIN_ABBREVIATED}
        short_of: dict[str, str] = {}
        for name in names:
            if len(name) < MIN_ABBREVIATED:
                continue
            for candidate in _candidates(name):
                if candidate not in taken and candidate not in names:
                    short_of[name] = candidate
                    taken.add(candidate)
                    break
        return cls(short_of)

    def __bool__(self) -> bool:
        return bool(self.short_of)

    def short(self, text: str) -> str:
        """The text with every abbreviated ``NAME=`` replaced by its short name."""
        if not self.short_of:
            return text
        return _ASSIGNED.sub(lambda m: f"{self.short_of.get(m.group(1), m.group(1))}=", text)

    def legend(self) -> str:
        return "knobs: " + ", ".join(f"{short} = {name}" for name, short in sorted(self.short_of.items(),
                                                                                  key=lambda item: item[1]))


def _candidates(name: str) -> Iterable[str]:
    """Initials of the words (HIDDEN_DIM → HD), then longer prefixes of the last word (HDI, HDIM ...)."""
    words = [w for w in name.split("_") if w] or [name]
    if len(words) == 1:
        word = words[0]
        for n in range(3, len(word)):
            yield word[:n]
        return
    head = "".join(w[0] for w in words[:-1])
    last = words[-1]
    for n in range(1, len(last) + 1):
        candidate = head + last[:n]
        if len(candidate) < len(name):
            yield candidate


def fits(console: Console, table: Table) -> bool:
    """Whether every cell shows whole on one line (measured unbounded: a measurement is clamped to its width)."""
    unbounded = console.options.update_width(UNBOUNDED)
    return Measurement.get(console, unbounded, table).maximum <= console.width


def fitted_table(console: Console, build: Callable[[Callable[[str], str]], Table], texts: Iterable[str], *,
                 wide: bool = False) -> tuple[Table, str | None]:
    """The table ``build(label)`` makes, where ``label`` shortens knob names only when the table would
    not fit the console otherwise; with the legend to print under it (None when names are whole)."""
    return _fitted(console, build(str), build, texts, wide=wide)


def _fitted(console: Console, table: Table, build: Callable[[Callable[[str], str]], Table], texts: Iterable[str], *,
            wide: bool) -> tuple[Table, str | None]:
    """`fitted_table`, given the table with names whole (``build(str)``)."""
    if wide:
        return table, None
    abbreviations = KnobAbbreviations.of(texts)
    if not abbreviations or fits(console, table):  # nothing to shorten: no need to measure (a pass over every cell)
        return table, None
    return build(abbreviations.short), abbreviations.legend() + " (--wide shows full names)"


def print_fitted(console: Console, build: Callable[[Callable[[str], str]], Table], texts: Iterable[str], *,
                 wide: bool = False) -> None:
    """The fitted table and its legend; with ``wide``, the table at its natural width, one line per row
    (the terminal wraps it, a pipe or file keeps it whole). A long borderless list (`PLAIN_FROM_ROWS`) is
    laid out as plain columns, abbreviated the same way when it would not fit, never folded."""
    texts = list(texts)
    whole = build(str)
    if whole.row_count >= PLAIN_FROM_ROWS and whole.box is None and whole.title is None:
        _print_plain(console, whole, build, texts, wide=wide)
        return
    table, legend = _fitted(console, whole, build, texts, wide=wide)
    natural = Measurement.get(console, console.options.update_width(UNBOUNDED), table).maximum if wide else 0
    if wide and natural > console.width:
        Console(file=console.file, width=natural, color_system=console.color_system,  # type: ignore[arg-type]  # the name it reports
                force_terminal=console.is_terminal, highlight=False).print(table)
    else:
        console.print(table)
    if legend:
        console.print(legend, markup=False, highlight=False, soft_wrap=False)  # wrapped between words


def _print_plain(console: Console, table: Table, build: Callable[[Callable[[str], str]], Table],
                 texts: list[str], *, wide: bool) -> None:
    """``table`` as plain columns two spaces apart, as rich lays out a borderless table whose cells fit."""
    columns, legend = _plain_columns(table), None
    widths = [max(map(cell_len, column)) for column in columns]
    if not wide and sum(widths) + 2 * (len(widths) - 1) > console.width:
        abbreviations = KnobAbbreviations.of(texts)
        if abbreviations:
            columns = _plain_columns(build(abbreviations.short))
            widths = [max(map(cell_len, column)) for column in columns]
            legend = abbreviations.legend() + " (--wide shows full names)"
    justify = [column.justify for column in table.columns]

    def line(cells: tuple[str, ...]) -> str:
        laid = []
        for cell, width, how in zip(cells, widths, justify, strict=True):
            room = width - cell_len(cell)
            laid.append(" " * room + cell if how == "right" else
                        " " * (room // 2) + cell + " " * (room - room // 2) if how == "center" else cell + " " * room)
        return "  ".join(laid).rstrip()

    header, *rows = zip(*columns, strict=True)
    console.print(Text(line(header), style="table.header"), soft_wrap=True)
    console.file.write("".join(line(row) + "\n" for row in rows))
    console.file.flush()
    if legend:
        console.print(legend, markup=False, highlight=False, soft_wrap=False)


def _plain_columns(table: Table) -> list[list[str]]:
    """Each column of a table of markup strings, its header first, as the text it shows."""
    def plain(cell: object) -> str:
        text = cell if isinstance(cell, str) else str(cell)
        return Text.from_markup(text).plain if "[" in text else text

    return [[plain(column.header), *map(plain, column.cells)] for column in table.columns]
