"""LLM providers: messages in, one fully described `Completion` out.

Every stage that asks an LLM something (readiness review, arm planning, next-iteration
decisions, paper prose) goes through `Provider.complete`, so this is where three
policies live once:

* retries are ours, not the SDK's (the SDK gets ``max_retries=0``): timeouts,
  connection errors, 408, 429 and 5xx back off exponentially (Retry-After wins,
  capped) up to ``max_retries``; then `LlmUnavailable`, on which the research loop
  pauses resumably. Other HTTP errors raise `LlmError` at once;
* the API key never leaves the SDK client: not in a message, a repr, a log line or a
  `Completion`. Every error text passes through `redact`, and errors are raised
  outside the SDK's exception context so no chained traceback can show its request
  headers;
* a `Completion` carries what a ledger needs to record and replay the call: the exact
  request body, the raw response JSON, tokens, cost, latency and attempts.

The SDKs are imported when a client is first built, not with this module: importing
them costs the CLI a second or more at startup.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal

from ratiocinator.errors import RatiocinatorError
from ratiocinator.extras import require
from ratiocinator.llm.config import LlmConfig

log = logging.getLogger("ratiocinator.llm")

NO_KEY = "not-needed"  # the SDKs insist on some key; local servers ignore it
REDACTED = "[REDACTED]"
MAX_WAIT_S = 60.0  # longest single wait between attempts, Retry-After included
CHARS_PER_TOKEN = 4  # rough input-size estimate used before a call
_DETAIL_CHARS = 300


class _LlmProblem(RatiocinatorError):
    """What both LLM errors carry, so a caller can report or record them without parsing."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        status: int | None = None,
        attempts: int = 0,
        completions: Iterable[Completion] = (),
    ) -> None:
        super().__init__(message, hint=hint)
        self.provider = provider
        self.model = model
        self.status = status
        self.attempts = attempts
        # Calls that were made (and paid for) before the failure, e.g. rejected structured replies.
        self.completions = list(completions)


class LlmError(_LlmProblem):
    """The LLM call cannot succeed as configured (bad key, model, request or replies); retrying will not help."""


class LlmUnavailable(_LlmProblem):
    """The LLM stayed unreachable, overloaded or rate-limited through every retry; try again later."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every occurrence of each secret replaced by [REDACTED]."""
    for secret in secrets:
        if secret and secret != NO_KEY:
            text = text.replace(secret, REDACTED)
    return text


def redact_data(data: Any, secrets: Iterable[str | None]) -> Any:
    """A copy of JSON-like `data` with secrets redacted from every string in it."""
    secrets = tuple(secrets)
    if isinstance(data, str):
        return redact(data, secrets)
    if isinstance(data, Mapping):
        return {redact(str(k), secrets): redact_data(v, secrets) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_data(v, secrets) for v in data]
    return data


@dataclass(frozen=True)
class Message:
    """One conversation turn; the system prompt is passed separately to `complete`."""

    role: Literal["user", "assistant"]
    content: str

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"message role must be 'user' or 'assistant', got {self.role!r}; pass a system prompt as"
                             " system=")


@dataclass(frozen=True)
class Completion:
    """One finished LLM call, complete enough to record in a ledger and replay.

    `request` is the exact JSON body sent (no headers, so no key); `response` is the raw
    JSON received, or for a streamed call the accumulated reply in the non-streaming
    shape. `latency_s` is the successful attempt's duration; `attempts` counts all tries.
    """

    provider: str
    model: str
    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    latency_s: float
    cost_dollars: float
    request: dict[str, Any]
    response: dict[str, Any]
    attempts: int


def call_cost(config: LlmConfig, input_tokens: int, output_tokens: int) -> float:
    """Dollars for one call at the configured per-million-token prices."""
    return input_tokens * config.price_in_per_mtok / 1e6 + output_tokens * config.price_out_per_mtok / 1e6


def estimate_cost(config: LlmConfig, prompt_chars: int, max_output_tokens: int | None = None) -> float:
    """Worst-case dollars for a call before making it, so a budget can reserve first.

    Input is estimated at ~4 characters per token; output is charged at the full
    token cap (`max_output_tokens`, else the config's `max_tokens`).
    """
    input_tokens = math.ceil(max(prompt_chars, 0) / CHARS_PER_TOKEN)
    return call_cost(config, input_tokens, max_output_tokens or config.max_tokens)


class Provider(ABC):
    """The one call every LLM stage makes.

    A recording or replaying provider wraps or replaces this interface: `complete`
    returns everything a ledger row needs, and `config` carries the prices.
    """

    config: LlmConfig

    @abstractmethod
    def complete(
        self,
        messages: list[Message],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        stream: bool = False,
    ) -> Completion:
        """Send the conversation and return the model's reply with its cost and provenance."""


@dataclass(frozen=True)
class _Reply:
    """What a single successful HTTP exchange yielded, before cost and timing are added."""

    model: str
    text: str
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    response: dict[str, Any]


@dataclass(frozen=True)
class _Failure:
    """A failed attempt, reduced to plain (already redacted) facts: nothing of the SDK's survives."""

    retryable: bool
    status: int | None
    detail: str
    retry_after: float | None = None


class SdkProvider(Provider):
    """Shared request loop for the official SDKs: retries, redaction, timing and cost."""

    name: ClassVar[str]

    def __init__(
        self,
        config: LlmConfig,
        *,
        api_key: str | None,
        key_env: str | None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if config.provider != self.name:
            raise ValueError(f"{type(self).__name__} needs provider '{self.name}', the config says '{config.provider}'")
        self.config = config
        self._api_key = api_key
        self._key_env = key_env
        self._sleep = sleep
        self._client: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.config.model!r}, base_url={self.config.endpoint!r})"

    @property
    def _secrets(self) -> tuple[str, ...]:
        return (self._api_key,) if self._api_key else ()

    def _sdk_key(self) -> str:
        return self._api_key or NO_KEY

    def complete(
        self,
        messages: list[Message],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        stream: bool = False,
    ) -> Completion:
        request = self.build_request(messages, system=system, max_tokens=max_tokens, stream=stream)
        client = self._sdk()  # built (and the SDK imported) once, outside the timed attempts
        attempts = 0
        while True:
            attempts += 1
            started = time.monotonic()
            failure: _Failure | None = None
            try:
                reply = self._send(client, request)
            except Exception as exc:  # noqa: BLE001 - reduced to a _Failure or re-raised below
                failure = self._failure(exc)
                if failure is None:
                    raise
            # Raised here, outside the except block, so the SDK exception (whose request
            # object holds the auth header) is not chained onto ours.
            if failure is None:
                return self._completion(request, reply, attempts, time.monotonic() - started)
            if not failure.retryable:
                raise self._fatal(failure, attempts)
            if attempts > self.config.max_retries:
                raise self._unavailable(failure, attempts)
            wait = self._wait_s(attempts, failure.retry_after)
            log.warning(
                "LLM %s/%s: %s; retry %d of %d in %.1fs",
                self.name, self.config.model, failure.detail, attempts, self.config.max_retries, wait,
            )
            self._sleep(wait)

    def build_request(
        self, messages: list[Message], *, system: str | None = None, max_tokens: int | None = None, stream: bool = False
    ) -> dict[str, Any]:
        """The exact JSON body `complete` sends: a replay can key recorded calls on it."""
        if not messages:
            raise ValueError("complete() needs at least one message")
        return self._body(messages, system, max_tokens or self.config.max_tokens, stream)

    def _wait_s(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_WAIT_S)
        return min(self.config.backoff_s * 2 ** (attempt - 1), MAX_WAIT_S)

    def _completion(self, request: dict[str, Any], reply: _Reply, attempts: int, latency_s: float) -> Completion:
        input_tokens, output_tokens = reply.input_tokens, reply.output_tokens
        if input_tokens is None or output_tokens is None:
            log.warning(
                "LLM %s/%s: the server reported no token usage; estimating from text length", self.name,
                self.config.model
            )
            if input_tokens is None:
                input_tokens = math.ceil(len(json.dumps(request)) / CHARS_PER_TOKEN)
            if output_tokens is None:
                output_tokens = math.ceil(len(reply.text) / CHARS_PER_TOKEN)
        return Completion(
            provider=self.name,
            model=reply.model or self.config.model,
            text=redact(reply.text, self._secrets),
            finish_reason=reply.finish_reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_s=latency_s,
            cost_dollars=call_cost(self.config, input_tokens, output_tokens),
            request=redact_data(request, self._secrets),
            response=redact_data(reply.response, self._secrets),
            attempts=attempts,
        )

    def _where(self) -> str:
        return f"{self.name} model '{self.config.model}' at {self.config.endpoint}"

    def _unavailable(self, failure: _Failure, attempts: int) -> LlmUnavailable:
        status = f"HTTP {failure.status}" if failure.status else "no usable reply"
        return LlmUnavailable(
            f"{self._where()} is unavailable ({status}) after {attempts} attempt{'s' if attempts != 1 else ''}:"
            f" {failure.detail}",
            hint="the research loop pauses here and resumes later; check the server or the provider's status page, "
            "or raise llm.max_retries / llm.timeout_s",
            provider=self.name, model=self.config.model, status=failure.status, attempts=attempts,
        )

    def _fatal(self, failure: _Failure, attempts: int) -> LlmError:
        status = failure.status
        env = self._key_env
        if status == 401:
            what = "rejected the API key (HTTP 401)"
            if self._api_key:
                hint = f"check the key in ${env}"
            elif env:
                hint = f"no key was sent because ${env} is not set; export it"
            else:
                hint = ("no key was sent: with a custom base_url set llm.api_key_env to the variable holding this"
                        " server's key")
        elif status == 403:
            what = "refused access (HTTP 403)"
            hint = (
                f"check that the key in ${env} may use model '{self.config.model}'" if env
                else "check the server's access rules"
            )
        elif status == 404:
            what = "does not know the endpoint or model (HTTP 404)"
            hint = "check llm.model and llm.base_url" + (
                " (OpenAI-compatible servers usually end in /v1)" if self.name == "openai" else " (no /v1 at the end)"
            )
        elif status is not None:
            what = f"rejected the request (HTTP {status})"
            hint = "check llm.model, llm.max_tokens and llm.temperature against what this server accepts"
        else:
            what = "failed"
            hint = "check llm.provider, llm.model and llm.base_url"
        return LlmError(
            f"{self._where()} {what}: {failure.detail}",
            hint=hint, provider=self.name, model=self.config.model, status=status, attempts=attempts,
        )

    def _failure(self, exc: Exception) -> _Failure | None:
        """Classify an SDK exception; None for anything that is not the SDK's (a bug to surface as is)."""
        kind = self._kind(exc)
        if kind is None:
            return None
        if kind == "timeout":
            return _Failure(True, None, f"no reply within {self.config.timeout_s:g}s (timeout)")
        if kind == "connection":
            cause = exc.__cause__ or exc.__context__
            reason = f": {cause}" if cause and str(cause) else ""
            return _Failure(True, None, redact(f"cannot connect to {self.config.endpoint}{reason}", self._secrets))
        if kind == "status":
            status = int(getattr(exc, "status_code", 0) or 0)
            detail = redact(_error_detail(getattr(exc, "body", None), str(exc)), self._secrets)
            response = getattr(exc, "response", None)
            headers = getattr(response, "headers", None) or {}
            if status < 400:  # an error event in the middle of a 200 stream: the server failed mid-reply
                return _Failure(True, None, f"error during the streamed reply: {detail}")
            retryable = status in (408, 429) or status >= 500
            return _Failure(retryable, status, detail, _retry_after(headers) if retryable else None)
        # Any other SDK error: a non-HTTP API error mid-stream is the server's failure; the rest are ours.
        detail = redact(_error_detail(getattr(exc, "body", None), str(exc)), self._secrets)
        return _Failure(kind == "api", None, detail)

    # Provider-specific parts.

    @abstractmethod
    def _body(self, messages: list[Message], system: str | None, max_tokens: int, stream: bool) -> dict[str, Any]:
        """The wire-format request body."""

    @abstractmethod
    def _sdk(self) -> Any:
        """The SDK client, built on first use with the SDK's own retries off."""

    @abstractmethod
    def _send(self, client: Any, request: dict[str, Any]) -> _Reply:
        """One HTTP exchange through the SDK, raising the SDK's exceptions."""

    @abstractmethod
    def _kind(self, exc: Exception) -> str | None:
        """'timeout', 'connection', 'status', 'api' (other API error), 'sdk' (other SDK error) or None."""


def _error_detail(body: object, fallback: str) -> str:
    """The server's own error message (OpenAI and Anthropic shapes), shortened."""
    message: object = None
    if isinstance(body, Mapping):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, Mapping) else body.get("message") or inner
    text = str(message) if message else fallback
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, or Retry-After as seconds or an HTTP date."""
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return float(millis) / 1000
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


class OpenAIProvider(SdkProvider):
    """Any OpenAI-compatible chat-completions server: OpenAI, vLLM, Ollama, llama.cpp, LM Studio, OpenRouter."""

    name = "openai"

    def _sdk(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                api_key=self._sdk_key(), base_url=self.config.endpoint, timeout=self.config.timeout_s, max_retries=0
            )
        return self._client

    def _body(self, messages: list[Message], system: str | None, max_tokens: int, stream: bool) -> dict[str, Any]:
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": m.content} for m in messages
        ]
        # OpenAI's own API wants max_completion_tokens (its reasoning models reject max_tokens);
        # compatible servers (vLLM, Ollama, llama.cpp, ...) all understand max_tokens.
        cap = "max_completion_tokens" if self.config.official else "max_tokens"
        body: dict[str, Any] = {"model": self.config.model, "messages": turns, cap: max_tokens}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _send(self, client: Any, request: dict[str, Any]) -> _Reply:
        if request.get("stream"):
            return self._send_streaming(client, request)
        raw = client.chat.completions.with_raw_response.create(**request)
        data = json.loads(raw.text)
        completion = raw.parse()
        if not completion.choices:
            return _Reply(completion.model, "", None, *_openai_usage(completion.usage), data)
        choice = completion.choices[0]
        text = choice.message.content or ""
        return _Reply(completion.model, text, choice.finish_reason, *_openai_usage(completion.usage), data)

    def _send_streaming(self, client: Any, request: dict[str, Any]) -> _Reply:
        parts: list[str] = []
        finish: str | None = None
        usage: Any = None
        head: dict[str, Any] = {}
        with client.chat.completions.create(**request) as chunks:
            for chunk in chunks:
                head = head or {"id": chunk.id, "created": chunk.created}
                head["model"] = chunk.model or head.get("model")
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.delta is not None and choice.delta.content:
                        parts.append(choice.delta.content)
                    finish = choice.finish_reason or finish
        text = "".join(parts)
        model = head.get("model") or self.config.model
        # The accumulated reply, shaped like a non-streaming chat.completion.
        response = {
            "id": head.get("id"),
            "object": "chat.completion",
            "created": head.get("created"),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage.to_dict(mode="json") if usage is not None else None,
        }
        return _Reply(model, text, finish, *_openai_usage(usage), response)

    def _kind(self, exc: Exception) -> str | None:
        import openai

        return _sdk_error_kind(exc, openai, openai.OpenAIError)


def _openai_usage(usage: Any) -> tuple[int | None, int | None]:
    if usage is None:
        return None, None
    return usage.prompt_tokens, usage.completion_tokens


class AnthropicProvider(SdkProvider):
    """Anthropic's Messages API (or a server speaking it at `base_url`)."""

    name = "anthropic"
    # Keys the SDK takes as arguments; anything else in the body (temperature, which this
    # SDK no longer lists) travels as extra_body, so the body sent is exactly `request`.
    _ARGS = ("model", "max_tokens", "messages", "system")

    def _sdk(self) -> Any:
        if self._client is None:
            import anthropic

            self._client = anthropic.Anthropic(
                api_key=self._sdk_key(), base_url=self.config.endpoint, timeout=self.config.timeout_s, max_retries=0
            )
        return self._client

    def _body(self, messages: list[Message], system: str | None, max_tokens: int, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": max_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }
        if system:
            body["system"] = system
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if stream:
            body["stream"] = True
        return body

    def _send(self, client: Any, request: dict[str, Any]) -> _Reply:
        args = {k: v for k, v in request.items() if k in self._ARGS}
        extra = {k: v for k, v in request.items() if k not in self._ARGS and k != "stream"} or None
        if request.get("stream"):
            with client.messages.stream(**args, extra_body=extra) as events:
                for _ in events:
                    pass
                message = events.get_final_message()
            data = message.to_dict(mode="json")
        else:
            raw = client.messages.with_raw_response.create(**args, extra_body=extra)
            data = raw.json()
            message = raw.parse()
        text = "".join(block.text for block in message.content if block.type == "text")
        usage = message.usage
        input_tokens = None
        if usage is not None and usage.input_tokens is not None:
            # Cache writes and reads are input too, and billed; count them so cost errs high, not low.
            written = getattr(usage, "cache_creation_input_tokens", None) or 0
            read = getattr(usage, "cache_read_input_tokens", None) or 0
            input_tokens = usage.input_tokens + written + read
        output_tokens = usage.output_tokens if usage is not None else None
        return _Reply(message.model, text, message.stop_reason, input_tokens, output_tokens, data)

    def _kind(self, exc: Exception) -> str | None:
        import anthropic

        return _sdk_error_kind(exc, anthropic, anthropic.AnthropicError)


def _sdk_error_kind(exc: Exception, sdk: Any, base: type[Exception]) -> str | None:
    """Both SDKs share one exception hierarchy shape; the most specific class decides."""
    for cls, kind in ((sdk.APITimeoutError, "timeout"), (sdk.APIConnectionError, "connection"),
                      (sdk.APIStatusError, "status"), (sdk.APIError, "api"), (base, "sdk")):
        if isinstance(exc, cls):
            return kind
    return None


_PROVIDERS: dict[str, type[SdkProvider]] = {"openai": OpenAIProvider, "anthropic": AnthropicProvider}


def require_sdk(config: LlmConfig) -> None:
    """The provider's official SDK (the ``llm`` extra) is installed, or a `MissingExtra` saying so."""
    require(config.provider, extra="llm", purpose=f"the {config.provider} LLM provider (model '{config.model}')")


def make_provider(config: LlmConfig, environ: Mapping[str, str] = os.environ) -> Provider:
    """The provider for `config`, with its key read from the variable the config names.

    A missing key is an error for the official endpoints; with a custom base_url (a
    local server usually needs none) the SDK gets a placeholder instead, and a 401
    then says which variable to set.
    """
    require_sdk(config)
    key_env = config.key_env
    api_key = (environ.get(key_env) or "").strip() if key_env else ""
    if not api_key and config.official:
        raise LlmError(
            f"no API key for {config.provider} model '{config.model}': the environment variable {key_env} is not set",
            hint=f"export {key_env}=<your key>, or set llm.api_key_env to the variable that holds it",
            provider=config.provider, model=config.model,
        )
    return _PROVIDERS[config.provider](config, api_key=api_key or None, key_env=key_env)
