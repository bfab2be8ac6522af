"""The documentation: README.md as a short front page, docs/ as one page per topic.

Every relative link in README.md, docs/*.md and the examples' READMEs must reach a file (and,
with an #anchor into a Markdown file, a heading there), and `mkdocs build --strict` must pass.
mkdocs comes with the test extras; without it that test skips, unless RATIOCINATOR_REQUIRE_DOCS=1
(CI) makes it fail.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 12_000

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    files = [README, *sorted(DOCS.glob("*.md")), *sorted((ROOT / "examples").rglob("README.md"))]
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced and indented code blocks, with inline code removed."""
    out: list[tuple[int, str]] = []
    fenced = False
    indented = False
    previous_blank = True
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            previous_blank = False
            continue
        if fenced:
            continue
        blank = not line.strip()
        if indented and not blank and not line.startswith("    "):
            indented = False
        if not indented and previous_blank and line.startswith("    ") and not blank:
            indented = True  # an indented code block starts after a blank line
        previous_blank = blank
        if indented or blank:
            continue
        out.append((number, INLINE_CODE.sub("", line)))
    return out


def slugify(text: str) -> str:
    """The heading ids Python-Markdown's toc extension (and so mkdocs) gives."""
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    seen: set[str] = set()
    for _, line in prose_lines_keep_code(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = base = slugify(match.group(2))
        n = 1
        while slug in seen:  # repeated headings get _1, _2, ...
            slug, n = f"{base}_{n}", n + 1
        seen.add(slug)
    return seen


def prose_lines_keep_code(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, inline code kept (headings may contain it)."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(line)]
        ref = REFERENCE_DEF.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue  # external, or an empty link text's placeholder
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    return problems


def test_every_relative_link_resolves() -> None:
    files = markdown_files()
    assert DOCS / "index.md" in files, "docs/index.md is missing"
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if not SCHEME.match(t)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link to docs/{', docs/'.join(missing)}"


def test_readme_is_a_short_front_page() -> None:
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at most {README_LIMIT} (move detail into docs/)"
    text = README.read_text(encoding="utf-8")
    for command in ("make run", "make test"):
        assert command in text, f"README.md no longer mentions `{command}`"


def test_slugs_match_python_markdown() -> None:
    """The anchor check above agrees with the ids mkdocs gives headings."""
    assert slugify("Renting on Vast.ai") == "renting-on-vastai"
    assert slugify("Traceability and `verify`") == "traceability-and-verify"
    assert slugify("Planning: the spec, a search, or an LLM") == "planning-the-spec-a-search-or-an-llm"
    assert slugify("results.tsv, the report and the progress chart") == "resultstsv-the-report-and-the-progress-chart"


@pytest.mark.subprocess
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        why = "mkdocs is not installed (it comes with the test extras: pip install -e '.[test]')"
        if os.environ.get("RATIOCINATOR_REQUIRE_DOCS") == "1":
            pytest.fail(f"{why}, and RATIOCINATOR_REQUIRE_DOCS=1")
        pytest.skip(why)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
