"""The paper's document model and its three renderings: Markdown, HTML and LaTeX.

Sections are built once as a list of blocks and rendered three times, so the formats
cannot disagree. Block text is plain text with fact placeholders (see ``facts``); each
renderer escapes the text for its format and turns every placeholder into a link to the
fact's appendix row that carries the fact's runs. ``fact_occurrences`` reads those
links back out of a rendered file, which is what ``ratiocinator verify`` checks.
"""

from __future__ import annotations

import abc
import base64
import functools
import html
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ratiocinator.report.facts import FACT_OPEN, FactBook, provenance, split

if TYPE_CHECKING:
    from ratiocinator.report.figures import FigureFile

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Abstract:
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Fields:
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    # An anchor per row (the appendix's fact rows), so links to a fact land on its row.
    anchors: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Figure:
    file: FigureFile


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Abstract | Paragraph | Bullets | Fields | Table | Figure | Code


def clean(text: str) -> str:
    """Printable text: terminal escapes and control characters removed, line ends unified."""
    if text.isprintable():  # the common case, one pass in C: no escape, control character or line end
        return text
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text)


def _with_facts(text: str, book: FactBook, escape: Callable[[str], str], token: Callable[[str, str, str], str]) -> str:
    """Escape the text parts, render the fact parts with ``token(id, text, provenance)``."""
    if FACT_OPEN not in text:  # most cells of a big table cite nothing
        return escape(text)
    out = []
    for i, part in enumerate(split(text)):
        if i % 2 == 0:
            out.append(escape(part))
        else:
            fact = book.by_id[part]
            out.append(token(fact.id, fact.text, provenance(fact)))
    return "".join(out)


# -- Markdown ------------------------------------------------------------------------

# A fact links to its row in the appendix: ``#f3`` inside the appendix, ``appendix.md#f3`` from the paper.
MD_FACT = re.compile(r"(?<!\\)\[([^\[\]\n]*)\]\((?:appendix\.md)?#(f[0-9]+)\)")


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", clean(text))


def _md_unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _md_token(fid: str, text: str, title: str, facts_in: str = "") -> str:
    """A link to the fact's appendix row; the row carries the runs, so raw Markdown stays readable."""
    return f"[{_md_escape(text)}]({facts_in}#{fid})"


class Renderer(abc.ABC):
    """One output format: a method per block type, and how the rendered blocks make a document.

    `render` is the only place that tells blocks apart, so a new block type is one more method
    here (every format must then implement it) and a new format is one more subclass.
    """

    def __init__(self, book: FactBook, facts_in: str = "") -> None:
        """``facts_in``: the file whose rows the facts link to (the appendix), or "" for this document's own."""
        self.book = book
        self.facts_in = facts_in

    def render(self, title: str, blocks: Sequence[Block]) -> str:
        return self.document(title, [getattr(self, _METHOD[type(block)])(block) for block in blocks])

    @abc.abstractmethod
    def heading(self, block: Heading) -> str: ...

    @abc.abstractmethod
    def abstract(self, block: Abstract) -> str: ...

    @abc.abstractmethod
    def paragraph(self, block: Paragraph) -> str: ...

    @abc.abstractmethod
    def bullets(self, block: Bullets) -> str: ...

    @abc.abstractmethod
    def fields(self, block: Fields) -> str: ...

    @abc.abstractmethod
    def table(self, block: Table) -> str: ...

    @abc.abstractmethod
    def figure(self, block: Figure) -> str: ...

    @abc.abstractmethod
    def code(self, block: Code) -> str: ...

    @abc.abstractmethod
    def document(self, title: str, body: list[str]) -> str:
        """The whole file around the rendered blocks."""


_METHOD: dict[type, str] = {Heading: "heading", Abstract: "abstract", Paragraph: "paragraph", Bullets: "bullets",
                            Fields: "fields", Table: "table", Figure: "figure", Code: "code"}


class _Markdown(Renderer):
    def text(self, text: str) -> str:
        return _with_facts(text, self.book, _md_escape,
                           lambda fid, shown, title: _md_token(fid, shown, title, self.facts_in))

    def cell(self, text: str) -> str:
        return self.text(text).replace("\n", " ")

    def heading(self, block: Heading) -> str:
        return "#" * (block.level + 1) + " " + self.cell(block.text) + "\n"

    def abstract(self, block: Abstract) -> str:
        return "**Abstract.** " + self.text(block.text) + "\n"

    def paragraph(self, block: Paragraph) -> str:
        return self.text(block.text) + "\n"

    def bullets(self, block: Bullets) -> str:
        return "".join(f"- {self.cell(item)}\n" for item in block.items)

    def fields(self, block: Fields) -> str:
        return "".join(f"- **{self.cell(k)}:** {self.cell(v)}\n" for k, v in block.rows)

    def table(self, block: Table) -> str:
        out = ["| " + " | ".join(self.cell(h) for h in block.header) + " |", "|" + "---|" * len(block.header)]
        for i, row in enumerate(block.rows):
            cells = [self.cell(c) for c in row]
            if block.anchors:
                cells[0] = f'<a id="{block.anchors[i]}"></a>{cells[0]}'
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n"

    def figure(self, block: Figure) -> str:
        caption = self.cell(block.file.caption)
        return f"![{caption}]({block.file.stem}.png)\n\n*{caption}*\n"

    def code(self, block: Code) -> str:
        text = clean(block.text)
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
        return f"{fence}text\n{text}\n{fence}\n"

    def document(self, title: str, body: list[str]) -> str:
        return "\n".join([f"# {self.cell(title)}", "", *body])


def render_markdown(title: str, blocks: Sequence[Block], book: FactBook, facts_in: str = "") -> str:
    return _Markdown(book, facts_in).render(title, blocks)


# -- HTML ------------------------------------------------------------------------------

HTML_FACT = re.compile(r'<a class="fact" href="(?:appendix\.html)?#(f[0-9]+)"[^>]*>([^<]*)</a>')

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;\
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}\
h3{font-size:1.1em}h4{font-size:1em}
.abstract{background:#f7f7fb;border-left:3px solid #99a;padding:.6em 1em}
table{border-collapse:collapse;font-size:.88em;margin:.8em 0}
.scroll{overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
table.fields th{width:14em;background:#fafafa;font-weight:600}
a.fact{color:inherit;text-decoration:underline dotted #88a;cursor:help}
tr:target{background:#fff3bf}
figure{margin:1em 0}figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.85em;color:#555}
.hovermap{position:relative;display:inline-block;max-width:100%}.hovermap .hover{position:absolute;cursor:help}
.hovermap .hover:hover{outline:2px solid #fff3bf}
pre{background:#f6f6f6;border:1px solid #e2e2e2;padding:.6em;overflow-x:auto;font-size:.82em}
"""


def _html_escape(text: str) -> str:
    return html.escape(clean(text))


def _html_token(fid: str, text: str, title: str, facts_in: str = "") -> str:
    return f'<a class="fact" href="{facts_in}#{fid}" title="{html.escape(title)}">{html.escape(text)}</a>'


class _Html(Renderer):
    def text(self, text: str) -> str:
        return _with_facts(text, self.book, _html_escape,
                           lambda fid, shown, title: _html_token(fid, shown, title, self.facts_in))

    def heading(self, block: Heading) -> str:
        return f"<h{block.level + 1}>{self.text(block.text)}</h{block.level + 1}>"

    def abstract(self, block: Abstract) -> str:
        return f'<div class="abstract"><strong>Abstract.</strong> {self.text(block.text)}</div>'

    def paragraph(self, block: Paragraph) -> str:
        return f"<p>{self.text(block.text)}</p>"

    def bullets(self, block: Bullets) -> str:
        return "<ul>" + "".join(f"<li>{self.text(item)}</li>" for item in block.items) + "</ul>"

    def fields(self, block: Fields) -> str:
        rows = "".join(f"<tr><th>{self.text(k)}</th><td>{self.text(v)}</td></tr>" for k, v in block.rows)
        return f'<table class="fields">{rows}</table>'

    def table(self, block: Table) -> str:
        head = "".join(f"<th>{self.text(h)}</th>" for h in block.header)
        rows = "".join(
            (f'<tr id="{block.anchors[i]}">' if block.anchors else "<tr>")
            + "".join(f"<td>{self.text(c)}</td>" for c in row) + "</tr>"
            for i, row in enumerate(block.rows)
        )
        return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'

    def figure(self, block: Figure) -> str:
        data = base64.b64encode(block.file.png).decode("ascii")
        caption = _html_escape(block.file.caption)
        image = f'<img alt="{caption}" src="data:image/png;base64,{data}">'
        if block.file.regions:
            # Areas placed in percentages of the image, so they stay on their cells however it is scaled.
            areas = "".join(
                f'<span class="hover" style="left:{100 * x:.2f}%;top:{100 * y:.2f}%;width:{100 * w:.2f}%;'
                f'height:{100 * h:.2f}%" title="{_html_escape(text)}"></span>'
                for x, y, w, h, text in block.file.regions
            )
            image = f'<div class="hovermap">{image}{areas}</div>'
        return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"

    def code(self, block: Code) -> str:
        return f"<pre><code>{_html_escape(block.text)}</code></pre>"

    def document(self, title: str, body: list[str]) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_html_escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join([f"<h1>{_html_escape(title)}</h1>", *body])
            + "\n</body>\n</html>\n"
        )


def render_html(title: str, blocks: Sequence[Block], book: FactBook, facts_in: str = "") -> str:
    return _Html(book, facts_in).render(title, blocks)


# -- LaTeX -----------------------------------------------------------------------------

TEX_FACT = re.compile(r"\\fact\{(f[0-9]+)\}\{((?:[^{}\\]|\\.)*)\}")

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
_TEX_UNICODE = {
    "±": r"$\pm$", "σ": r"$\sigma$", "Δ": r"$\Delta$", "η": r"$\eta$", "α": r"$\alpha$", "μ": r"$\mu$",
    "²": r"$^{2}$", "×": r"$\times$", "≤": r"$\leq$", "≥": r"$\geq$", "→": r"$\rightarrow$", "∈": r"$\in$",
    "≈": r"$\approx$", "∞": r"$\infty$", "·": r"$\cdot$", "−": "$-$", "–": "--", "—": "---", "…": r"\ldots{}",
    "“": "``", "”": "''", "‘": "`", "’": "'", "\u00a0": "~", "✓": r"$\checkmark$",
}
# A math-mode minus: set as a minus sign, never a hyphen a line may break after.
TEX_MINUS = "$-$"
_TEX_PREAMBLE = r"""\documentclass[10pt]{article}
\pdfgentounicode=1
\input{glyphtounicode}
\usepackage[utf8]{inputenc}
\usepackage{textcomp}
\usepackage{amsmath,amssymb}
\usepackage[margin=2cm]{geometry}
\IfFileExists{lmodern.sty}{\usepackage[T1]{fontenc}\usepackage{lmodern}\usepackage{microtype}}{}
\usepackage{graphicx}
\usepackage{booktabs}
\usepackage{longtable}
\usepackage{array}
\usepackage{float}
\usepackage[hidelinks]{hyperref}
\setlength{\parindent}{0pt}
\setlength{\parskip}{0.5em}
\setlength{\emergencystretch}{2em}
% A traced number: links to its row in the appendix, which lists the runs behind it.
\newcommand{\fact}[2]{\hyperlink{#1}{#2}}
% Tables size their wrapping columns from the measured width of their number columns.
\newlength{\ratfixed}\newlength{\ratcol}\newlength{\ratcell}
\newcommand{\ratmeasure}[1]{\settowidth{\ratcell}{#1}\ifdim\ratcell>\ratcol\setlength{\ratcol}{\ratcell}\fi}
"""
# lmodern makes every font Type 1 (a T1-encoded text without it gets bitmap Type 3 fonts, which
# break search and copy and which paper venues reject); without lmodern installed the default
# OT1 Computer Modern is used, which TeX Live also ships as Type 1 (a few symbols then still come
# from bitmap fonts, and microtype, whose font expansion needs scalable fonts, is left out).
# glyphtounicode maps the fi and fl ligatures back to two letters, so text extracted from the PDF
# says "significant".

_TEX_CHARS = {**_TEX_SPECIAL, **_TEX_UNICODE, "\n": " "}
# What pdflatex with T1 + utf8 inputenc can set: ASCII and Latin-1/Latin Extended-A.
_TEX_UNSUPPORTED = re.compile(r"[^\x00-\x7f\u00a0-\u017f]")
# A line may break after these inside a long word (arm names k=v,k=v, paths, identifiers) ...
_TEX_BREAK_AFTER = frozenset(",=/_;:")
# ... and after this many characters of a word that offers no such place (a commit hash).
_TEX_WORD_CHARS = 16
_TEX_BREAK = r"\allowbreak{}"
# A hyphen that is a minus: at the start of a number, or in an exponent (1e-05).
_TEX_NEGATIVE = re.compile(r"(?:(?<![\w.)\]])|(?<=\d[eE]))-(?=\.?\d)")


def _tex_char(ch: str) -> str:
    escaped = _TEX_CHARS.get(ch, ch)
    # A glyph pdflatex lacks is named by its code point rather than failing the build.
    return rf"\texttt{{U+{ord(ch):04X}}}" if escaped == ch and _TEX_UNSUPPORTED.match(ch) else escaped


class _TexChars(dict[int, str]):
    """``_tex_char`` as a ``str.translate`` table, filled in as characters are first met."""

    def __missing__(self, code: int) -> str:
        self[code] = escaped = _tex_char(chr(code))
        return escaped


_TEX_TABLE = _TexChars()
_TEX_WORDS = re.compile(r"(\S+)")


def tex_escape(text: str) -> str:
    """Text for LaTeX: specials escaped, minus signs as minus signs, long words given places to break."""
    parts = _TEX_WORDS.split(_TEX_NEGATIVE.sub("\u2212", clean(text)))  # spaces, word, spaces, word, ..., spaces
    return "".join(_tex_word(part) if i % 2 else part.translate(_TEX_TABLE) for i, part in enumerate(parts))


def _tex_word(word: str) -> str:
    """One word (no white space) for LaTeX, with places to break (see ``tex_escape``)."""
    if _TEX_BREAK_AFTER.isdisjoint(word) and (len(word) < _TEX_WORD_CHARS or not any(c.isdigit() for c in word)):
        return word.translate(_TEX_TABLE)  # the common case: nothing to break
    out: list[str] = []
    length, digits = 0, False
    for ch in word:
        out.append(_TEX_TABLE[ord(ch)])
        length += 1
        digits = digits or ch.isdigit()
        # A long English word is hyphenated by TeX; a long run of letters and digits (a hash) is not.
        if ch in _TEX_BREAK_AFTER or (digits and length >= _TEX_WORD_CHARS):
            out.append(_TEX_BREAK)
            length, digits = 0, False
    return "".join(out)


def tex_number(text: str) -> str:
    """A displayed number for LaTeX: unbreakable, its minus sign a math minus."""
    return _TEX_NEGATIVE.sub("\u2212", clean(text)).translate(_TEX_TABLE)


def _tex_unescape(text: str) -> str:
    text = text.replace(TEX_MINUS, "-")
    for plain, escaped in _TEX_SPECIAL.items():
        text = text.replace(escaped, plain)
    return text


def _tex_token(fid: str, text: str, title: str) -> str:
    return rf"\fact{{{fid}}}{{{tex_number(text)}}}"


def _tex_plain_token(fid: str, text: str, title: str) -> str:
    return tex_number(text)


def _tex_code(text: str) -> str:
    lines = []
    for line in clean(text).split("\n"):
        line = "".join(ch if ord(ch) < 0x80 else "?" for ch in line)
        lines += [line[i : i + CODE_LINE_CHARS] for i in range(0, max(len(line), 1), CODE_LINE_CHARS)]
    body = "\n".join(lines).replace("\\end{verbatim}", "\\end {verbatim}")
    return "{\\footnotesize\n\\begin{verbatim}\n" + body + "\n\\end{verbatim}\n}"


# Verbatim lines are cut at this many characters: at \footnotesize they fit the text width.
CODE_LINE_CHARS = 100


# -- LaTeX tables ------------------------------------------------------------------------
#
# A column is a number column when every cell is a number, an interval, "a ± b" or "—". Number
# columns never wrap: they are set at their natural width (which TeX measures), right-aligned and
# padded so that their decimal points line up. Text columns share the rest of the line and wrap.
# A table whose columns cannot fit even at the smallest size is split into several tables that
# each repeat the first column, so nothing is ever set over its neighbour.

_NUMBER_CELL = re.compile(r"^[\s\d.,/()\[\]±+\-−—$%eE]*$")
# A cell of a number, an interval or "a ± b" holds two numbers at most; a list of seeds is text (it wraps).
_A_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+−]?\d+)?")
# Widths in em of Latin Modern's glyphs, rounded up; what is not listed counts as a capital.
_EM = {**dict.fromkeys("0123456789", 0.5), **dict.fromkeys(".,:;'`!|", 0.28), **dict.fromkeys("()[]", 0.39),
       " ": 0.34, "—": 1.0, "–": 0.5, "±": 0.78, "−": 0.78, "-": 0.34, "$": 0.5, "%": 0.84, "/": 0.5, "_": 0.62,
       "=": 0.78, "+": 0.78, "×": 0.78, "σ": 0.58, "Δ": 0.84, "η": 0.5, "²": 0.4,
       **dict.fromkeys("abcdeghknopqsuvxyz", 0.53), **dict.fromkeys("fijlrt", 0.35), "m": 0.84, "w": 0.73}
_CAPITAL_EM = 0.76
_BOLD = 1.3
# (font command, size in pt, column separation in pt), tried in order.
_TABLE_FONTS = (("\\footnotesize", 8.0, 4.0), ("\\scriptsize", 7.0, 3.0))
# The text width of the page the preamble sets (A4, 2 cm margins), less a safety margin for the estimate.
_LINE_PT = 483.0 * 0.95
_TEXT_MIN_EM = 5.0
MEASURED_CELLS = 8
_WORD_BREAK = re.compile(r"[\s,=/_;:]+")
_DECIMAL_POINT = re.compile(r"\d\.\d")


class _Ems(dict[str, float]):
    """``_EM``, where a character not listed counts as a capital."""

    def __missing__(self, ch: str) -> float:
        return _CAPITAL_EM


_EM_OF = _Ems(_EM)


def _width_pt(text: str, size: float, *, bold: bool = False) -> float:
    return _ems(text) * size * (_BOLD if bold else 1.0)


@functools.lru_cache(maxsize=1 << 16)
def _ems(text: str) -> float:
    """The estimated width of ``text`` in em: a table's cells are measured at every font size it tries."""
    return sum(map(_EM_OF.__getitem__, text))


def _longest_word_pt(text: str, size: float, *, bold: bool = False) -> float:
    return max((_width_pt(w[:_TEX_WORD_CHARS], size, bold=bold) for w in _WORD_BREAK.split(text)), default=0.0)


def _decimal_tail(text: str) -> str:
    """What follows the first decimal point of a number cell (with the point), or ''."""
    match = _DECIMAL_POINT.search(text)
    return text[match.start() + 1 :] if match else ""


@dataclass(frozen=True)
class _Column:
    index: int
    numeric: bool
    header_lines: tuple[str, ...]
    width_pt: float  # the estimate: natural width of a number column, preferred width of a text one
    min_pt: float  # the least a text column can take (its longest word)
    natural_pt: float  # the most a text column needs: its longest cell on one line, with room for the estimate
    tail: str  # a number column's longest decimal tail, which every cell is padded to


def _wrap_header(text: str, width_pt: float, size: float) -> tuple[str, ...]:
    words: list[str] = []
    for word in text.split():  # a lone "/" or "±" stays with the word before it
        if words and not any(ch.isalnum() for ch in word):
            words[-1] += " " + word
        else:
            words.append(word)
    lines: list[str] = []
    for word in words:
        if lines and _width_pt(lines[-1] + " " + word, size, bold=True) <= width_pt:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return tuple(lines) or ("",)


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], size: float) -> list[_Column]:
    columns = []
    for i, head in enumerate(header):
        cells = [r[i] for r in rows]
        numeric = bool(cells) and all(_NUMBER_CELL.match(c) and len(_A_NUMBER.findall(c)) <= 2 for c in cells)
        if numeric:
            tail = max((_decimal_tail(c) for c in cells), key=lambda t: _width_pt(t, size), default="")
            body = max((_width_pt(c + tail[len(_decimal_tail(c)):], size) for c in cells), default=0.0)
            width = max(body, _longest_word_pt(head, size, bold=True))
            lines = _wrap_header(head, width, size)
            width = max(width, *(_width_pt(line, size, bold=True) for line in lines))
            columns.append(_Column(i, True, lines, width, width, width, tail))
        else:
            natural = max((_width_pt(c, size) for c in cells), default=0.0)
            least = max(_TEXT_MIN_EM * size, _longest_word_pt(head, size, bold=True),
                        *(_longest_word_pt(c, size) for c in cells))
            preferred = max(least, min(natural, 0.45 * _LINE_PT), _width_pt(head, size, bold=True) * 0.6)
            lines = _wrap_header(head, max(least, natural), size)
            widest = max(natural, *(_width_pt(line, size, bold=True) for line in lines))
            columns.append(_Column(i, False, lines, preferred, least, max(least, widest * 1.1 + 2), ""))
    return columns


def _padded_em(shown: str, column: _Column) -> float:
    """The estimated width in em of a number cell padded to the column's decimal tail."""
    return _width_pt(shown, 1.0) + max(0.0, _width_pt(column.tail, 1.0) - _width_pt(_decimal_tail(shown), 1.0))


def _fits(columns: Sequence[_Column], sep: float) -> bool:
    return sum((c.width_pt if c.numeric else c.min_pt) + 2 * sep for c in columns) <= _LINE_PT


def _table_layout(header: Sequence[str], rows: Sequence[Sequence[str]]) -> tuple[tuple[str, float, float],
                                                                                 list[list[_Column]]]:
    """The font and the column groups: one group when the table fits, else splits that repeat column 0."""
    for font in _TABLE_FONTS:
        columns = _columns(header, rows, font[1])
        if _fits(columns, font[2]):
            return font, [columns]
    font = _TABLE_FONTS[-1]
    columns = _columns(header, rows, font[1])
    key, rest = columns[0], columns[1:]
    groups: list[list[_Column]] = [[key]]
    for column in rest:
        if len(groups[-1]) > 1 and not _fits([*groups[-1], column], font[2]):
            groups.append([key])
        groups[-1].append(column)
    return font, groups


class _Latex(Renderer):
    SECTIONS = {1: "section", 2: "subsection", 3: "subsubsection"}

    def text(self, text: str) -> str:
        return _with_facts(text, self.book, tex_escape, _tex_token)

    def shown(self, text: str) -> str:
        """What the reader sees of ``text`` (facts by their displayed text), to size columns by."""
        parts = split(text)
        return clean("".join(p if i % 2 == 0 else self.book.by_id[p].text for i, p in enumerate(parts)))

    def heading(self, block: Heading) -> str:
        return rf"\{self.SECTIONS.get(block.level, 'paragraph')}{{{self.text(block.text)}}}"

    def abstract(self, block: Abstract) -> str:
        return "\\begin{abstract}\n" + self.text(block.text) + "\n\\end{abstract}"

    def paragraph(self, block: Paragraph) -> str:
        return self.text(block.text) + "\n"

    def bullets(self, block: Bullets) -> str:
        return "\\begin{itemize}\n" + "\n".join(rf"\item {self.text(i)}" for i in block.items) + "\n\\end{itemize}"

    def fields(self, block: Fields) -> str:
        rows = "\n".join(rf"\textbf{{{self.text(k)}}} & {self.text(v)} \\" for k, v in block.rows)
        return (
            "{\\small\n\\begin{longtable}{>{\\raggedright\\arraybackslash}p{0.25\\linewidth}"
            ">{\\raggedright\\arraybackslash}p{\\dimexpr0.75\\linewidth-4\\tabcolsep-1pt\\relax}}\n"
            + rows + "\n\\end{longtable}}"
        )

    def table(self, block: Table) -> str:
        header = [self.shown(h) for h in block.header]
        shown = [[self.shown(c) for c in row] for row in block.rows]
        (font, size, sep), groups = _table_layout(header, shown)
        return "\n\n".join(self._table_part(block, shown, group, font, sep, anchors=k == 0)
                           for k, group in enumerate(groups))

    def _number(self, text: str, shown: str, column: _Column, *, plain: bool = False) -> str:
        """A number cell, padded on the right so its decimal point lines up with the column's."""
        cell = _with_facts(text, self.book, tex_number, _tex_plain_token if plain else _tex_token)
        missing = _padded_em(shown, column) - _width_pt(shown, 1.0)
        return cell + (rf"\hspace{{{missing:.2f}em}}" if missing > 0.005 else "")

    def _table_part(self, block: Table, shown: list[list[str]], columns: list[_Column], font: str, sep: float, *,
                    anchors: bool) -> str:
        setup = [f"{font}\\setlength{{\\tabcolsep}}{{{sep:g}pt}}\\setlength{{\\ratfixed}}{{0pt}}%"]
        for column in columns:
            if not column.numeric:
                continue
            i = column.index
            # TeX measures the cells the estimate finds widest (padding included), not all of a long table.
            widest = sorted(range(len(block.rows)), key=lambda r: -_padded_em(shown[r][i], column))[:MEASURED_CELLS]
            measures = [rf"\ratmeasure{{\textbf{{{tex_escape(line)}}}}}" for line in column.header_lines]
            measures += [rf"\ratmeasure{{{self._number(block.rows[r][i], shown[r][i], column, plain=True)}}}"
                         for r in widest]
            setup.append("\\setlength{\\ratcol}{0pt}" + "".join(measures) + "\\addtolength{\\ratfixed}{\\ratcol}%")
        # Each text column gets its least width, plus a share of what the number columns and
        # those least widths leave of the line, up to its natural width.
        text_columns = [c for c in columns if not c.numeric]
        total = sum(c.width_pt for c in text_columns) or 1.0
        least = sum(c.min_pt for c in text_columns)
        reserve = 2 * sep * len(columns) + least + 1
        spec = []
        for column in columns:
            if column.numeric:
                spec.append("r")
                continue
            name = f"ratw{chr(ord('a') + column.index % 26)}"
            share = max(1, round(1000 * column.width_pt / total))
            setup.append(
                f"\\setlength{{\\ratcol}}{{\\dimexpr{column.min_pt:.1f}pt+(\\linewidth-\\ratfixed-{reserve:.1f}pt)"
                f"*{share}/1000\\relax}}"
                f"\\ifdim\\ratcol>{column.natural_pt:.1f}pt\\setlength{{\\ratcol}}{{{column.natural_pt:.1f}pt}}\\fi"
                f"\\ifdim\\ratcol<{column.min_pt:.1f}pt\\setlength{{\\ratcol}}{{{column.min_pt:.1f}pt}}\\fi"
                f"\\expandafter\\edef\\csname {name}\\endcsname{{\\the\\ratcol}}%"
            )
            spec.append(f">{{\\raggedright\\arraybackslash}}p{{\\csname {name}\\endcsname}}")
        head = " & ".join(self._header(c) for c in columns) + r" \\"
        lines = []
        for r, row in enumerate(block.rows):
            cells = [self._number(row[c.index], shown[r][c.index], c) if c.numeric else self.text(row[c.index])
                     for c in columns]
            if anchors and block.anchors:
                cells[0] = rf"\hypertarget{{{block.anchors[r]}}}{{}}{cells[0]}"
            lines.append(" & ".join(cells) + r" \\")
        return (
            "{" + "\n".join(setup) + "\n"
            f"\\begin{{longtable}}{{{''.join(spec)}}}\n"
            f"\\toprule\n{head}\n\\midrule\n\\endhead\n"
            + "\n".join(lines)
            + "\n\\bottomrule\n\\end{longtable}}"
        )

    def _header(self, column: _Column) -> str:
        lines = [rf"\textbf{{{tex_escape(line)}}}" for line in column.header_lines]
        if not column.numeric:
            return " ".join(lines)
        if len(lines) == 1:
            return lines[0]
        return "\\begin{tabular}[b]{@{}r@{}}" + r"\\".join(lines) + "\\end{tabular}"

    def figure(self, block: Figure) -> str:
        # [H]: the figure stays where its section put it, so a heading never ends a page while its
        # figure floats to the next one.
        return (
            "\\begin{figure}[H]\n\\centering\n"
            rf"\includegraphics[width=\linewidth,height=0.38\textheight,keepaspectratio]{{{block.file.stem}.pdf}}"
            f"\n\\caption{{{tex_escape(block.file.caption)}}}\n\\end{{figure}}"
        )

    def code(self, block: Code) -> str:
        return _tex_code(block.text)

    def document(self, title: str, body: list[str]) -> str:
        # Facts whose rows are in another PDF link to its named destination (the row's \hypertarget).
        elsewhere = (f"\\renewcommand{{\\fact}}[2]{{\\href{{{self.facts_in}\\##1}}{{#2}}}}\n" if self.facts_in
                     else "")
        return (
            _TEX_PREAMBLE
            + elsewhere
            + f"\\title{{{tex_escape(title)}}}\n\\author{{Ratiocinator}}\n\\date{{}}\n"
            + "\\begin{document}\n\\maketitle\n\n"
            + "\n\n".join(body)
            + "\n\n\\end{document}\n"
        )


def render_latex(title: str, blocks: Sequence[Block], book: FactBook, facts_in: str = "") -> str:
    return _Latex(book, facts_in).render(title, blocks)


# -- reading facts back ----------------------------------------------------------------


def fact_counts(rendered: Mapping[str, str], formats: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """How often each fact appears in each rendered document (named as in ``formats``, file -> format):
    what ``verify`` later expects to find again."""
    return {name: dict(Counter(fid for fid, _ in fact_occurrences(formats[name], text)))
            for name, text in rendered.items()}


def fact_occurrences(fmt: str, text: str) -> list[tuple[str, str]]:
    """Every (fact id, displayed text) in a rendered file, in order."""
    if fmt == "md":
        return [(m.group(2), _md_unescape(m.group(1))) for m in MD_FACT.finditer(text)]
    if fmt == "html":
        return [(m.group(1), html.unescape(m.group(2))) for m in HTML_FACT.finditer(text)]
    if fmt == "tex":
        return [(m.group(1), _tex_unescape(m.group(2))) for m in TEX_FACT.finditer(text)]
    raise ValueError(f"unknown format {fmt!r}")
