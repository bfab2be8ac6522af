"""Hypotheses as data: what a study expects, in a form the ledger can judge.

A spec's ``hypotheses:`` (or the LLM design stage) states each hypothesis as an id, one
sentence, and an ``expect`` the analysis can test. The form of ``expect`` is told apart
by its keys:

- ``{arm: SEL, beats: SEL}`` — one arm (or factor level) beats another on the goal, or on
  ``metric``. A selector is an arm name, ``baseline``, or a mapping of knob values; a
  mapping that names only some factors pools every arm at those levels.
- ``{factor: F}`` — the factor has an effect; with ``best: LEVEL``, that level is best.
- ``{interaction: [A, B]}`` — the effect of A depends on B.
- ``{metric: A, above: B}`` or ``{metric: A, below: B}`` — a metric every run reports is
  above (below) another of the same runs, e.g. ``val_r2`` above ``ridge_val_r2``.
- ``{gap: [A, B], grows_with: F}`` — the per-run gap A − B grows from F's first level to
  its last (train vs validation: overfitting).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

Scalar = str | int | float | bool
# An arm: its name, the word ``baseline``, or knob values (a subset of the factors pools arms).
Selector = str | dict[str, Scalar]

HYPOTHESIS_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,15}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Beats(_Strict):
    arm: Selector
    beats: Selector
    metric: str | None = Field(None, description="default: the goal metric")
    maximize: bool | None = Field(None, description="which way is better; default: the goal's direction")


class FactorEffect(_Strict):
    factor: str
    best: Scalar | None = Field(None, description="the level expected to be best")
    metric: str | None = None


class Interaction(_Strict):
    interaction: tuple[str, str]
    metric: str | None = None


class MetricOrder(_Strict):
    metric: str
    above: str | None = None
    below: str | None = None
    arm: Selector | None = Field(None, description="only these arms; default: every arm")

    @model_validator(mode="after")
    def _one_side(self) -> MetricOrder:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of above: METRIC or below: METRIC")
        return self

    @property
    def other(self) -> str:
        return self.above or self.below or ""


class GapGrows(_Strict):
    gap: tuple[str, str] = Field(description="[A, B]: the per-run gap A − B")
    grows_with: str


_KINDS: dict[str, tuple[str, ...]] = {
    "beats": ("beats",),
    "gap": ("gap", "grows_with"),
    "interaction": ("interaction",),
    "order": ("above", "below"),
    "effect": ("factor",),
}


_MODELS: dict[type[BaseModel], str] = {Beats: "beats", GapGrows: "gap", Interaction: "interaction",
                                      MetricOrder: "order", FactorEffect: "effect"}


def expect_kind(value: Any) -> str | None:
    """Which form of ``expect`` a value is: by its model, or a mapping by its keys (None: no form)."""
    if isinstance(value, BaseModel):
        return _MODELS.get(type(value))
    keys = set(value) if isinstance(value, dict) else set()
    return next((kind for kind, markers in _KINDS.items() if keys & set(markers)), None)


Expect = Annotated[
    Annotated[Beats, Tag("beats")] | Annotated[FactorEffect, Tag("effect")]
    | Annotated[Interaction, Tag("interaction")] | Annotated[MetricOrder, Tag("order")]
    | Annotated[GapGrows, Tag("gap")],
    Discriminator(
        expect_kind,
        custom_error_type="expect_form",
        custom_error_message="expect needs one of: {arm, beats}, {factor[, best]}, {interaction: [A, B]},"
                             " {metric, above|below}, {gap: [A, B], grows_with}",
    ),
]


class Hypothesis(_Strict):
    id: str
    statement: str = Field(min_length=1)
    expect: Expect

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not HYPOTHESIS_ID.fullmatch(value):
            raise ValueError("an id is a short label such as H1 (letters, digits, _.-; at most 16 characters)")
        return value


def check_hypotheses(hypotheses: list[Hypothesis], factors: dict[str, list[Scalar]],
                     arm_names: list[str]) -> None:
    """Cross-checks against the design: unique ids, factors that exist, levels the factor has."""
    seen: set[str] = set()
    for h in hypotheses:
        if h.id in seen:
            raise ValueError(f"hypothesis id {h.id} is used twice")
        seen.add(h.id)
        named = _factors_named(h.expect)
        if named and not factors:
            raise ValueError(f"hypothesis {h.id} names factor {named[0]}, but the spec has no factors")
        for name in named:
            if name not in factors:
                raise ValueError(f"hypothesis {h.id}: {name} is not a factor (factors: {', '.join(factors)})")
        e = h.expect
        if isinstance(e, FactorEffect) and e.best is not None:
            levels = [_text(v) for v in factors[e.factor]]
            if _text(e.best) not in levels:
                raise ValueError(f"hypothesis {h.id}: {e.factor}={_text(e.best)} is not one of its levels {levels}")
        if isinstance(e, Interaction) and e.interaction[0] == e.interaction[1]:
            raise ValueError(f"hypothesis {h.id}: an interaction needs two different factors")
        for sel in _selectors(e):
            if isinstance(sel, str) and sel != "baseline" and arm_names and sel not in arm_names:
                raise ValueError(f"hypothesis {h.id}: there is no arm {sel} (arms: {', '.join(arm_names)})")


def _factors_named(e: object) -> list[str]:
    if isinstance(e, FactorEffect):
        return [e.factor]
    if isinstance(e, Interaction):
        return list(e.interaction)
    if isinstance(e, GapGrows):
        return [e.grows_with]
    return []


def _selectors(e: object) -> list[Selector]:
    if isinstance(e, Beats):
        return [e.arm, e.beats]
    if isinstance(e, MetricOrder) and e.arm is not None:
        return [e.arm]
    return []


def _text(value: Scalar) -> str:
    """A level as the runner sees it (the spec's ``scalar_to_env``: booleans keep their YAML spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


level_text = _text
