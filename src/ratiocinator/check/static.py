"""Static code checks run before anything is spent, each finding mechanically true.

An LLM-only reviewer once reported a syntax error that was not there. So a problem is
claimed here only when something that decides says so (the compiler, the tokenizer and
the AST, pip's resolver, the bytes of a file), and every finding carries its evidence:
the file, the line and the source line itself, plus the tool's own words where a tool
decided. Judging what a finding means for a study is the caller's job.
"""

from __future__ import annotations

import ast
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import tokenize
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ratiocinator.errors import WorkspaceError
from ratiocinator.repo.knobs import discover_knobs
from ratiocinator.repo.workspace import FILTERED_REQUIREMENTS, filter_requirements, find_lfs_pointers

_EXCERPT_CHARS = 200
_EVIDENCE_CHARS = 500
_EVIDENCE_LINES = 20


@dataclass(frozen=True)
class Finding:
    """One checked problem, with where it is and what shows it.

    Kinds: ``syntax_error``, ``placeholder`` (missing code), ``todo_note`` (a TODO/FIXME/XXX
    comment in a function body), ``requirements_missing``,
    ``invalid_requirement``, ``unresolvable_requirement``, ``requirements_error`` (pip
    failed for another reason), ``requirements_unchecked`` (the check could not decide:
    timeout, no pip, unreachable index) and ``lfs_pointer``.
    """

    kind: str
    message: str
    file: str | None = None  # relative to the checkout
    line: int | None = None
    excerpt: str = ""  # the source line at `line`, stripped and truncated
    evidence: tuple[str, ...] = ()  # further lines backing the finding: other source lines, tool output

    def where(self) -> str:
        if self.file is None:
            return ""
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "excerpt": self.excerpt,
            "evidence": list(self.evidence),
        }


def _clip(text: str, limit: int = _EXCERPT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- source files -----------------------------------------------------------------------


def _read(root: Path, rel: str) -> bytes | None:
    """The file's bytes; None when it is missing or unreadable (knob discovery reports those)."""
    try:
        return (root / rel).read_bytes()
    except OSError:
        return None


def _source_lines(data: bytes) -> list[str]:
    """The file's physical lines as Python numbers them (its encoding; only CR, LF, CRLF end a line)."""
    try:
        encoding = tokenize.detect_encoding(io.BytesIO(data).readline)[0]
        text = data.decode(encoding, errors="replace")
    except (SyntaxError, LookupError):
        text = data.decode("utf-8", errors="replace")
    return re.split(r"\r\n|\r|\n", text.removeprefix("\ufeff"))


def _line(lines: list[str], number: int | None) -> str:
    return _clip(lines[number - 1]) if number and 1 <= number <= len(lines) else ""


def reached_python_files(checkout: Path, runner_script: str) -> list[str]:
    """Every Python file the runner reaches (itself included when it is Python), in scan order,
    including files that fail to parse. Raises PlanError when the runner is not in the checkout."""
    return list(discover_knobs(checkout, runner_script).python_files)


# --- syntax -----------------------------------------------------------------------------


def python_syntax_errors(checkout: Path, files: Iterable[str]) -> list[Finding]:
    """Files this interpreter cannot compile, with the compiler's message and position.

    `compile` (not only `ast.parse`) also catches what the compiler rejects after parsing
    (`return` outside a function, a misplaced `from __future__`). The verdict is this
    interpreter's, so each message names its version: syntax newer than it (say, 3.12's
    `type X = ...` checked on 3.11) would be reported, and the message says on which Python.
    Files that cannot be read are skipped; knob discovery lists them as unreadable.
    """
    root = Path(checkout)
    findings = []
    for rel in files:
        data = _read(root, rel)
        if data is not None and (finding := _compile_error(data, rel)) is not None:
            findings.append(finding)
    return findings


def _compile_error(data: bytes, rel: str) -> Finding | None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning (invalid escapes) is not an error
        try:
            compile(data, rel, "exec", dont_inherit=True)
        except SyntaxError as exc:  # IndentationError and TabError included
            lines = _source_lines(data)
            if exc.lineno is None:  # NUL bytes: the compiler gives no position
                line = _nul_line(data)
                return Finding("syntax_error", f"Python {version} cannot compile {rel}: {exc.msg}",
                               file=rel, line=line, excerpt=_line(lines, line))
            column = f", column {exc.offset}" if exc.offset else ""
            return Finding(
                "syntax_error",
                f"Python {version} cannot compile {rel}: {exc.msg} "
                f"({type(exc).__name__} at line {exc.lineno}{column})",
                file=rel, line=exc.lineno, excerpt=_line(lines, exc.lineno) or _clip(exc.text or ""),
            )
        except ValueError as exc:  # early 3.11 releases raise ValueError for NUL bytes
            line = _nul_line(data)
            return Finding("syntax_error", f"Python {version} cannot compile {rel}: {exc}",
                           file=rel, line=line, excerpt=_line(_source_lines(data), line))
        except (RecursionError, MemoryError):
            return None  # too deeply nested for this process's stack, which says nothing about the code
    return None


def _nul_line(data: bytes) -> int | None:
    return data[: data.find(b"\0")].count(b"\n") + 1 if b"\0" in data else None


# --- placeholders -----------------------------------------------------------------------

_MARKER = re.compile(r"\b(TODO|FIXME|XXX)\b|(?i:^#+\s*(todo|fixme)\b)")
# Phrases that only ever mean "code was left out here", wherever they stand in a comment or string.
_OMITTED_ANYWHERE = re.compile(
    r"\b(?:omitted for brevity"
    r"|(?:code|implementation) (?:is |was |has been )?omitted"
    r"|(?:rest|remainder) of (?:the )?(?:code|implementation|function|method|class|file)"
    r" (?:remains|stays|is) (?:the same|unchanged)"
    r"|existing code (?:remains|stays) (?:the same|unchanged)"
    r"|(?:insert|add|put|write) (?:your )?(?:own )?code here"
    r"|your (?:own )?code (?:goes )?here"
    r"|implementation goes here)\b",
    re.IGNORECASE,
)
# Phrases that are placeholders only when they are all a comment or string says: "# rest of
# the code" stands in for code, "# the rest of the code expects float32" explains some.
_OMITTED_WHOLE = re.compile(
    r"(?:the )?(?:rest|remainder) of (?:the )?(?:code|implementation|function|method|class|file)"
    r"|fill (?:this |it |me )?in(?: here)?|(?:your )?code here|implement (?:me|this)",
    re.IGNORECASE,
)
# ...and these only next to an ellipsis: "# same as above" also explains a line like the last.
_OMITTED_WITH_ELLIPSIS = re.compile(r"(?:same as|unchanged from) (?:above|before)|existing code", re.IGNORECASE)
_ELLIPSIS = re.compile(r"\.\.\.|…")
_EDGE_PUNCTUATION = " \t.…()[]{}:;,-—*#'\"`"
_NOT_CODE = frozenset({tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                       tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER})
_FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", None)  # Python 3.12+
_STRING_BODY = re.compile(r"[A-Za-z]*('''|\"\"\"|'|\")(.*)\1", re.DOTALL)


def placeholders(checkout: Path, files: Iterable[str]) -> list[Finding]:
    """Marks of unfinished code in Python files: stub bodies, TODOs in bodies, omitted code.

    * A function whose body (after a docstring) is only `pass`, `...` or `raise
      NotImplementedError`. Not flagged, because the empty body is the point there: abstract
      methods, `@overload`s, members of `Protocol` classes, `...` in `.pyi` stubs, a method
      that a subclass among the files overrides (an abstract method by convention, or a
      hook), and an `__init__` that is only `pass` or `...` (an initializer with nothing
      to set up is complete; one that raises NotImplementedError is flagged).
    * A TODO / FIXME / XXX comment inside a function body (upper case anywhere, or any
      case when it opens the comment). A module-level or class-level TODO is a note about
      the file; inside a body it marks logic that may not be finished.
    * Comments and string literals saying code was left out ("omitted for brevity", "#
      ... rest of the code ...", "your code here"), never identifiers. Ambiguous phrases
      count only when they are the whole comment or string.

    Shell files are left alone: a shell runner is mostly top-level commands with no bodies
    to leave unfinished, and telling a comment from `$#`, `${#x}`, quotes or here-documents
    needs a full shell lexer; a regex would produce exactly the false findings this module
    exists to prevent. Files that do not parse are skipped (the syntax check reports them).
    """
    root = Path(checkout)
    parsed: list[tuple[str, list[str], ast.Module, list[tokenize.TokenInfo]]] = []
    for rel in files:
        data = _read(root, rel)
        if data is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(data, filename=rel)
            tokens = list(tokenize.tokenize(io.BytesIO(data).readline))
        except (SyntaxError, ValueError, RecursionError, MemoryError, tokenize.TokenError):
            continue
        parsed.append((rel, _source_lines(data), tree, tokens))
    overrides = _Overrides([tree for _, _, tree, _ in parsed])
    findings: list[Finding] = []
    for rel, lines, tree, tokens in parsed:
        functions = _Functions(tree).found
        found = _stub_findings(rel, lines, functions, overrides) + _text_findings(rel, lines, tokens, functions)
        findings += sorted(found, key=lambda finding: finding.line or 0)
    return findings


@dataclass(frozen=True)
class _Function:
    node: ast.FunctionDef | ast.AsyncFunctionDef
    qualname: str
    owner: ast.ClassDef | None  # the class it is a method of


class _Functions(ast.NodeVisitor):
    """Every function of a module with its qualified name and the class it belongs to."""

    def __init__(self, tree: ast.Module) -> None:
        self.found: list[_Function] = []
        self._names: list[str] = []
        self._owner: ast.ClassDef | None = None
        self.visit(tree)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer = self._owner
        self._names.append(node.name)
        self._owner = node
        self.generic_visit(node)
        self._names.pop()
        self._owner = outer

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.found.append(_Function(node, ".".join([*self._names, node.name]), self._owner))
        outer = self._owner
        self._names.append(node.name)
        self._owner = None
        self.generic_visit(node)
        self._names.pop()
        self._owner = outer

    visit_AsyncFunctionDef = visit_FunctionDef


def _simple_name(node: ast.expr) -> str | None:
    """`abc.abstractmethod` -> "abstractmethod", `Protocol[T]` -> "Protocol", `f(x)` -> "f"."""
    if isinstance(node, (ast.Call, ast.Subscript)):
        return _simple_name(node.func if isinstance(node, ast.Call) else node.value)
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


class _Overrides:
    """Which methods a subclass (by class name, across all the files) defines again."""

    def __init__(self, trees: list[ast.Module]) -> None:
        self._subclasses: dict[str, list[ast.ClassDef]] = {}
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    for base in filter(None, map(_simple_name, node.bases)):
                        self._subclasses.setdefault(base, []).append(node)

    def overridden(self, owner: ast.ClassDef, method: str) -> bool:
        seen: set[int] = set()
        pending = list(self._subclasses.get(owner.name, []))
        while pending:
            cls = pending.pop()
            if id(cls) in seen:
                continue
            seen.add(id(cls))
            if any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == method
                   for s in cls.body):
                return True
            pending += self._subclasses.get(cls.name, [])
        return False


def _stub_body(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ast.stmt] | None:
    """("`pass`" | "`...`" | "`raise NotImplementedError`", the statement) for a stub body."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if len(body) != 1:
        return None
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return "`pass`", stmt
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return "`...`", stmt
    if isinstance(stmt, ast.Raise) and stmt.exc is not None and stmt.cause is None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
            return "`raise NotImplementedError`", stmt
    return None


def _stub_is_intended(function: _Function, what: str, rel: str, overrides: _Overrides) -> bool:
    node, owner = function.node, function.owner
    decorators = {_simple_name(d) or "" for d in node.decorator_list}
    if "overload" in decorators or any(d.startswith("abstract") for d in decorators):
        return True
    if what == "`...`" and rel.endswith(".pyi"):
        return True
    if owner is None:
        return False
    if "Protocol" in {_simple_name(base) for base in owner.bases}:
        return True
    if node.name == "__init__" and what != "`raise NotImplementedError`":
        return True
    return overrides.overridden(owner, node.name)


def _stub_findings(rel: str, lines: list[str], functions: list[_Function], overrides: _Overrides) -> list[Finding]:
    findings = []
    for function in functions:
        stub = _stub_body(function.node)
        if stub is None or _stub_is_intended(function, stub[0], rel, overrides):
            continue
        what, stmt = stub
        line = function.node.lineno
        findings.append(Finding(
            "placeholder",
            f"function `{function.qualname}` has no implementation (body is only {what})",
            file=rel, line=line, excerpt=_line(lines, line),
            evidence=() if stmt.lineno == line else (f"line {stmt.lineno}: {_line(lines, stmt.lineno)}",),
        ))
    return findings


def _body_spans(functions: list[_Function], tokens: list[tokenize.TokenInfo]) -> list[tuple[int, int, str]]:
    """(first line, last line, qualname) of each function, innermost last among equals.

    A function's last statement ends its AST range, but comments indented under it that
    follow (`x = 1` then `# TODO: handle y`) are in its body too, so the span runs on over
    blank lines and comments indented deeper than the `def`, up to the next line of code.
    """
    code_lines: set[int] = set()
    comment_columns: dict[int, int] = {}
    for token in tokens:
        if token.type == tokenize.COMMENT and not token.line[: token.start[1]].strip():
            comment_columns[token.start[0]] = token.start[1]
        elif token.type not in _NOT_CODE:
            code_lines.update(range(token.start[0], token.end[0] + 1))
    last_line = max(code_lines | set(comment_columns), default=0)
    spans = []
    for function in functions:
        node = function.node
        end = node.end_lineno or node.lineno
        line = end + 1
        while line <= last_line and line not in code_lines:
            column = comment_columns.get(line)
            if column is not None:
                if column <= node.col_offset:
                    break
                end = line
            line += 1
        spans.append((node.lineno, end, function.qualname))
    return sorted(spans, key=lambda span: (span[0], -span[1]))


def _innermost(spans: list[tuple[int, int, str]], line: int) -> str | None:
    inside = [qualname for start, end, qualname in spans if start <= line <= end]
    return inside[-1] if inside else None


def _omission(text: str, whole_too: bool = True) -> str | None:
    """The phrase in `text` that says code was left out, or None."""
    if found := _OMITTED_ANYWHERE.search(text):
        return found.group()
    if not whole_too:
        return None
    core = re.sub(r"^(?:TODO|FIXME|XXX)\b:?", "", text.strip(_EDGE_PUNCTUATION), flags=re.IGNORECASE)
    core = " ".join(core.strip(_EDGE_PUNCTUATION).split())
    if _OMITTED_WHOLE.fullmatch(core) or (_OMITTED_WITH_ELLIPSIS.fullmatch(core) and _ELLIPSIS.search(text)):
        return core
    return None


def _text_findings(rel: str, lines: list[str], tokens: list[tokenize.TokenInfo],
                   functions: list[_Function]) -> list[Finding]:
    spans = _body_spans(functions, tokens)
    findings = []
    for token in tokens:
        line = token.start[0]
        if token.type == tokenize.COMMENT:
            if phrase := _omission(token.string):
                findings.append(Finding(
                    "placeholder", f'a comment says code was left out ("{phrase}"): put the code back',
                    file=rel, line=line, excerpt=_line(lines, line)))
            elif (marker := _MARKER.search(token.string)) and (qualname := _innermost(spans, line)):
                word = (marker.group(1) or marker.group(2)).upper()
                findings.append(Finding(
                    "todo_note", f"{word} comment in the body of function `{qualname}`: "
                    "check that the work it notes is done",
                    file=rel, line=line, excerpt=_line(lines, line)))
        elif token.type == tokenize.STRING or token.type == _FSTRING_MIDDLE:
            body = _STRING_BODY.fullmatch(token.string) if token.type == tokenize.STRING else None
            text = body.group(2) if body else token.string
            if phrase := _omission(text, whole_too=body is not None):
                where = token.string.lower().find(phrase.lower())
                at = line + token.string[: max(where, 0)].count("\n")
                findings.append(Finding(
                    "placeholder", f'a string says code was left out ("{phrase}"): put the code back',
                    file=rel, line=at, excerpt=_line(lines, at)))
    return findings


# --- requirements -----------------------------------------------------------------------

_NOT_FOUND = re.compile(
    r"^ERROR: (?:Could not find a version that satisfies the requirement|No matching distribution found for)"
    r" (?P<req>.+?)(?: \(from (?!versions: )(?P<parent>[^()]*(?:\([^()]*\)[^()]*)*)\))?"
    r"(?: \(from versions: (?P<versions>[^)]*)\))?$"
)
_CONFLICT = re.compile(r"^ERROR: Cannot install (?P<what>.+) because these package versions have conflicting")
# pip >= 24: "Invalid requirement: 'x y': why", the line number lines later; older: one line.
_INVALID = re.compile(
    r"^ERROR: Invalid requirement: (?P<req>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")(?:: (?P<why>.+?))?"
    r"(?: \(from line \d+ of .+\))?$"
)
_FROM_LINE = re.compile(r"\(from line (?P<line>\d+) of ")
_FILE_LINE = re.compile(r"-r (?P<file>\S+) \(line (?P<line>\d+)\)")
_USER_REQUESTED = re.compile(r"^The user requested (?P<req>.+)$")
_NETWORK = re.compile(
    r"Retrying \(Retry\(|connection broken by|Failed to establish a new connection|NewConnectionError"
    r"|NameResolutionError|Temporary failure in name resolution|ProxyError|SSLError|Read timed out"
    r"|ConnectTimeoutError|Could not fetch URL|Could not resolve host"
)
_NESTED = re.compile(r"(-r|--requirement)\s*=?\s*(\S+)$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class _RequirementLine:
    file: str
    line: int
    text: str  # the logical line, continuations joined, as the filtered copy holds it


def requirements_findings(
    checkout: Path,
    requirements: str | None,
    exclude: Iterable[str],
    python: str,
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Whether the spec's requirements file resolves, decided by pip itself.

    Runs `python -m pip install --dry-run` on the same filtered copy `prepare_env` installs
    (excludes removed, `-r` files inlined), in the checkout as `prepare_env` does, so pip's
    resolver gives the verdict without installing anything. `python` should be the
    interpreter the run's venv is built from: what is installed there counts as satisfied,
    as it does in that `--system-site-packages` venv. `env` is pip's whole environment
    (default: this process's), so PIP_INDEX_URL, PIP_FIND_LINKS and PIP_NO_INDEX apply.
    A package that pip finds no version of while the index could not be reached is
    reported as unchecked, not as unresolvable. Returns [] when everything resolves.
    """
    if requirements is None:
        return []
    root = Path(checkout).resolve()
    path = root / requirements
    if not path.is_file():
        return [Finding("requirements_missing",
                        f"the requirements file {requirements} named by deps.requirements is not in the "
                        "checkout: commit it, or fix the path (relative to the repository root)",
                        file=requirements)]
    try:
        filtered = filter_requirements(path, exclude)
    except WorkspaceError as exc:  # a nested -r file is missing or unreadable
        return [Finding("requirements_missing", exc.message, file=requirements)]
    except UnicodeDecodeError as exc:
        return [Finding("invalid_requirement",
                        f"{requirements} (or a file it includes with -r) is not UTF-8 text ({exc.reason}); "
                        "save it as UTF-8", file=requirements)]
    sources = _requirement_lines(root, path, set())
    with tempfile.TemporaryDirectory(prefix="ratiocinator-requirements-") as tmp:
        copy = Path(tmp) / FILTERED_REQUIREMENTS
        copy.write_text(filtered, encoding="utf-8")
        # --report: with --dry-run it lets pip resolve for an externally managed (PEP 668) system
        # Python, which is what the run's venv is usually built from.
        argv = [python, "-m", "pip", "install", "--dry-run", "--report", str(Path(tmp) / "report.json"),
                "--disable-pip-version-check", "--no-input", "-r", str(copy)]
        try:
            code, output = _run(argv, cwd=root, env=dict(os.environ if env is None else env), timeout_s=timeout_s)
        except OSError as exc:
            return [Finding("requirements_unchecked",
                            f"cannot run {python} to check {requirements} ({exc.strerror or exc}): "
                            "whether it resolves is unknown", file=requirements)]
        output = [line.replace(str(copy), FILTERED_REQUIREMENTS) for line in output]
    if code is None:
        return [Finding("requirements_unchecked",
                        f"pip did not finish resolving {requirements} within {timeout_s:g} s and was stopped: "
                        "whether it resolves is unknown (raise the timeout, or check the index is fast "
                        "to reach)", file=requirements, evidence=_evidence(output[-_EVIDENCE_LINES:]))]
    if code == 0:
        return []
    return _pip_failure(code, output, requirements, sources, filtered.splitlines(), python)


def _run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int | None, list[str]]:
    """(exit code or None on timeout, stdout and stderr lines); a timeout ends pip's whole
    process group, since pip may have started builds or git clones of its own."""
    with subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace",
                          start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            return None, out.splitlines()
    return proc.returncode, out.splitlines()


def _evidence(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(_clip(line, _EVIDENCE_CHARS) for line in lines if line.strip())


def _requirement_lines(root: Path, path: Path, seen: set[Path]) -> list[_RequirementLine]:
    """The logical lines of a requirements file and the `-r` files it names, where they stand."""
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    try:
        physical = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    found: list[_RequirementLine] = []
    pending, start = "", 0
    for number, text in enumerate(physical, start=1):
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1]
            continue
        logical, pending = pending + text, ""
        content = re.sub(r"(^|\s+)#.*$", "", logical).strip()
        nested = _NESTED.match(content)
        if nested and not _URL.match(nested.group(2)):
            found += _requirement_lines(root, path.parent / nested.group(2), seen)
        else:
            found.append(_RequirementLine(name, start, logical))
    return found


def _project(text: str) -> str | None:
    """The normalised project name a requirement string names; None for paths, URLs, options."""
    content = re.sub(r"(^|\s+)#.*$", "", text).strip()
    try:
        return canonicalize_name(Requirement(re.split(r"\s+-", content, maxsplit=1)[0]).name)
    except InvalidRequirement:
        return None


def _by_name(sources: list[_RequirementLine], requirement: str) -> _RequirementLine | None:
    name = _project(requirement)
    return next((s for s in sources if name is not None and _project(s.text) == name), None)


def _by_filtered_line(sources: list[_RequirementLine], filtered: list[str], number: int) -> _RequirementLine | None:
    """The source of line `number` of the filtered copy (whose kept lines are the originals)."""
    if not 1 <= number <= len(filtered):
        return None
    return next((s for s in sources if s.text == filtered[number - 1]), None)


def _at(kind: str, message: str, source: _RequirementLine | None, requirements: str,
        evidence: Iterable[str]) -> Finding:
    if source is None:
        return Finding(kind, message, file=requirements, evidence=_evidence(evidence))
    return Finding(kind, message, file=source.file, line=source.line, excerpt=_clip(source.text),
                   evidence=_evidence(evidence))


def _pip_failure(code: int, output: list[str], requirements: str, sources: list[_RequirementLine],
                 filtered: list[str], python: str) -> list[Finding]:
    """Findings from a failed `pip install --dry-run`: each error pip names, with its lines."""
    if any("No module named pip" in line for line in output):
        return [Finding("requirements_unchecked",
                        f"pip is not installed for {python}, so whether {requirements} resolves is unknown",
                        file=requirements, evidence=_evidence(output[-3:]))]
    network = [line for line in output if _NETWORK.search(line)]
    findings: list[Finding] = []
    unknown: list[str] = []
    missing: dict[str, tuple[str | None, str | None, list[str]]] = {}
    for line in output:
        if found := _NOT_FOUND.match(line):
            parent, versions, lines = missing.get(found["req"], (None, None, []))
            missing[found["req"]] = (parent or found["parent"], versions or found["versions"], [*lines, line])
    for requirement, (parent, versions, lines) in missing.items():
        if network and versions in (None, "none"):
            unknown.append(requirement)
            continue
        listed = [v.strip() for v in (versions or "").split(",") if v.strip() and v.strip() != "none"]
        if not listed:
            why = "pip found no version of it in the package index"
        elif len(listed) <= 8:
            why = f"pip found only the versions {', '.join(listed)}"
        else:
            shown = f"{', '.join(listed[:3])}, …, {', '.join(listed[-3:])}"
            why = f"pip found only the versions {shown} ({len(listed)} in all)"
        if parent and not _FILE_LINE.search(parent):  # a dependency of `parent`
            shown, source = _origin(parent, sources, filtered)
            message = f"`{requirement}`, which `{shown}` requires, cannot be installed: {why}"
        else:  # a line of the file, which pip may name as "-r FILE (line N)"
            source = _origin(parent, sources, filtered)[1] if parent else None
            source = source or _by_name(sources, requirement)
            message = f"`{requirement}` cannot be installed: {why}"
        findings.append(_at("unresolvable_requirement", message, source, requirements, lines))
    findings += _conflicts(output, requirements, sources, filtered)
    findings += _invalid(output, requirements, sources, filtered)
    if network:
        subject = ", ".join(f"`{r}`" for r in unknown) if unknown else "the requirements"
        findings.append(Finding(
            "requirements_unchecked",
            f"pip hit network errors, so whether {subject} in {requirements} can be installed is "
            "unknown: check the network and PIP_INDEX_URL, then check again",
            file=requirements, evidence=_evidence(network[:5])))
    elif not findings:
        first = next((i for i, line in enumerate(output) if line.lstrip().lower().startswith("error:")), None)
        tail = output[first:] if first is not None else output[-_EVIDENCE_LINES:]
        said = next((line.strip() for line in output if line.startswith("ERROR:")), tail[0] if tail else "")
        findings.append(Finding(
            "requirements_error",
            f"`pip install --dry-run -r {requirements}` failed (exit {code}): "
            f"{_clip(said.removeprefix('ERROR:')) or '(no output)'}",
            file=requirements, evidence=_evidence(tail[:_EVIDENCE_LINES])))
    return findings


def _origin(mention: str, sources: list[_RequirementLine],
            filtered: list[str]) -> tuple[str, _RequirementLine | None]:
    """What pip's "(from X)" names, as shown to the user, and the requirement line it comes from."""
    if reference := _FILE_LINE.search(mention):
        source = _by_filtered_line(sources, filtered, int(reference["line"]))
        return (f"`{' '.join(source.text.split())}`" if source else mention), source
    return mention, _by_name(sources, mention)


def _conflicts(output: list[str], requirements: str, sources: list[_RequirementLine],
               filtered: list[str]) -> Iterator[Finding]:
    """pip's ResolutionImpossible: the clashing requirements and its "conflict is caused by" lines."""
    block: list[str] = []
    if "The conflict is caused by:" in output:
        for line in output[output.index("The conflict is caused by:") + 1:]:
            if not line.strip():
                break
            block.append(line.strip())
    reported = False
    for line in output:
        if conflict := _CONFLICT.match(line):
            # pip names requirements as written or as "-r FILE (line N)" of the filtered copy.
            located = [_by_filtered_line(sources, filtered, int(m["line"]))
                       for m in _FILE_LINE.finditer(conflict["what"])]
            what = _FILE_LINE.sub(lambda m: _origin(m.group(), sources, filtered)[0], conflict["what"])
            requested = (m["req"] for m in map(_USER_REQUESTED.match, block) if m)
            source = next(filter(None, located), None) or next(
                filter(None, (_by_name(sources, r) for r in requested)), None)
            yield _at("unresolvable_requirement",
                      f"pip cannot install {what} together: no set of versions satisfies them all",
                      source, requirements, [line, "The conflict is caused by:", *block] if block else [line])
            reported = True
    if not reported and (impossible := [line for line in output if "ResolutionImpossible" in line]):
        yield _at("unresolvable_requirement", "pip cannot install the requirements together: "
                  "no set of versions satisfies them all", None, requirements, [*impossible, *block])


def _invalid(output: list[str], requirements: str, sources: list[_RequirementLine],
             filtered: list[str]) -> Iterator[Finding]:
    """Lines pip cannot parse, located through pip's "(from line N of ...)"."""
    for index, line in enumerate(output):
        if invalid := _INVALID.match(line):
            following = [] if _FROM_LINE.search(line) else output[index + 1: index + 4]
            number = next((int(m["line"]) for m in map(_FROM_LINE.search, [line, *following]) if m), None)
            source = _by_filtered_line(sources, filtered, number) if number else None
            why = f": {invalid['why']}" if invalid["why"] else ""
            yield _at("invalid_requirement", f"pip cannot parse the requirement {invalid['req']}{why}",
                      source, requirements, [line, *following])


# --- Git LFS ----------------------------------------------------------------------------


def lfs_pointer_findings(checkout: Path) -> list[Finding]:
    """Tracked files still holding a Git LFS pointer: a run on them trains on nothing.
    Raises WorkspaceError when `checkout` is not a git working tree."""
    findings = []
    for name in find_lfs_pointers(checkout):
        lines = _source_lines(_read(Path(checkout), name) or b"")
        findings.append(Finding(
            "lfs_pointer",
            f"{name} is a Git LFS pointer, not the real file content: run `git lfs pull` in the "
            "repository (with git-lfs installed) and make sure its LFS objects are pushed to the remote",
            file=name, line=1, excerpt=_line(lines, 1), evidence=_evidence(lines[1:3]),
        ))
    return findings
