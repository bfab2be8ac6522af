"""The optional LLM code review, kept honest: every checkable claim is checked first.

A model reads the runner's code and says whether it is ready, listing claims. Claims a
machine can decide (a syntax error at a line, a missing file, a missing function, a
placeholder) are verified against the checkout before anything is merged; a refuted
claim is dropped and shown as refuted, so a reviewer that "sees" a syntax error in
valid code (as the seed reviewer did) cannot block a study. Claims nobody can decide
mechanically are kept as the model's opinion: shown as warnings, never as failures.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ratiocinator.check.static import placeholders
from ratiocinator.llm.providers import Completion, Provider
from ratiocinator.llm.structured import ask_structured

MAX_FILE_CHARS = 20_000
MAX_PROMPT_CHARS = 120_000
NEAR_LINES = 2

SYSTEM = """You review machine-learning experiment code before money is spent running it.
Decide whether the code is ready to run as-is and report concrete, checkable problems.
For each problem give one claim with its kind:
- "syntax_error": a line that does not parse (give file and line);
- "missing_file": a file the code needs that is not in the repository (give the path in file);
- "missing_function": a function, class or name that is used but defined nowhere (give name, and file if known);
- "placeholder": unfinished code such as a stub body or code "omitted for brevity" (give file and line);
- "other": anything else (a logic or methodology problem), described precisely.
Only claim what you can point to in the code shown. Answer with JSON only."""


class Claim(BaseModel):
    kind: Literal["syntax_error", "missing_file", "missing_function", "placeholder", "other"]
    description: str = Field(min_length=1)
    file: str | None = None
    line: int | None = None
    name: str | None = None


class LlmReview(BaseModel):
    is_code_ready: bool
    code_issue: str = ""
    claims: list[Claim] = []


Verdict = Literal["confirmed", "refuted", "unverifiable"]


@dataclass(frozen=True)
class CheckedClaim:
    claim: Claim
    verdict: Verdict
    evidence: str

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "evidence": self.evidence, **self.claim.model_dump()}


@dataclass(frozen=True)
class ReviewOutcome:
    model_ready: bool
    model_issue: str
    claims: tuple[CheckedClaim, ...]
    completions: tuple[Completion, ...]

    @property
    def confirmed(self) -> list[CheckedClaim]:
        return [c for c in self.claims if c.verdict == "confirmed"]

    @property
    def refuted(self) -> list[CheckedClaim]:
        return [c for c in self.claims if c.verdict == "refuted"]

    @property
    def opinions(self) -> list[CheckedClaim]:
        return [c for c in self.claims if c.verdict == "unverifiable"]

    @property
    def cost_dollars(self) -> float:
        return sum(c.cost_dollars for c in self.completions)


def review_prompt(topic: str, goal: str, runner: str, checkout: Path, files: Sequence[str]) -> str:
    """The code the runner reaches, numbered so claims can name lines, within a size cap."""
    parts = [f"Study topic: {topic}\nGoal metric: {goal}\nRunner script: {runner}\n",
             "Files the runner reaches (line numbers added):"]
    used = sum(len(p) for p in parts)
    for rel in dict.fromkeys([runner, *files]):
        try:
            text = (checkout / rel).read_text(errors="replace")
        except OSError:
            continue
        if len(text) > MAX_FILE_CHARS:
            text = text[:MAX_FILE_CHARS] + "\n[... file truncated for the review ...]"
        numbered = "\n".join(f"{i:5d}  {line}" for i, line in enumerate(text.splitlines(), 1))
        block = f"\n=== {rel} ===\n{numbered}\n"
        if used + len(block) > MAX_PROMPT_CHARS:
            parts.append(f"\n=== {rel} === (not shown: the review's size limit was reached)")
            continue
        parts.append(block)
        used += len(block)
    return "".join(parts)


def run_review(provider: Provider, *, topic: str, goal: str, runner: str, checkout: Path,
               files: Sequence[str]) -> ReviewOutcome:
    """Ask the model, then verify each of its claims against the checkout."""
    result = ask_structured(provider, system=SYSTEM, user=review_prompt(topic, goal, runner, checkout, files),
                            schema=LlmReview)
    review: LlmReview = result.value
    checked = tuple(verify_claim(c, checkout, [runner, *files]) for c in review.claims)
    return ReviewOutcome(review.is_code_ready, review.code_issue, checked, tuple(result.completions))


def verify_claim(claim: Claim, checkout: Path, files: Sequence[str]) -> CheckedClaim:
    if claim.kind == "syntax_error":
        return _verify_syntax(claim, checkout)
    if claim.kind == "missing_file":
        return _verify_missing_file(claim, checkout)
    if claim.kind == "missing_function":
        return _verify_missing_name(claim, checkout, files)
    if claim.kind == "placeholder":
        return _verify_placeholder(claim, checkout)
    return CheckedClaim(claim, "unverifiable", "not mechanically checkable; the model's opinion")


def _inside(checkout: Path, rel: str | None) -> Path | None:
    if not rel:
        return None
    path = (checkout / rel.lstrip("/")).resolve()
    root = checkout.resolve()
    return path if path == root or root in path.parents else None


def _verify_syntax(claim: Claim, checkout: Path) -> CheckedClaim:
    path = _inside(checkout, claim.file)
    if path is None or not path.is_file():
        return CheckedClaim(claim, "refuted", f"there is no file {claim.file!r} in the checkout")
    try:
        compile(path.read_bytes(), str(claim.file), "exec", dont_inherit=True)
    except SyntaxError as exc:
        return CheckedClaim(claim, "confirmed", f"{claim.file}:{exc.lineno}: {exc.msg} (the compiler agrees)")
    except ValueError as exc:  # NUL bytes
        return CheckedClaim(claim, "confirmed", f"{claim.file}: {exc}")
    return CheckedClaim(claim, "refuted", f"{claim.file} compiles without error")


def _verify_missing_file(claim: Claim, checkout: Path) -> CheckedClaim:
    target = claim.file or claim.name
    path = _inside(checkout, target)
    if path is None:
        return CheckedClaim(claim, "unverifiable", f"{target!r} is outside the repository")
    if path.exists():
        return CheckedClaim(claim, "refuted", f"{target} exists in the checkout")
    return CheckedClaim(claim, "confirmed", f"{target} does not exist in the checkout")


def _verify_missing_name(claim: Claim, checkout: Path, files: Sequence[str]) -> CheckedClaim:
    name = (claim.name or "").rsplit(".", 1)[-1].strip("()")
    if not name.isidentifier():
        return CheckedClaim(claim, "unverifiable", "the claim names no identifier to look for")
    scope = [claim.file] if claim.file and _inside(checkout, claim.file) else list(files)
    for rel in scope:
        path = _inside(checkout, rel)
        if path is None or not path.is_file() or path.suffix != ".py":
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        line = _defines(tree, name)
        if line is not None:
            return CheckedClaim(claim, "refuted", f"{name} is defined at {rel}:{line}")
    where = claim.file if len(scope) == 1 else f"the {len(scope)} Python files the runner reaches"
    return CheckedClaim(claim, "confirmed", f"no definition or import of {name} in {where}")


def _defines(tree: ast.Module, name: str) -> int | None:
    """The line where ``name`` is bound by a def, class, assignment or import, if anywhere."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node.lineno
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name or alias.name == "*":
                    return node.lineno
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
            return node.lineno
    return None


def _verify_placeholder(claim: Claim, checkout: Path) -> CheckedClaim:
    path = _inside(checkout, claim.file)
    if path is None or not path.is_file():
        return CheckedClaim(claim, "refuted", f"there is no file {claim.file!r} in the checkout")
    found = placeholders(checkout, [str(path.relative_to(checkout.resolve()))])
    near = [f for f in found if claim.line is None or (f.line is not None and abs(f.line - claim.line) <= NEAR_LINES)]
    if near:
        return CheckedClaim(claim, "confirmed", f"{near[0].where()}: {near[0].message}")
    return CheckedClaim(claim, "refuted",
                        f"no placeholder in {claim.file}" + (f" near line {claim.line}" if claim.line else ""))
