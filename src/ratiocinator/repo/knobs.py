"""Knob discovery: which environment variables and flags a runner script reads.

An arm that sets a knob nobody reads silently reruns another arm's config (a published
study ran one config 18 times that way), so before anything is spent the planner checks
every arm's knobs against what the runner reads. The analysis is static and best effort:
it reads files and never runs them, following the runner into the shell scripts, Python
files and modules inside the checkout that it invokes or imports. Reads whose name cannot
be known are listed in `dynamic`, so a caller can tell how far to trust the result.
"""

from __future__ import annotations

import ast
import bisect
import re
import shlex
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from ratiocinator.errors import PlanError

_MAX_FILES = 500
_MAX_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Knob:
    """One environment variable or argparse flag the runner reads."""

    name: str
    kind: Literal["env", "arg"]
    default: str | None
    sources: tuple[str, ...]


@dataclass(frozen=True)
class KnobReport:
    """Everything discovery found, with what it could not see."""

    knobs: dict[str, Knob]
    files: tuple[str, ...]
    dynamic: tuple[str, ...]
    unreadable: tuple[str, ...]
    # Every file read as Python, in scan order, including those that failed to parse (which
    # `files` leaves out): a syntax check must cover exactly what the runner reaches.
    python_files: tuple[str, ...] = ()
    # Every option string of each argparse knob ("--lr" -> ("--lr", "-l")); `arg_flags` needs
    # the aliases, which `Knob` has no room for.
    flag_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def env_names(self) -> frozenset[str]:
        return frozenset(name for name, knob in self.knobs.items() if knob.kind == "env")

    def arg_flags(self) -> frozenset[str]:
        names = {name for name, knob in self.knobs.items() if knob.kind == "arg"}
        return frozenset(names.union(*self.flag_aliases.values()))


def discover_knobs(checkout: Path, runner_script: str) -> KnobReport:
    """Find the knobs `runner_script` (relative to `checkout`) reads, without running anything."""
    root = Path(checkout).resolve()
    runner = (root / runner_script).resolve()
    if not runner.is_relative_to(root) or not runner.is_file():
        raise PlanError(
            f"runner script {runner_script} not found in the checkout at {checkout}",
            hint="runner_script is a path relative to the repository root; check its spelling "
            "and that the file is committed on the branch being run",
        )
    return _Scan(root).run(runner)


class _Hit(NamedTuple):
    """One place a knob is read, before hits of the same name are merged."""

    name: str
    kind: Literal["env", "arg"]
    default: str | None
    path: str
    line: int
    flags: tuple[str, ...] = ()


class _Scan:
    """Walks the runner and every local file it reaches, each file once (so cycles end)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # (file, "py" | "sh" | None to decide from the file, names the invoking shell overwrote)
        self._queue: deque[tuple[Path, str | None, frozenset[str]]] = deque()
        self._seen: set[Path] = set()
        self._hits: list[_Hit] = []
        self._files: list[str] = []
        self._dynamic: list[str] = []
        self._unreadable: list[str] = []
        self._python_files: list[str] = []

    def run(self, runner: Path) -> KnobReport:
        self._enqueue(runner, None, frozenset())
        while self._queue:
            self._scan(*self._queue.popleft())
        knobs, aliases = _merge(self._hits)
        return KnobReport(
            knobs=knobs,
            files=tuple(self._files),
            dynamic=tuple(dict.fromkeys(self._dynamic)),
            unreadable=tuple(self._unreadable),
            python_files=tuple(self._python_files),
            flag_aliases=aliases,
        )

    def _enqueue(self, path: Path, language: str | None, shadowed: frozenset[str]) -> None:
        if path not in self._seen and path.is_relative_to(self.root):
            self._seen.add(path)
            self._queue.append((path, language, shadowed))

    def _scan(self, path: Path, language: str | None, shadowed: frozenset[str]) -> None:
        rel = path.relative_to(self.root).as_posix()
        if len(self._files) >= _MAX_FILES:
            self._unreadable.append(f"{rel}: not scanned, the {_MAX_FILES}-file limit was reached")
            return
        try:
            if path.stat().st_size > _MAX_BYTES:
                self._unreadable.append(f"{rel}: larger than {_MAX_BYTES // 2**20} MB, not scanned")
                return
            data = path.read_bytes()
        except OSError as exc:
            self._unreadable.append(f"{rel}: cannot be read ({exc.strerror or exc})")
            return
        if (language or _language(path, data)) == "py":
            self._python_files.append(rel)
            self._scan_python(path, rel, data, shadowed)
        else:
            self._scan_shell(path, rel, data, shadowed)

    def _scan_python(self, path: Path, rel: str, data: bytes, shadowed: frozenset[str]) -> None:
        try:
            found = _PythonFile(ast.parse(data, filename=rel), rel)
        except SyntaxError as exc:
            self._unreadable.append(f"{rel}: syntax error at line {exc.lineno}: {exc.msg}")
            return
        except (ValueError, RecursionError) as exc:
            self._unreadable.append(f"{rel}: cannot be parsed ({exc})")
            return
        self._files.append(rel)
        self._hits += [hit for hit in found.hits if not (hit.kind == "env" and hit.name in shadowed)]
        self._dynamic += [f"{rel}:{line}" for line in sorted(set(found.dynamic))]
        for target in self._imported(path, found.imports):
            self._enqueue(target, "py", shadowed)

    def _scan_shell(self, path: Path, rel: str, data: bytes, shadowed: frozenset[str]) -> None:
        try:
            script = _ShellScript(data.decode("utf-8", errors="replace"), path, self.root, rel, shadowed)
        except RecursionError:
            self._unreadable.append(f"{rel}: nested too deeply to parse")
            return
        self._files.append(rel)
        self._hits += script.hits
        self._dynamic += [f"{rel}:{line}" for line in sorted(set(script.dynamic))]
        for target, language, target_shadowed in script.targets:
            self._enqueue(target, language, target_shadowed)

    def _imported(self, path: Path, imports: list[tuple[int, str, tuple[str, ...]]]) -> list[Path]:
        """Local files an import runs: first match under the checkout root, the file's folder, src/."""
        files: list[Path] = []
        for level, module, names in imports:
            parts = module.split(".") if module else []
            if level:
                bases = [path.parents[level - 1]] if level <= len(path.parents) else []
            else:
                bases = [self.root, path.parent, self.root / "src"]
            for base in bases:
                found = _find_module(base, parts)
                if found is None:
                    continue
                files += found[0]
                if found[1].is_dir():
                    for name in names:
                        submodule = _find_module(found[1], [name])
                        files += submodule[0] if submodule else []
                break
        return [file.resolve() for file in files]


def _language(path: Path, data: bytes) -> str:
    """`.py` files and python-shebang scripts are Python; anything else is read as shell."""
    if path.suffix == ".py":
        return "py"
    first_line = data.split(b"\n", 1)[0]
    return "py" if first_line.startswith(b"#!") and b"python" in first_line else "sh"


def _find_module(base: Path, parts: list[str]) -> tuple[list[Path], Path] | None:
    """Files Python runs to import `parts` from `base` (package `__init__`s, then the module),
    and where the import ends (a package folder or a module file); None if it is not there."""
    files: list[Path] = []
    here = base
    for i, part in enumerate(parts):
        package = here / part
        if (package / "__init__.py").is_file():
            files.append(package / "__init__.py")
            here = package
        elif i == len(parts) - 1 and (here / f"{part}.py").is_file():
            here = here / f"{part}.py"
            files.append(here)
        elif package.is_dir():
            here = package
        else:
            return None
    return files, here


def _merge(hits: list[_Hit]) -> tuple[dict[str, Knob], dict[str, tuple[str, ...]]]:
    """One knob per name: sources united, default the first one found in scan order."""
    groups: dict[str, list[_Hit]] = {}
    for hit in hits:
        groups.setdefault(hit.name, []).append(hit)
    knobs: dict[str, Knob] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    for name in sorted(groups):
        group = groups[name]
        default = next((hit.default for hit in group if hit.default is not None), None)
        places = sorted({(hit.path, hit.line) for hit in group})
        sources = tuple(f"{path}:{line}" for path, line in places)
        knobs[name] = Knob(name, group[0].kind, default, sources)
        if group[0].kind == "arg":
            aliases[name] = tuple(dict.fromkeys(flag for hit in group for flag in hit.flags))
    return knobs, aliases


# --- Python -----------------------------------------------------------------------------


def _literal(node: ast.expr | None) -> str | None:
    """A default as written when it is a literal; None when it is computed (or is None)."""
    if node is None:
        return None
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    return None if value is None else str(value)


def _string(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    if len(call.args) > position:
        return call.args[position]
    return next((kw.value for kw in call.keywords if kw.arg == keyword), None)


class _PythonFile(ast.NodeVisitor):
    """The env reads, argparse flags, computed-name env reads and imports of one module."""

    _ENV_GETTERS = frozenset({"get", "setdefault", "pop"})
    _ENV_ITERATORS = frozenset({"items", "keys", "values"})

    def __init__(self, tree: ast.Module, rel: str) -> None:
        self.rel = rel
        self.hits: list[_Hit] = []
        self.dynamic: list[int] = []
        self.imports: list[tuple[int, str, tuple[str, ...]]] = []
        self._os: set[str] = {"os"}
        self._environ: set[str] = set()
        self._getenv: set[str] = set()
        self._bind_aliases(tree)
        self.visit(tree)
        self.hits.sort(key=lambda hit: hit.line)

    def _bind_aliases(self, tree: ast.Module) -> None:
        """Names that mean `os`, `os.environ` or `os.getenv` anywhere in the module."""
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "os" or (alias.name.startswith("os.") and not alias.asname):
                        self._os.add(alias.asname or "os")
            elif isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level:
                bound = {"environ": self._environ, "getenv": self._getenv}
                for alias in node.names:
                    if alias.name in bound:
                        bound[alias.name].add(alias.asname or alias.name)
        for node in ast.walk(tree):  # `env = os.environ`
            if isinstance(node, ast.Assign) and self._is_environ(node.value):
                self._environ.update(t.id for t in node.targets if isinstance(t, ast.Name))

    def _is_os_member(self, node: ast.expr, attr: str, bare_names: set[str]) -> bool:
        """`os.<attr>` through any alias of `os`, or a bare name bound to it."""
        if isinstance(node, ast.Name):
            return node.id in bare_names
        return (
            isinstance(node, ast.Attribute)
            and node.attr == attr
            and isinstance(node.value, ast.Name)
            and node.value.id in self._os
        )

    def _is_environ(self, node: ast.expr) -> bool:
        return self._is_os_member(node, "environ", self._environ)

    def _read(self, node: ast.expr, key: ast.expr | None, default: ast.expr | None = None) -> None:
        name = _string(key)
        if name is not None:
            self.hits.append(_Hit(name, "env", _literal(default), self.rel, node.lineno))
        elif key is not None:
            self.dynamic.append(node.lineno)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, ast.Load) and self._is_environ(node.value):
            self._read(node, node.slice)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if self._is_os_member(func, "getenv", self._getenv):
            self._read(node, _argument(node, 0, "key"), _argument(node, 1, "default"))
        elif isinstance(func, ast.Attribute) and self._is_environ(func.value):
            if func.attr in self._ENV_GETTERS:
                self._read(node, _argument(node, 0, "key"), _argument(node, 1, "default"))
            elif func.attr in self._ENV_ITERATORS:
                self.dynamic.append(node.lineno)
        elif isinstance(func, ast.Attribute) and func.attr == "add_argument":
            self._add_argument(node)
        self.generic_visit(node)

    def _add_argument(self, node: ast.Call) -> None:
        """An optional argparse argument; positionals cannot be set by an arm, so are skipped."""
        flags = tuple(s for s in map(_string, node.args) if s and s.startswith("-"))
        if flags:
            name = next((flag for flag in flags if flag.startswith("--")), flags[0])
            default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
            self.hits.append(_Hit(name, "arg", _literal(default), self.rel, node.lineno, flags))

    def visit_Compare(self, node: ast.Compare) -> None:
        if (
            len(node.ops) == 1
            and isinstance(node.ops[0], (ast.In, ast.NotIn))
            and self._is_environ(node.comparators[0])
        ):
            self._read(node, node.left)
        self.generic_visit(node)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        if self._is_environ(node.iter):
            self.dynamic.append(node.lineno)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_comprehension(self, node: ast.comprehension) -> None:
        if self._is_environ(node.iter):
            self.dynamic.append(node.iter.lineno)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports += [(0, alias.name, ()) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = tuple(alias.name for alias in node.names if alias.name != "*")
        self.imports.append((node.level, node.module or "", names))


# --- Shell ------------------------------------------------------------------------------

# Names the shell or the system sets: reading them does not ask for a knob.
_SYSTEM_NAMES = frozenset(
    "PATH HOME PWD OLDPWD USER LOGNAME SHELL TMPDIR LANG LANGUAGE TERM HOSTNAME HOSTTYPE "
    "MACHTYPE OSTYPE RANDOM SRANDOM LINENO SECONDS EPOCHSECONDS EPOCHREALTIME FUNCNAME IFS "
    "PPID UID EUID GROUPS BASH BASHPID SHLVL PS1 PS2 PS3 PS4 OPTARG OPTIND OPTERR REPLY "
    "PIPESTATUS DIRSTACK COLUMNS LINES HISTFILE HISTSIZE MAIL".split()
)
_SYSTEM_PREFIXES = ("LC_", "BASH_")

_NAME = re.compile(r"[A-Za-z_]\w*")
_ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)(\+?)=")
_ARRAY_KEYS = re.compile(r"!([A-Za-z_]\w*)\[[@*]\]")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_PYTHON = re.compile(r"python[\d.]*")
_REDIRECT = re.compile(r"&?[<>]+[&|]?")
_ANSI_C_BODY = re.compile(r"(?:[^'\\]|\\.)*'", re.S)
# `$(dirname "$0")` or `$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)`, quotes removed.
_SCRIPT_DIR = re.compile(
    r"(?:\$\(cd\s+)?\$\(dirname\s+\$\{?(?:0|BASH_SOURCE(?:\[0\])?)\}?\)"
    r"(?P<sub>[^\s;&|)]*)(?:\s*(?:&&|;)\s*pwd[^)]*\))?"
)

_OPENERS = frozenset({"if", "while", "until", "{"})
_CLOSERS = frozenset({"fi", "done", "esac", "}"})
_PREFIXES = frozenset({"!", "then", "do", "else", "elif", "time"})
_BLOCK_WORDS = _OPENERS | _CLOSERS | _PREFIXES
_DECLARATIONS = frozenset({"export", "declare", "typeset", "readonly", "local"})
_SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh"})
_LAUNCHERS = frozenset({"torchrun", "deepspeed"})
# Commands that run the rest of their words as a command, with the options that take a value.
_WRAPPERS: dict[str, tuple[str, ...]] = {
    "exec": (), "nohup": (), "time": (), "command": (), "stdbuf": (), "nice": ("-n",),
    "env": ("-u", "-C", "-S", "--unset", "--chdir", "--split-string"),
    "timeout": ("-s", "-k", "--signal", "--kill-after"),
}
# `TOOL run [options] command...`
_RUN_TOOLS: dict[str, tuple[str, ...]] = {
    "uv": ("--with", "--with-requirements", "--python", "-p", "--project", "--directory",
           "--package", "--extra", "--group", "--env-file"),
    "poetry": (), "pipenv": (), "conda": ("-n", "--name", "-p", "--prefix"),
}


def _assignment(raw: str) -> re.Match[str]:
    """The ``NAME=`` / ``NAME+=`` match of a word already known to be an assignment."""
    assignment = _ASSIGNMENT.match(raw)
    assert assignment is not None, raw
    return assignment


def _dequote(word: str) -> str:
    """A shell word with its quoting removed (best effort: unbalanced quotes stay as written)."""
    try:
        return " ".join(shlex.split(word))
    except ValueError:
        return word


class _Command(NamedTuple):
    words: list[tuple[str, int]]  # raw word and its offset in the script
    guarded: bool  # after && or ||, in a pipeline, subshell or substitution: cannot overwrite


class _ShellLexer:
    """Splits shell text into simple commands and finds the `$` expansions that are live.

    Quoting decides both: `#` starts a comment only at a word start, single quotes and quoted
    here-documents hide `$`, escaped `\\$` is literal, and `$(...)` and backticks hold commands
    of their own.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.commands: list[_Command] = []
        self.expansions: list[tuple[int, int]] = []  # (start, end) of `$NAME` and `${...}`
        self._heredocs: list[tuple[str, bool]] = []  # (delimiter, expands)
        self._list(closer=None)

    def _at(self, offset: int = 0) -> str:
        return self.text[self.pos + offset : self.pos + offset + 1]

    def _list(self, closer: str | None) -> None:
        """Commands up to `closer` (`)` or a backtick, for substitutions) or the end."""
        words: list[tuple[str, int]] = []
        parens, after_operator, drop_next = 0, False, False

        def flush() -> None:
            nonlocal words
            if words:
                self.commands.append(_Command(words, closer is not None or parens > 0 or after_operator))
            words = []

        while self.pos < len(self.text):
            c = self._at()
            if c == "\n":
                flush()
                after_operator = False
                self.pos += 1
                self._heredoc_bodies()
            elif c in " \t\r":
                self.pos += 1
            elif c == "\\" and self._at(1) == "\n":
                self.pos += 2
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif c == closer and (c == "`" or parens == 0):
                flush()
                self.pos += 1
                return
            elif c in "()":
                flush()
                parens = parens + 1 if c == "(" else max(parens - 1, 0)
                self.pos += 1
            elif self.text.startswith("<<", self.pos) and not self.text.startswith("<<<", self.pos):
                self._heredoc_start()
            elif c in "<>" or self.text.startswith("&>", self.pos):
                if words and words[-1][0].isdigit() and words[-1][1] + len(words[-1][0]) == self.pos:
                    words.pop()  # the `2` of `2>&1`
                redirect = _REDIRECT.match(self.text, self.pos)
                assert redirect is not None  # the text has <, > or &> here
                self.pos = redirect.end()
                drop_next = True
            elif c in ";&|":
                operator = self.text[self.pos : self.pos + 2]
                flush()
                after_operator = operator in ("&&", "||") or c == "|"
                self.pos += 2 if operator in ("&&", "||", ";;") else 1
            else:
                start = self.pos
                word = self._word(closer)
                if not drop_next:
                    words.append((word, start))
                drop_next = False
        flush()

    def _word(self, closer: str | None) -> str:
        start = self.pos
        while self.pos < len(self.text):
            c = self._at()
            if c in " \t\r\n;&|()<>" or (c == "`" and closer == "`"):
                break
            if c == "`":
                self.pos += 1
                self._list("`")
            elif c == "'":
                self._single_quoted()
            elif c == '"':
                self._double_quoted()
            elif c == "\\":
                self.pos += 2
            elif c == "$":
                self._dollar()
            else:
                self.pos += 1
        return self.text[start : self.pos]

    def _single_quoted(self) -> None:
        end = self.text.find("'", self.pos + 1)
        self.pos = len(self.text) if end < 0 else end + 1

    def _double_quoted(self) -> None:
        self.pos += 1
        while self.pos < len(self.text):
            c = self._at()
            if c == '"':
                self.pos += 1
                return
            if c == "\\":
                self.pos += 2
            elif c == "$":
                self._dollar()
            elif c == "`":
                self.pos += 1
                self._list("`")
            else:
                self.pos += 1

    def _dollar(self) -> None:
        start, after = self.pos, self._at(1)
        if self.text.startswith("$((", start):
            self.pos += 3
            self._arithmetic()
        elif after == "(":
            self.pos += 2
            self._list(")")
        elif after == "{":
            self.pos += 2
            self._braced()
            self.expansions.append((start, self.pos))
        elif after == "'":  # $'...' (ANSI-C quoting)
            end = _ANSI_C_BODY.match(self.text, start + 2)
            self.pos = end.end() if end else len(self.text)
        elif name := _NAME.match(self.text, start + 1):
            self.pos = name.end()
            self.expansions.append((start, self.pos))
        else:  # $$ $# $? $! $- $@ $* $0-$9, or a lone `$`
            self.pos += 2 if after and after in "$#?!-@*0123456789" else 1

    def _braced(self) -> None:
        while self.pos < len(self.text):
            c = self._at()
            if c == "}":
                self.pos += 1
                return
            if c == "\\":
                self.pos += 2
            elif c == "'":
                self._single_quoted()
            elif c == '"':
                self._double_quoted()
            elif c == "$":
                self._dollar()
            else:
                self.pos += 1

    def _arithmetic(self) -> None:
        depth = 2
        while self.pos < len(self.text):
            c = self._at()
            if c == "$":
                self._dollar()
                continue
            depth += {"(": 1, ")": -1}.get(c, 0)
            self.pos += 1
            if depth == 0:
                return

    def _heredoc_start(self) -> None:
        self.pos += 2
        if self._at() == "-":
            self.pos += 1
        while self._at() in (" ", "\t"):
            self.pos += 1
        if not self._at() or self._at() in "\n;&|()<>":
            return
        raw = self._word(None)
        self._heredocs.append((_dequote(raw), not any(q in raw for q in "'\"\\")))

    def _heredoc_bodies(self) -> None:
        """Skip the bodies of here-documents opened on the line just ended."""
        pending, self._heredocs = self._heredocs, []
        for delimiter, expands in pending:
            while self.pos < len(self.text):
                end = self.text.find("\n", self.pos)
                end = len(self.text) if end < 0 else end
                if self.text[self.pos : end].strip() == delimiter:
                    self.pos = end + 1
                    break
                if expands:
                    self._expansions_until(end)
                self.pos = end + 1
        self.pos = min(self.pos, len(self.text))

    def _expansions_until(self, end: int) -> None:
        while self.pos < end:
            if self._at() == "\\":
                self.pos += 2
            elif self._at() == "$":
                self._dollar()
            else:
                self.pos += 1


def _expansion(token: str) -> tuple[str | None, str | None, bool]:
    """(name, default, computed-name?) of a `$NAME` or `${...}` expansion."""
    if not token.startswith("${"):
        return token[1:], None, False
    body = token[2:-1] if token.endswith("}") else token[2:]
    if body.startswith("!") and len(body) > 1:  # ${!ref} and ${!prefix*}; ${!arr[@]} lists keys
        keys = _ARRAY_KEYS.fullmatch(body)
        return (keys.group(1), None, False) if keys else (None, None, True)
    if body.startswith("#"):  # ${#NAME} is its length
        body = body[1:]
    name = _NAME.match(body)
    if not name:
        return None, None, False
    rest = body[name.end() :]
    if rest.startswith("["):
        rest = rest[rest.find("]") + 1 :] if "]" in rest else ""
    for operator in (":-", ":=", "-", "="):
        if rest.startswith(operator):
            return name.group(), _dequote(rest[len(operator) :]), False
    return name.group(), None, False


def _skip_options(words: list[str], with_value: tuple[str, ...]) -> list[str]:
    while words and words[0].startswith("-"):
        option, words = words[0], words[1:]
        if option in with_value and words:
            words = words[1:]
    return words


def _strip_wrappers(words: list[str]) -> tuple[list[str], set[str]]:
    """The command `env X=1 timeout 5 uv run python ...` really runs, and the names it sets."""
    assigned: set[str] = set()
    while words:
        head = words[0]
        if assignment := _ASSIGNMENT.match(head):
            assigned.add(assignment.group(1))
            words = words[1:]
        elif head in _WRAPPERS:
            words = _skip_options(words[1:], _WRAPPERS[head])
            if head == "timeout":
                words = words[1:]
        elif head in _RUN_TOOLS and words[1:2] == ["run"]:
            words = _skip_options(words[2:], _RUN_TOOLS[head])
        else:
            break
    return words, assigned


def _python_targets(args: list[str]) -> list[tuple[str, str]]:
    """Where `python ARGS` takes its code: a script, or a module (then any `.py` it is handed,
    for launchers like `-m torch.distributed.run train.py`)."""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "-":
            return []
        if not arg.startswith("-"):
            return [("py", arg)]
        if arg.startswith("--"):
            continue
        for j, flag in enumerate(arg[1:], start=2):
            if flag in "cmWX":  # options that take a value, attached or next
                value = arg[j:]
                if not value and i < len(args):
                    value, i = args[i], i + 1
                if flag == "c":
                    return []
                if flag == "m":
                    return [("module", value), *[("py", a) for a in args[i:] if a.endswith(".py")][:1]]
                break
    return []


def _shell_target(args: list[str]) -> list[tuple[str, str]]:
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 1
        elif arg.startswith(("-", "+")):
            if not arg.startswith("--") and "c" in arg:
                return []
        else:
            return [("sh", arg)]
    return []


def _invocation(args: list[str]) -> list[tuple[str, str]]:
    """Alternatives, best first, for the local code a command runs: ("py" | "sh" | "exec" |
    "module", word). "exec" runs a file directly, so its language comes from the file."""
    if not args:
        return []
    head, rest = args[0], args[1:]
    program = head.rsplit("/", 1)[-1]
    if _PYTHON.fullmatch(program):
        return _python_targets(rest)
    if program in _SHELLS:
        return _shell_target(rest)
    if head in ("source", "."):
        return [("sh", rest[0])] if rest else []
    if program in _LAUNCHERS or (program == "accelerate" and rest[:1] == ["launch"]):
        return [("py", arg) for arg in rest if arg.endswith(".py")][:1]
    if "/" in head or head.endswith((".sh", ".bash", ".py")):
        return [("exec", head)]
    return []


def _read_targets(args: list[str]) -> set[str]:
    names, i = set(), 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("-"):
            if arg[-1] in "adinNptu" and i < len(args):  # options that take a value
                if arg[-1] == "a":
                    names.add(args[i])
                i += 1
        else:
            names.add(arg)
    return names


def _is_system_name(name: str) -> bool:
    return name in _SYSTEM_NAMES or name.startswith(_SYSTEM_PREFIXES)


class _ShellScript:
    """What one shell script reads, and the local scripts and Python files it runs.

    A variable the script sets unconditionally before reading it is no knob: a value from
    the environment would be overwritten. `X=${X:-1}` keeps the environment's value, so it
    is one. The same overwriting hides the name from the programs the script starts later.
    """

    def __init__(self, text: str, path: Path, root: Path, rel: str, inherited: frozenset[str]) -> None:
        self.root, self.script_dir = root, path.parent
        self.hits: list[_Hit] = []
        self.dynamic: list[int] = []
        self.targets: list[tuple[Path, str | None, frozenset[str]]] = []
        self._inherited = inherited
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._cwd: Path | None = None  # after `cd`, when it can be followed
        self._dir_vars: dict[str, Path] = {}  # SCRIPT_DIR=$(dirname "$0") and the like
        self._assigned: dict[str, int] = {}  # name -> offset of its first unconditional assignment
        self._excluded: set[str] = set()  # loop, `read` and `local` variables
        lexer = _ShellLexer(text)
        self._walk(lexer.commands)
        for start, end in sorted(lexer.expansions):
            name, default, computed = _expansion(text[start:end])
            line = bisect.bisect_right(self._newlines, start) + 1
            if computed:
                self.dynamic.append(line)
            elif name and self._is_knob(name, start):
                self.hits.append(_Hit(name, "env", default, rel, line))

    def _is_knob(self, name: str, offset: int) -> bool:
        assigned_at = self._assigned.get(name)
        overwritten = name in self._inherited or (assigned_at is not None and assigned_at < offset)
        return not (overwritten or name in self._excluded or _is_system_name(name))

    def _walk(self, commands: list[_Command]) -> None:
        depth = 0  # inside if/case/loops/braces, where an assignment may not run
        for command in sorted(commands, key=lambda c: c.words[0][1]):
            words = list(command.words)
            while words and words[0][0] in _BLOCK_WORDS:
                head = words.pop(0)[0]
                if head in _OPENERS:
                    depth += 1
                elif head in _CLOSERS:
                    depth = max(depth - 1, 0)
            if not words:
                continue
            if words[0][0] in ("for", "select", "case"):
                depth += 1
                if words[0][0] != "case" and len(words) > 1:
                    self._excluded.add(words[1][0])
                continue
            self._command(words, conditional=command.guarded or depth > 0)

    def _command(self, words: list[tuple[str, int]], conditional: bool) -> None:
        prefix = []
        while words and _ASSIGNMENT.match(words[0][0]):
            prefix.append(words.pop(0))
        if not words:  # a bare assignment sets a shell variable
            for raw, offset in prefix:
                self._assign(raw, offset, conditional)
            return
        args = [_dequote(raw) for raw, _ in words]
        if args[0] in _DECLARATIONS:
            for raw, offset in words[1:]:
                assignment = _ASSIGNMENT.match(raw)
                if args[0] == "local" and not raw.startswith("-"):
                    self._excluded.add(assignment.group(1) if assignment else raw)
                elif assignment:
                    self._assign(raw, offset, conditional)
        elif args[0] == "read":
            self._excluded |= _read_targets(args[1:])
        elif args[0] == "cd":
            self._cd(args[1:])
        else:
            args, assigned = _strip_wrappers(args)
            assigned |= {_assignment(raw).group(1) for raw, _ in prefix}
            self._follow(args, words[0][1], assigned)

    def _assign(self, raw: str, offset: int, conditional: bool) -> None:
        assignment = _assignment(raw)
        name, value = assignment.group(1), raw[assignment.end() :]
        if assignment.group(2) or re.search(rf"\$\{{?[#!]?{name}(?!\w)", value):
            return  # `X+=...` and `X=${X:-1}` keep what the environment gave
        plain = _dequote(value)
        if _SCRIPT_DIR.search(plain) and (path := self._expand(plain)):
            if found := self._locate(path, Path.is_dir):
                self._dir_vars[name] = found
        if not conditional:
            self._assigned.setdefault(name, offset)

    def _cd(self, args: list[str]) -> None:
        args = [arg for arg in args if not arg.startswith("-")]
        target = self._expand(args[0]) if args else None
        self._cwd = self._locate(target, Path.is_dir) if target else None

    def _follow(self, args: list[str], offset: int, assigned: set[str]) -> None:
        shadowed = self._inherited | assigned | {n for n, at in self._assigned.items() if at < offset}
        for language, word in _invocation(args):
            if language == "module":
                files, language = self._module(word), "py"
            else:
                text = self._expand(word)
                file = self._locate(text, Path.is_file) if text else None
                files = [file] if file else []
            if files:
                kind = None if language == "exec" else language  # the file's own kind decides
                self.targets += [(file, kind, shadowed) for file in files]
                return

    def _module(self, name: str) -> list[Path]:
        if not _DOTTED.fullmatch(name):
            return []
        for base in dict.fromkeys(b for b in (self._cwd, self.root, self.root / "src") if b):
            found = _find_module(base, name.split("."))
            if found:
                files, end = found
                if end.is_dir() and (end / "__main__.py").is_file():
                    files.append(end / "__main__.py")
                return [file.resolve() for file in files]
        return []

    def _expand(self, word: str) -> str | None:
        """A path word with the script's directory filled in; leading unknown `$VAR/` parts are
        dropped (so `$REPO/train.py` is tried as `train.py`); None if it stays unknown."""
        for name, directory in self._dir_vars.items():
            word = re.sub(rf"\$(?:\{{{name}\}}|{name}(?!\w))", lambda _: directory.as_posix(), word)  # noqa: B023  # re.sub calls it at once
        word = _SCRIPT_DIR.sub(lambda m: self.script_dir.as_posix() + m["sub"], word)
        if "$" in word:
            word = re.sub(r"^.*\$[^/]*/", "", word)
        return word if word and "$" not in word else None

    def _locate(self, word: str, test: Callable[[Path], bool]) -> Path | None:
        """The first of cwd/word, root/word, script_dir/word inside the checkout that passes `test`."""
        if Path(word).is_absolute():
            candidates = [Path(word)]
        else:
            bases = dict.fromkeys(base for base in (self._cwd, self.root, self.script_dir) if base)
            candidates = [base / word for base in bases]
        for candidate in candidates:
            try:
                candidate = candidate.resolve()
            except (OSError, RuntimeError):
                continue
            if candidate.is_relative_to(self.root) and test(candidate):
                return candidate
        return None
