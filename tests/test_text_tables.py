"""Long borderless lists are laid out as plain columns: the same text rich lays out, at a fraction of the cost."""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ratiocinator.text_tables import PLAIN_FROM_ROWS, print_fitted

ROWS = PLAIN_FROM_ROWS + 7


def arm(i: int) -> str:
    return f"CONV_TYPE=SAGE,HIDDEN_DIM={i},LOSS_FUNCTION=cross_entropy" if i % 2 else f"LR=0.{i}"


def build(label: Callable[[str], str], rows: int = ROWS) -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column("run")
    table.add_column("arm", overflow="fold")
    table.add_column("seconds", justify="right")
    table.add_column("note")
    for i in range(rows):
        note = escape("[bracketed] as written") if i % 3 == 0 else ("数据集" if i % 3 == 1 else "")
        table.add_row(str(i), escape(label(arm(i))), f"{i * 1.5:.1f}", note)
    return table


def printed(width: int, table_rows: int = ROWS, **options: bool) -> str:
    screen = io.StringIO()
    console = Console(file=screen, width=width, highlight=False, soft_wrap=True)
    print_fitted(console, lambda label: build(label, table_rows), [arm(i) for i in range(table_rows)], **options)
    return screen.getvalue()


def test_a_long_list_reads_as_rich_would_lay_it_out() -> None:
    plain = printed(200)
    screen = io.StringIO()
    Console(file=screen, width=200, highlight=False).print(build(str))
    assert plain.splitlines() == [line.rstrip() for line in screen.getvalue().splitlines()]
    lines = plain.splitlines()
    assert len(lines) == ROWS + 1 and lines[1].startswith("0    LR=0.0")
    assert "[bracketed] as written" in plain and "数据集" in plain  # markup read as the text it shows
    assert lines[4].split("  ")[-1].strip() == "[bracketed] as written"


def test_a_long_list_that_would_not_fit_is_abbreviated_and_never_folded() -> None:
    plain = printed(60)
    lines = plain.splitlines()
    legend = " ".join(lines[ROWS + 1:])  # wrapped between words at the console's width
    assert lines[ROWS + 1].startswith("knobs: ") and "LF = LOSS_FUNCTION" in legend
    assert "CT=SAGE,HD=1,LF=cross_entropy" in lines[2] and "…" not in plain
    assert printed(60, wide=True).count("CONV_TYPE=SAGE") == ROWS // 2  # --wide: names whole, no legend
    assert "knobs:" not in printed(60, wide=True)


def test_a_short_list_is_still_laid_out_by_rich() -> None:
    folded = printed(40, table_rows=3)
    assert "CT=SAGE" in folded and "knobs: " in folded
    assert all(len(line) <= 40 for line in folded.splitlines()[:-1])  # rich folds cells to the width
