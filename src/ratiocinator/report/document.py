"""The paper's document model and its three renderings: Markdown, HTML and LaTeX.

Sections are built once as a list of blocks and rendered three times, so the formats
cannot disagree. Block text is plain text with fact placeholders (see ``facts``); each
renderer escapes the text for its format and turns every placeholder into a link to the
fact's appendix row that carries the fact's runs. ``fact_occurrences`` reads those
links back out of a rendered file, which is what ``ratiocinator verify`` checks.
"""

from __future__ import annotations

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

MD_FACT = re.compile(r"(?<!\\)\[([^\[\]\n]*)\]\(#(f[0-9]+)\)")


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", clean(text))


def _md_unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _md_token(fid: str, text: str, title: str) -> str:
    """A link to the fact's appendix row; the row carries the runs, so raw Markdown stays readable."""
    return f"[{_md_escape(text)}](#{fid})"


def render_markdown(title: str, blocks: Sequence[Block], book: FactBook) -> str:
    def t(text: str) -> str:
        return _with_facts(text, book, _md_escape, _md_token)

    def cell(text: str) -> str:
        return t(text).replace("\n", " ")

    out = [f"# {cell(title)}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * (block.level + 1) + " " + cell(block.text), ""]
        elif isinstance(block, Abstract):
            out += ["**Abstract.** " + t(block.text), ""]
        elif isinstance(block, Paragraph):
            out += [t(block.text), ""]
        elif isinstance(block, Bullets):
            out += [f"- {cell(item)}" for item in block.items] + [""]
        elif isinstance(block, Fields):
            out += [f"- **{cell(k)}:** {cell(v)}" for k, v in block.rows] + [""]
        elif isinstance(block, Table):
            out.append("| " + " | ".join(cell(h) for h in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            for i, row in enumerate(block.rows):
                cells = [cell(c) for c in row]
                if block.anchors:
                    cells[0] = f'<a id="{block.anchors[i]}"></a>{cells[0]}'
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(block, Figure):
            caption = cell(block.file.caption)
            out += [f"![{caption}]({block.file.stem}.png)", "", f"*{caption}*", ""]
        else:
            text = clean(block.text)
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
            out += [fence + "text", text, fence, ""]
    return "\n".join(out)


# -- HTML ------------------------------------------------------------------------------

HTML_FACT = re.compile(r'<a class="fact" href="#(f[0-9]+)"[^>]*>([^<]*)</a>')

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


def _html_token(fid: str, text: str, title: str) -> str:
    return f'<a class="fact" href="#{fid}" title="{html.escape(title)}">{html.escape(text)}</a>'


def render_html(title: str, blocks: Sequence[Block], book: FactBook) -> str:
    def t(text: str) -> str:
        return _with_facts(text, book, _html_escape, _html_token)

    body: list[str] = [f"<h1>{_html_escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level + 1}>{t(block.text)}</h{block.level + 1}>")
        elif isinstance(block, Abstract):
            body.append(f'<div class="abstract"><strong>Abstract.</strong> {t(block.text)}</div>')
        elif isinstance(block, Paragraph):
            body.append(f"<p>{t(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{t(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Fields):
            rows = "".join(f"<tr><th>{t(k)}</th><td>{t(v)}</td></tr>" for k, v in block.rows)
            body.append(f'<table class="fields">{rows}</table>')
        elif isinstance(block, Table):
            head = "".join(f"<th>{t(h)}</th>" for h in block.header)
            rows = "".join(
                (f'<tr id="{block.anchors[i]}">' if block.anchors else "<tr>")
                + "".join(f"<td>{t(c)}</td>" for c in row) + "</tr>"
                for i, row in enumerate(block.rows)
            )
            body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif isinstance(block, Figure):
            data = base64.b64encode(block.file.png).decode("ascii")
            caption = _html_escape(block.file.caption)
            body.append(f'<figure><img alt="{caption}"'
                        f' src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>')
        else:
            body.append(f"<pre><code>{_html_escape(block.text)}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_html_escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


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


def render_latex(title: str, blocks: Sequence[Block], book: FactBook) -> str:
    def t(text: str) -> str:
        return _with_facts(text, book, tex_escape, _tex_token)

    def shown(text: str) -> str:
        parts = split(text)
        return "".join(p if i % 2 == 0 else book.by_id[p].text for i, p in enumerate(parts))

    sections = {1: "section", 2: "subsection", 3: "subsubsection"}
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(rf"\{sections.get(block.level, 'paragraph')}{{{t(block.text)}}}")
        elif isinstance(block, Abstract):
            body.append("\\begin{abstract}\n" + t(block.text) + "\n\\end{abstract}")
        elif isinstance(block, Paragraph):
            body.append(t(block.text) + "\n")
        elif isinstance(block, Bullets):
            body.append("\\begin{itemize}\n" + "\n".join(rf"\item {t(i)}" for i in block.items) + "\n\\end{itemize}")
        elif isinstance(block, Fields):
            rows = "\n".join(rf"\textbf{{{t(k)}}} & {t(v)} \\" for k, v in block.rows)
            body.append(
                "{\\small\n\\begin{longtable}{>{\\raggedright\\arraybackslash}p{0.25\\linewidth}"
                ">{\\raggedright\\arraybackslash}p{0.68\\linewidth}}\n" + rows + "\n\\end{longtable}}"
            )
        elif isinstance(block, Table):
            head = " & ".join(rf"\textbf{{{t(h)}}}" for h in block.header) + r" \\"
            lines = []
            for i, row in enumerate(block.rows):
                cells = [t(c) for c in row]
                if block.anchors:
                    cells[0] = rf"\hypertarget{{{block.anchors[i]}}}{{}}{cells[0]}"
                lines.append(" & ".join(cells) + r" \\")
            body.append(
                "{\\scriptsize\\setlength{\\tabcolsep}{3pt}\n"
                f"\\begin{{longtable}}{{{_tex_columns(block.header, block.rows, shown)}}}\n"
                f"\\toprule\n{head}\n\\midrule\n\\endhead\n"
                + "\n".join(lines)
                + "\n\\bottomrule\n\\end{longtable}}"
            )
        elif isinstance(block, Figure):
            body.append(
                "\\begin{figure}[htbp]\n\\centering\n"
                rf"\includegraphics[width=\linewidth,height=0.85\textheight,keepaspectratio]{{{block.file.stem}.pdf}}"
                f"\n\\caption{{{tex_escape(block.file.caption)}}}\n\\end{{figure}}"
            )
        else:
            body.append(_tex_code(block.text))
    return (
        _TEX_PREAMBLE
        + f"\\title{{{tex_escape(title)}}}\n\\author{{Ratiocinator}}\n\\date{{}}\n"
        + "\\begin{document}\n\\maketitle\n\n"
        + "\n\n".join(body)
        + "\n\n\\end{document}\n"
    )


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
