"""The LLM layer: configuration, providers over the official SDKs, and structured replies.

Importing this package is cheap: the openai and anthropic SDKs load only when a
provider builds its client, because the CLI starts on every command.
"""

from __future__ import annotations

from ratiocinator.llm.config import ENV_VARS, LlmConfig, llm_from_env, looks_like_key
from ratiocinator.llm.providers import (
    AnthropicProvider,
    Completion,
    LlmError,
    LlmUnavailable,
    Message,
    OpenAIProvider,
    Provider,
    SdkProvider,
    call_cost,
    estimate_cost,
    make_provider,
    redact,
    redact_data,
)
from ratiocinator.llm.structured import StructuredResult, ask_structured, json_candidates

__all__ = [
    "ENV_VARS",
    "AnthropicProvider",
    "Completion",
    "LlmConfig",
    "LlmError",
    "LlmUnavailable",
    "Message",
    "OpenAIProvider",
    "Provider",
    "SdkProvider",
    "StructuredResult",
    "ask_structured",
    "call_cost",
    "estimate_cost",
    "json_candidates",
    "llm_from_env",
    "looks_like_key",
    "make_provider",
    "redact",
    "redact_data",
]
