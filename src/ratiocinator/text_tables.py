"""Text tables that fit the terminal without ever cutting what tells two arms apart.

Factor arms are named after their levels (``CONV_TYPE=SAGE,HIDDEN_DIM=128``); at 80 columns
a table would cut such names to ``CONV_TYPE=SAGE,HIDDEN_DIM=…`` and two siblings would look
identical. So a table that does not fit is built again with the knob names abbreviated the
same way in every cell (``CT=SAGE,HD=128``) and a legend under it (``CT = CONV_TYPE``);
cells that still do not fit wrap (fold) instead of being cut. ``--wide`` keeps full names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

_ASSIGNED = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)=")
UNBOUNDED = 1_000_000
MIN_ABBREVIATED = 6  # shorter names (LR, BATCH) stay as they are: abbreviating saves nothing worth a legend


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
    table = build(str)
    if wide:
        return table, None
    abbreviations = KnobAbbreviations.of(texts)
    if not abbreviations or fits(console, table):  # nothing to shorten: no need to measure (a pass over every cell)
        return table, None
    return build(abbreviations.short), abbreviations.legend() + " (--wide shows full names)"


def print_fitted(console: Console, build: Callable[[Callable[[str], str]], Table], texts: Iterable[str], *,
                 wide: bool = False) -> None:
    """The fitted table and its legend; with ``wide``, the table at its natural width, one line per row
    (the terminal wraps it, a pipe or file keeps it whole)."""
    table, legend = fitted_table(console, build, list(texts), wide=wide)
    natural = Measurement.get(console, console.options.update_width(UNBOUNDED), table).maximum if wide else 0
    if wide and natural > console.width:
        Console(file=console.file, width=natural, color_system=console.color_system,  # type: ignore[arg-type]  # the name it reports
                force_terminal=console.is_terminal, highlight=False).print(table)
    else:
        console.print(table)
    if legend:
        console.print(legend, markup=False, highlight=False, soft_wrap=False)  # wrapped between words
