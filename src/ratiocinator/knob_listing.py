"""What `ratiocinator knobs` prints: the runner's own knobs first, then, apart, the names it reads
that are not the study's to vary.

A runner reads ``RATIOCINATOR_SEED`` or ``RATIOCINATOR_OUT_DIR`` (the run contract sets them for each
run) and ``OMP_NUM_THREADS`` or ``CUDA_VISIBLE_DEVICES`` (inherited from the platform). Listed among
``LR`` and ``WIDTH`` they read as knobs an arm could set; listed apart and marked, the table says
which names a spec's arms are for.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from ratiocinator.execution import contract
from ratiocinator.repo.knobs import Knob


def knob_origin(name: str) -> str | None:
    """``"run contract"`` or ``"inherited"`` for a name the study does not set; None for a knob of the runner."""
    if contract.is_contract_variable(name):
        return "run contract"
    if contract.is_inherited_name(name):
        return "inherited"
    return None


def split_knobs(knobs: Iterable[Knob]) -> tuple[list[Knob], list[Knob]]:
    """(the runner's own knobs, the contract's and inherited names), each in the scan's order."""
    own: list[Knob] = []
    given: list[Knob] = []
    for knob in knobs:
        (own if knob_origin(knob.name) is None else given).append(knob)
    return own, given


def knob_table(knobs: Iterable[Knob], title: str, *, marked: bool = False) -> Table:
    """One row per knob: name, kind, default, where it is read (and, ``marked``, who sets it)."""
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for col in ("knob", *(("set by",) if marked else ()), "kind", "default", "read at"):
        table.add_column(col)
    for knob in knobs:
        sources = ", ".join(knob.sources[:3]) + (f" (+{len(knob.sources) - 3})" if len(knob.sources) > 3 else "")
        origin = (knob_origin(knob.name) or "",) if marked else ()
        table.add_row(knob.name, *origin, knob.kind, "-" if knob.default is None else knob.default, sources)
    return table
