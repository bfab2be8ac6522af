"""What a typeset PDF must be: searchable text in Type 1 fonts, no line past the margin, no numbers run together."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

OVERFULL = re.compile(r"Overfull \\hbox \(([0-9.]+)pt too wide\)")
# Overfull lines up to this wide are invisible; the issue is columns printed over each other.
OVERFULL_TOLERANCE_PT = 1.0


def fonts(pdf: Path) -> list[tuple[str, str]]:
    """(name, type) of every font ``pdffonts`` lists."""
    out = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines()[2:]:
        match = re.match(r"(\S+)\s+(Type 3|Type 1C|Type 1|TrueType|CID TrueType|CID Type 0C|CID Type 0|Type 0)\s",
                         line)
        assert match, f"unparsed pdffonts line: {line!r}"
        rows.append((match.group(1), match.group(2)))
    return rows


def overfull(log: Path) -> list[float]:
    """The widths (pt) of the overfull boxes pdflatex reported, beyond the tolerance."""
    text = log.read_text(encoding="latin-1")
    return [float(w) for w in OVERFULL.findall(text) if float(w) > OVERFULL_TOLERANCE_PT]


def text(pdf: Path) -> str:
    return subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


HEADING = re.compile(r"^[0-9]+(\.[0-9]+)*\s+[A-Z]")


def headings_ending_a_page(pdf: Path) -> list[str]:
    """Numbered section headings that are the last line of a page (their section starts on the next)."""
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"^Pages:\s+([0-9]+)", info, re.MULTILINE).group(1))  # type: ignore[union-attr]
    stranded = []
    for page in range(1, pages + 1):
        out = subprocess.run(["pdftotext", "-f", str(page), "-l", str(page), str(pdf), "-"], capture_output=True,
                             text=True, check=True).stdout
        lines = [line.strip() for line in out.splitlines() if line.strip() and not line.strip().isdigit()]
        if lines and HEADING.match(lines[-1]):
            stranded.append(f"page {page}: {lines[-1]}")
    return stranded


def glued_numbers(words: str, facts_json: Path) -> list[str]:
    """Words of the PDF's text that are two of the report's numbers with nothing between them."""
    # Decimal numbers only: "40" is "4" and "0", but "0.0041470.002395" is two numbers run together.
    numbers = {f["text"] for f in json.loads(facts_json.read_text())["facts"] if "." in f["text"]}
    numbers |= {n.replace("-", "−") for n in numbers}
    glued = []
    for word in words.split():
        word = word.strip("[](),;")
        if any(word[:i] in numbers and word[i:] in numbers for i in range(1, len(word))):
            glued.append(word)
    return glued


def assert_typeset(report: Path, stem: str = "paper", words_kept: tuple[str, ...] = ("significant", "floor")) -> str:
    """The report's PDF passes every check above; returns its text."""
    pdf, log = report / f"{stem}.pdf", report / f"{stem}.log"
    assert pdf.exists(), f"no {pdf.name}"
    types = fonts(pdf)
    assert types and not [name for name, kind in types if kind == "Type 3"], types
    assert overfull(log) == [], f"overfull boxes in {log}"
    words = text(pdf)
    assert all(word in words for word in words_kept), "ligatures do not extract as letters"
    assert glued_numbers(words, report / "facts.json") == []
    assert headings_ending_a_page(pdf) == []
    return words
