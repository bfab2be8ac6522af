"""Compiling a sample in the parent, its tests instrumented so that we know whether any of them ran.

Why: a harness that trusts an exit status passes tests that never call their checker. Each
`assert c, m` of the test code becomes `assert (<held>() if c else (<failed>() and False)), m`,
and each top-level `check*`/`test*` function starts with a call to a checker hook; the hooks
are placeholder constants the harness replaces in the code objects, not names. Compiling
here also means a syntax error needs no sandbox, and the sandbox needs no parser.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from types import CodeType

from ratiocinator.execeval.samples import Sample

PROGRAM_FILE = "<program>"
TEST_FILE = "<test>"
# What the instrumented tests call: placeholder constants (no name in any namespace), which
# the harness replaces by its hooks in the test's code objects (`sandbox_child._with_hooks`).
ASSERT_HELD = "\0ratiocinator: an assertion held"
ASSERT_FAILED = "\0ratiocinator: an assertion failed"
CHECKER_CALLED = "\0ratiocinator: a checker was called"
CHECKER_PREFIXES = ("check", "test")


def _hook(placeholder: str) -> ast.expr:
    """`(None or "<placeholder>")`: compiles to the placeholder constant, without the "not callable" warning."""
    return ast.BoolOp(op=ast.Or(), values=[ast.Constant(None), ast.Constant(placeholder)])


class _CountAsserts(ast.NodeTransformer):
    """`assert cond, msg` -> `assert (<held>() if cond else (<failed>() and False)), msg`.

    The interpreter itself tests `cond` (once, as before), so no hook decides whether an
    assertion holds: each only counts, the `failed` one whenever it does not.
    """

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.generic_visit(node)
        held = ast.Call(func=_hook(ASSERT_HELD), args=[], keywords=[])
        failed = ast.BoolOp(op=ast.And(), values=[ast.Call(func=_hook(ASSERT_FAILED), args=[], keywords=[]),
                                                  ast.Constant(False)])
        node.test = ast.copy_location(ast.IfExp(test=node.test, body=held, orelse=failed), node.test)
        return node


def instrument_test(source: str) -> tuple[CodeType, list[str]]:
    """Compile test code with counted asserts and announced checkers; returns the code and checker names.

    Checkers are the top-level `def`s whose names start with `check` or `test`; each gets
    a call to the checker hook as its first statement (after any docstring).
    """
    tree = ast.parse(source, TEST_FILE)
    checkers = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name.startswith(CHECKER_PREFIXES):
            checkers.append(stmt.name)
            call = ast.Call(func=_hook(CHECKER_CALLED), args=[ast.Constant(stmt.name)], keywords=[])
            first = stmt.body[0]
            has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str)
            stmt.body.insert(1 if has_docstring else 0, ast.copy_location(ast.Expr(call), first))
    tree = ast.fix_missing_locations(_CountAsserts().visit(tree))
    return compile(tree, TEST_FILE, "exec", dont_inherit=True, optimize=0), checkers


@dataclass(frozen=True)
class _Compiled:
    program: CodeType
    test: CodeType
    checkers: list[str]


@functools.lru_cache(maxsize=512)
def _instrumented(source: str) -> tuple[CodeType, tuple[str, ...]]:
    """`instrument_test`, once per distinct test: many samples (n completions per task) share their tests.

    Code objects are immutable, so sharing one between samples shares nothing they can change.
    """
    code, checkers = instrument_test(source)
    return code, tuple(checkers)


def _compile(sample: Sample) -> _Compiled | tuple[BaseException, str]:
    """Compile in the parent: the child then needs no parser, and a syntax error needs no child."""
    try:
        program = compile(sample.program, PROGRAM_FILE, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return exc, "program"
    try:
        test, checkers = _instrumented(sample.test)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return exc, "test"
    return _Compiled(program, test, list(checkers))
