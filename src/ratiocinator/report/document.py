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
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ratiocinator.report.facts import FactBook, provenance, split

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
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text)


def _with_facts(text: str, book: FactBook, escape: Callable[[str], str], token: Callable[[str, str, str], str]) -> str:
    """Escape the text parts, render the fact parts with ``token(id, text, provenance)``."""
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
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
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
        return (f'<figure><img alt="{caption}"'
                f' src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>')

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
    "≈": r"$\approx$", "∞": r"$\infty$", "·": r"$\cdot$", "−": "-", "–": "--", "—": "---", "…": r"\ldots{}",
    "“": "``", "”": "''", "‘": "`", "’": "'", "\u00a0": "~", "✓": r"$\checkmark$",
}
_TEX_PREAMBLE = r"""\documentclass[10pt]{article}
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage{textcomp}
\usepackage{amsmath,amssymb}
\usepackage[margin=2cm]{geometry}
\usepackage{graphicx}
\usepackage{booktabs}
\usepackage{longtable}
\usepackage{array}
\usepackage[hidelinks]{hyperref}
\setlength{\parindent}{0pt}
\setlength{\parskip}{0.5em}
% A traced number: links to its row in the appendix, which lists the runs behind it.
\newcommand{\fact}[2]{\hyperlink{#1}{#2}}
"""


_TEX_TABLE = str.maketrans({
    **_TEX_SPECIAL,
    **_TEX_UNICODE,
    "\n": " ",
    # Arm names are long unbroken runs of k=v,k=v: let them wrap.
    ",": r",\allowbreak{}",
    "=": r"=\allowbreak{}",
})
# What pdflatex with T1 + utf8 inputenc can set: ASCII and Latin-1/Latin Extended-A.
_TEX_UNSUPPORTED = re.compile(r"[^\x00-\x7f\u00a0-\u017f]")


def tex_escape(text: str) -> str:
    escaped = clean(text).translate(_TEX_TABLE)
    # A glyph pdflatex lacks is named by its code point rather than failing the build.
    return _TEX_UNSUPPORTED.sub(lambda m: rf"\texttt{{U+{ord(m.group()):04X}}}", escaped)


def _tex_unescape(text: str) -> str:
    for plain, escaped in _TEX_SPECIAL.items():
        text = text.replace(escaped, plain)
    return text


def _tex_token(fid: str, text: str, title: str) -> str:
    return rf"\fact{{{fid}}}{{{tex_escape(text)}}}"


def _tex_columns(header: Sequence[str], rows: Sequence[Sequence[str]], shown: Callable[[str], str]) -> str:
    """Wrapping columns sized by the text they display, so wide tables fit the page.

    A column gets at least the width of its longest unbreakable word, so an arm name
    never spills into its neighbour.
    """
    weights = []
    for i in range(len(header)):
        cells = [shown(header[i]), *(shown(r[i]) for r in rows)]
        longest = max((len(c) for c in cells), default=1)
        word = max((len(w) for c in cells for w in re.split(r"[\s,]+", c)), default=1)
        weights.append(max(min(longest, 36), min(word, 30), 4))
    total = sum(weights)
    usable = 1.0 - 0.02 * len(header)  # room for the column separation
    return "".join(rf">{{\raggedright\arraybackslash}}p{{{usable * w / total:.3f}\linewidth}}" for w in weights)


def _tex_code(text: str) -> str:
    lines = []
    for line in clean(text).split("\n"):
        line = "".join(ch if ord(ch) < 0x80 else "?" for ch in line)
        lines += [line[i : i + 100] for i in range(0, max(len(line), 1), 100)]
    return "\\begin{verbatim}\n" + "\n".join(lines).replace("\\end{verbatim}", "\\end {verbatim}") + "\n\\end{verbatim}"


class _Latex(Renderer):
    SECTIONS = {1: "section", 2: "subsection", 3: "subsubsection"}

    def text(self, text: str) -> str:
        return _with_facts(text, self.book, tex_escape, _tex_token)

    def shown(self, text: str) -> str:
        """What the reader sees of ``text`` (facts by their displayed text), to size columns by."""
        parts = split(text)
        return "".join(p if i % 2 == 0 else self.book.by_id[p].text for i, p in enumerate(parts))

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
            ">{\\raggedright\\arraybackslash}p{0.68\\linewidth}}\n" + rows + "\n\\end{longtable}}"
        )

    def table(self, block: Table) -> str:
        head = " & ".join(rf"\textbf{{{self.text(h)}}}" for h in block.header) + r" \\"
        lines = []
        for i, row in enumerate(block.rows):
            cells = [self.text(c) for c in row]
            if block.anchors:
                cells[0] = rf"\hypertarget{{{block.anchors[i]}}}{{}}{cells[0]}"
            lines.append(" & ".join(cells) + r" \\")
        return (
            "{\\scriptsize\\setlength{\\tabcolsep}{3pt}\n"
            f"\\begin{{longtable}}{{{_tex_columns(block.header, block.rows, self.shown)}}}\n"
            f"\\toprule\n{head}\n\\midrule\n\\endhead\n"
            + "\n".join(lines)
            + "\n\\bottomrule\n\\end{longtable}}"
        )

    def figure(self, block: Figure) -> str:
        return (
            "\\begin{figure}[htbp]\n\\centering\n"
            rf"\includegraphics[width=\linewidth,height=0.85\textheight,keepaspectratio]{{{block.file.stem}.pdf}}"
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


def fact_occurrences(fmt: str, text: str) -> list[tuple[str, str]]:
    """Every (fact id, displayed text) in a rendered file, in order."""
    if fmt == "md":
        return [(m.group(2), _md_unescape(m.group(1))) for m in MD_FACT.finditer(text)]
    if fmt == "html":
        return [(m.group(1), html.unescape(m.group(2))) for m in HTML_FACT.finditer(text)]
    if fmt == "tex":
        return [(m.group(1), _tex_unescape(m.group(2))) for m in TEX_FACT.finditer(text)]
    raise ValueError(f"unknown format {fmt!r}")
