"""Ask an LLM for a validated pydantic object, re-asking with the problem until it fits.

Models wrap JSON in prose or fences, truncate it, or get a field wrong; instead of each
stage coping, `ask_structured` extracts the JSON, validates it (plus any caller check,
such as the planner rejecting unknown knobs), and on failure continues the same
conversation with the exact complaint, a bounded number of times. Every completion is
returned (or attached to the final error) so its cost is accounted for either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from ratiocinator.llm.providers import Completion, LlmError, LlmUnavailable, Message, Provider

M = TypeVar("M", bound=BaseModel)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n(.*?)```", re.DOTALL)
_MAX_LISTED = 20  # validation problems quoted back to the model
_TRUNCATED = {"length", "max_tokens"}


@dataclass(frozen=True)
class StructuredResult(Generic[M]):
    """The validated object and every completion it took (first try plus re-asks)."""

    value: M
    completions: list[Completion] = field(default_factory=list)

    @property
    def cost_dollars(self) -> float:
        return sum(c.cost_dollars for c in self.completions)


def json_instructions(schema: type[BaseModel]) -> str:
    """The system-prompt suffix asking for JSON only, with the schema to match."""
    return (
        "Reply with one JSON object and nothing else: no prose, no Markdown code fences. "
        "It must validate against this JSON Schema:\n" + json.dumps(schema.model_json_schema(), indent=2)
    )


def json_candidates(text: str) -> list[dict[str, Any]]:
    """JSON objects in a reply, most likely first: the whole reply, fenced blocks, then outermost objects in prose."""
    found: list[dict[str, Any]] = []

    def keep(obj: object) -> None:
        if isinstance(obj, dict) and obj not in found:
            found.append(obj)

    for chunk in [text.strip()] + [m.group(2).strip() for m in _FENCE.finditer(text)]:
        try:
            keep(json.loads(chunk))
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        keep(obj)
        pos = text.find("{", end)  # skip what this object contains: only outermost objects count
    return found


def _parse_problem(text: str) -> str | None:
    """Why the reply's first JSON-looking text does not parse, or None when it does."""
    start = text.find("{")
    if start == -1:
        return "Your reply contains no JSON object; the answer must be a single {...} object."
    try:
        json.JSONDecoder().raw_decode(text, start)
    except ValueError as exc:
        return f"Your reply is not valid JSON: {exc}."
    return None


def _validation_problem(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False)[:_MAX_LISTED]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = f" (got {json.dumps(got)[:80]})" if isinstance(got, (str, int, float, bool)) or got is None else ""
        lines.append(f"- {where}: {err['msg']}{shown}")
    more = exc.error_count() - _MAX_LISTED
    if more > 0:
        lines.append(f"- ... and {more} more")
    return "Your JSON does not match the schema:\n" + "\n".join(lines)


def ask_structured(
    provider: Provider,
    *,
    system: str | None,
    user: str,
    schema: type[M],
    max_attempts: int = 3,
    check: Callable[[M], list[str]] | None = None,
    max_tokens: int | None = None,
) -> StructuredResult[M]:
    """Ask until the reply is a valid `schema` instance that `check` finds no problems with.

    `check` returns problems (empty when fine) that go back to the model verbatim, like
    validation errors. After `max_attempts` replies the last problem is raised as an
    `LlmError` carrying all completions. `LlmUnavailable` from the provider propagates
    (so the research loop can pause) with the completions made before it attached.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    full_system = f"{system.rstrip()}\n\n{json_instructions(schema)}" if system else json_instructions(schema)
    messages = [Message("user", user)]
    completions: list[Completion] = []
    problem = ""
    for _ in range(max_attempts):
        try:
            completion = provider.complete(messages, system=full_system, max_tokens=max_tokens)
        except LlmUnavailable as exc:
            exc.completions[:0] = completions  # the replies already paid for stay accountable
            raise
        completions.append(completion)
        value, problem = _judge(completion.text, schema, check)
        if value is not None:
            return StructuredResult(value=value, completions=completions)
        if completion.finish_reason in _TRUNCATED:
            problem = "Your reply was cut off at the output token limit; keep it shorter. " + problem
        messages += [
            Message("assistant", completion.text),
            Message("user", f"{problem}\n\nReply again with only the corrected JSON object."),
        ]
    config = provider.config
    raise LlmError(
        f"{config.provider} model '{config.model}' gave no acceptable {schema.__name__} in {max_attempts} "
        f"attempt{'s' if max_attempts != 1 else ''}; last problem: {problem}",
        hint="a stronger model, a larger llm.max_tokens or a simpler request may help",
        provider=config.provider, model=config.model, attempts=len(completions), completions=completions,
    )


def _judge(text: str, schema: type[M], check: Callable[[M], list[str]] | None) -> tuple[M | None, str]:
    """The first candidate that validates, and the problem to feed back when none is acceptable."""
    candidates = json_candidates(text)
    broken = _parse_problem(text)
    if not candidates:
        return None, broken or "Your reply contains no JSON object; the answer must be a single {...} object."
    errors: list[ValidationError] = []
    for candidate in candidates:
        try:
            value = schema.model_validate(candidate)
        except ValidationError as exc:
            errors.append(exc)
            continue
        problems = list(check(value)) if check else []
        if problems:
            return None, "Your JSON is well-formed but was rejected:\n" + "\n".join(f"- {p}" for p in problems)
        return value, ""
    if broken:  # the objects that did parse are fragments of the broken one: lead with the syntax error
        return None, f"{broken}\n(The parts that do parse do not match the schema either.)"
    return None, _validation_problem(errors[0])
