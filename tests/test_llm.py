"""The LLM layer through the official SDKs against a real loopback server (tests/llmserver.py).

Nothing is patched: each SDK sends real HTTP to the scripted server, so the wire
formats, our retry policy, redaction, cost and structured re-asking are tested as the
pipeline will use them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pydantic import BaseModel, ValidationError

from llmserver import Delay, Fail, LlmServer, Reply
from ratiocinator.errors import RatiocinatorError, SpecError
from ratiocinator.llm import (
    Completion,
    LlmConfig,
    LlmError,
    LlmUnavailable,
    Message,
    OpenAIProvider,
    ask_structured,
    estimate_cost,
    json_candidates,
    llm_from_env,
    make_provider,
    redact,
)

KEY = "sk-test-LEAKCHECK-7d1f0c9e5b2a4e38a6"  # distinctive, so any leak is found by substring
KEY_ENV = "TEST_LLM_KEY"
ENV = {KEY_ENV: KEY}
PROVIDERS = ["openai", "anthropic"]


@pytest.fixture
def server() -> Iterator[LlmServer]:
    with LlmServer() as srv:
        yield srv


def ask(provider, text: str = "hi", **kwargs) -> Completion:
    return provider.complete([Message("user", text)], **kwargs)


def assert_no_key(*things: object) -> None:
    for thing in things:
        if isinstance(thing, str):
            text = thing
        elif isinstance(thing, (dict, list)):
            text = json.dumps(thing, default=repr)
        else:
            text = repr(thing)
        assert KEY not in text, f"API key leaked into: {text[:300]}"


# --- plain completions ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_completion_text_tokens_cost_and_wire_format(server: LlmServer, provider_name: str, stream: bool) -> None:
    server.script(Reply("Hello there,  world.\nSecond line.", input_tokens=1200, output_tokens=345))
    config = server.config(provider_name, model="m-7b", api_key_env=KEY_ENV, price_in_per_mtok=3.0,
                           price_out_per_mtok=15.0)
    provider = make_provider(config, ENV)

    completion = ask(provider, "What is 2+2?", system="You are terse.", stream=stream)

    assert completion.text == "Hello there,  world.\nSecond line."
    assert (completion.provider, completion.model) == (provider_name, "m-7b")
    assert (completion.input_tokens, completion.output_tokens) == (1200, 345)
    assert completion.cost_dollars == pytest.approx(1200 * 3.0 / 1e6 + 345 * 15.0 / 1e6)
    assert completion.attempts == 1
    assert completion.latency_s > 0
    assert completion.finish_reason == ("stop" if provider_name == "openai" else "end_turn")

    [sent] = server.requests
    assert completion.request == sent.body, "Completion.request must be exactly the body sent"
    assert sent.body["model"] == "m-7b"
    if provider_name == "openai":
        assert sent.path == "/v1/chat/completions"
        assert sent.headers["authorization"] == f"Bearer {KEY}"
        assert sent.body["messages"] == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ]
        assert sent.body["max_tokens"] == 4096
        assert completion.response["choices"][0]["message"]["content"] == completion.text
        assert completion.response["usage"]["prompt_tokens"] == 1200
        if stream:
            assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    else:
        assert sent.path == "/v1/messages"
        # Anthropic's SDK sends the key as x-api-key (1.x) or as a bearer token (2.x).
        assert KEY in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "").removeprefix("Bearer "))
        assert sent.body["system"] == "You are terse."
        assert sent.body["messages"] == [{"role": "user", "content": "What is 2+2?"}]
        assert completion.response["content"][0]["text"] == completion.text
        assert completion.response["usage"]["output_tokens"] == 345
        assert sent.body.get("stream", False) is stream
    assert "stream" in sent.body if stream else "stream" not in sent.body


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_conversation_max_tokens_and_temperature_reach_the_server(server: LlmServer, provider_name: str) -> None:
    server.script("ok")
    provider = make_provider(server.config(provider_name, api_key_env=KEY_ENV, temperature=0.25, max_tokens=999), ENV)
    turns = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    provider.complete(turns, max_tokens=77)
    body = server.requests[0].body
    assert body["max_tokens"] == 77
    assert body["temperature"] == 0.25
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert "system" not in body and all(m["role"] != "system" for m in body["messages"])


def test_official_openai_uses_max_completion_tokens() -> None:
    provider = make_provider(LlmConfig(provider="openai", model="gpt-x"), {"OPENAI_API_KEY": KEY})
    body = provider.build_request([Message("user", "hi")], max_tokens=12)
    assert body == {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 12}
    assert_no_key(body, repr(provider))


def test_message_roles_are_checked() -> None:
    with pytest.raises(ValueError, match="system="):
        Message("system", "x")  # type: ignore[arg-type]


# --- cost ------------------------------------------------------------------------------


def test_estimate_cost_reserves_the_worst_case() -> None:
    config = LlmConfig(provider="anthropic", model="m", price_in_per_mtok=3.0, price_out_per_mtok=15.0, max_tokens=2000)
    assert estimate_cost(config, 4000, 1000) == pytest.approx(1000 * 3.0 / 1e6 + 1000 * 15.0 / 1e6)
    assert estimate_cost(config, 4001) == pytest.approx(1001 * 3.0 / 1e6 + 2000 * 15.0 / 1e6)
    assert estimate_cost(LlmConfig(provider="openai", model="local"), 10**6) == 0.0


# --- structured output -------------------------------------------------------------------


class Arm(BaseModel):
    name: str
    lr: float


class Plan(BaseModel):
    arms: list[Arm]


GOOD = '{"arms": [{"name": "base", "lr": 0.001}, {"name": "hot", "lr": 0.01}]}'


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_structured_valid_first_try_with_prose_and_fences(server: LlmServer, provider_name: str) -> None:
    server.script(f"Sure! Here is the plan:\n```json\n{GOOD}\n```\nGood luck.")
    provider = make_provider(server.config(provider_name, api_key_env=KEY_ENV), ENV)
    result = ask_structured(provider, system="You plan experiments.", user="Plan two arms.", schema=Plan)
    assert [a.name for a in result.value.arms] == ["base", "hot"]
    assert len(result.completions) == 1
    body = server.requests[0].body
    system = body["system"] if provider_name == "anthropic" else body["messages"][0]["content"]
    assert system.startswith("You plan experiments.")
    assert "JSON" in system and '"lr"' in system and '"arms"' in system  # the schema is in the prompt


def test_json_candidates_finds_the_outermost_object() -> None:
    assert json_candidates(GOOD) == [json.loads(GOOD)]
    assert json_candidates(f"Plan {{draft}}: {GOOD} -- and {{\"x\": 1}} too") == [json.loads(GOOD), {"x": 1}]
    assert json_candidates("```\n{\"a\": {\"b\": [1, {\"c\": 2}]}}\n```") == [{"a": {"b": [1, {"c": 2}]}}]
    assert json_candidates("no json here [1, 2]") == []


def test_structured_prefers_the_candidate_that_validates(server: LlmServer) -> None:
    server.script('For example {"arms": "?"} -- the answer: ' + GOOD)
    result = ask_structured(make_provider(server.config("openai"), {}), system=None, user="plan", schema=Plan)
    assert len(result.value.arms) == 2


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_structured_malformed_json_then_valid(server: LlmServer, provider_name: str) -> None:
    server.script('{"arms": [{"name": "base", "lr": 0.001},]}', GOOD)
    provider = make_provider(server.config(provider_name, api_key_env=KEY_ENV), ENV)
    result = ask_structured(provider, system="plan", user="Plan two arms.", schema=Plan)
    assert len(result.value.arms) == 2
    assert len(result.completions) == 2
    reask = server.requests[1].body["messages"]
    reask = [m for m in reask if m["role"] != "system"]
    assert [m["role"] for m in reask] == ["user", "assistant", "user"]
    assert reask[0]["content"] == "Plan two arms."
    assert reask[1]["content"] == '{"arms": [{"name": "base", "lr": 0.001},]}'
    assert "not valid JSON" in reask[2]["content"]
    assert "Expecting" in reask[2]["content"]  # the decoder's own complaint is quoted


def test_structured_validation_error_then_valid(server: LlmServer) -> None:
    server.script('{"arms": [{"name": "base", "lr": "fast"}]}', GOOD)
    result = ask_structured(make_provider(server.config("anthropic"), {}), system="s", user="u", schema=Plan)
    assert len(result.value.arms) == 2
    feedback = server.requests[1].body["messages"][-1]["content"]
    assert "arms.0.lr" in feedback and "valid number" in feedback and '"fast"' in feedback


def test_structured_gives_up_after_max_attempts(server: LlmServer) -> None:
    server.script("no idea", '{"arms": 3}', '{"arms": [{"name": 1}]}')
    provider = make_provider(server.config("openai", price_in_per_mtok=1.0, price_out_per_mtok=1.0), {})
    with pytest.raises(LlmError) as caught:
        ask_structured(provider, system="s", user="u", schema=Plan, max_attempts=3)
    err = caught.value
    assert isinstance(err, RatiocinatorError)
    assert "no acceptable Plan in 3 attempts" in str(err)
    assert "arms.0.lr" in str(err)  # the last validation problem
    assert len(err.completions) == 3 and err.attempts == 3
    assert sum(c.cost_dollars for c in err.completions) > 0  # spent money stays accountable
    assert len(server.requests) == 3


def test_structured_unavailable_keeps_the_paid_replies(server: LlmServer) -> None:
    server.script("not json", Fail(503), Fail(503))
    provider = make_provider(server.config("openai", max_retries=1), {})
    with pytest.raises(LlmUnavailable) as caught:
        ask_structured(provider, system="s", user="u", schema=Plan)
    assert [c.text for c in caught.value.completions] == ["not json"]


def test_structured_truncated_reply_is_told_so(server: LlmServer) -> None:
    server.script(Reply('{"arms": [{"name": "ba', finish_reason="length"), GOOD)
    result = ask_structured(make_provider(server.config("openai"), {}), system="s", user="u", schema=Plan)
    assert len(result.completions) == 2
    assert "cut off at the output token limit" in server.requests[1].body["messages"][-1]["content"]


def test_structured_check_problems_are_fed_back(server: LlmServer) -> None:
    unknown = '{"arms": [{"name": "dropout=0.5", "lr": 0.1}]}'
    server.script(unknown, GOOD)

    def check(plan: Plan) -> list[str]:
        return [f"arm '{a.name}' sets unknown knob 'dropout'" for a in plan.arms if "dropout" in a.name]

    result = ask_structured(make_provider(server.config("anthropic"), {}), system="s", user="u", schema=Plan,
                            check=check)
    assert [a.name for a in result.value.arms] == ["base", "hot"]
    feedback = server.requests[1].body["messages"][-1]["content"]
    assert "was rejected" in feedback and "unknown knob 'dropout'" in feedback


# --- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_429_with_retry_after_then_success(server: LlmServer, provider_name: str) -> None:
    server.script(Fail(429, retry_after=1), "finally")
    provider = make_provider(server.config(provider_name, backoff_s=0.0), {})
    started = time.monotonic()
    completion = ask(provider)
    assert completion.text == "finally"
    assert completion.attempts == 2
    assert len(server.requests) == 2
    assert time.monotonic() - started >= 0.9, "Retry-After: 1 must be waited out"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_500s_past_the_cap_raise_unavailable(
    server: LlmServer, provider_name: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Fail(500), Fail(503), Fail(500))
    provider = make_provider(server.config(provider_name, model="big-model", max_retries=2), {})
    with caplog.at_level(logging.WARNING, logger="ratiocinator.llm"), pytest.raises(LlmUnavailable) as caught:
        ask(provider, stream=stream)
    err = caught.value
    assert isinstance(err, RatiocinatorError) and not isinstance(err, LlmError)
    assert (err.attempts, err.status, err.provider, err.model) == (3, 500, provider_name, "big-model")
    assert "HTTP 500" in str(err) and "3 attempts" in str(err) and "big-model" in str(err) and provider_name in str(err)
    assert len(server.requests) == 3
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_error_event_mid_stream_is_retried(server: LlmServer, provider_name: str) -> None:
    server.script(Fail(529, message="Overloaded", mid_stream=True), "recovered")
    completion = ask(make_provider(server.config(provider_name), {}), stream=True)
    assert (completion.text, completion.attempts) == ("recovered", 2)


def test_backoff_doubles(server: LlmServer) -> None:
    server.script(Fail(502), Fail(502), "ok")
    waits: list[float] = []
    provider = OpenAIProvider(server.config("openai", backoff_s=0.01), api_key=None, key_env=None, sleep=waits.append)
    assert ask(provider).attempts == 3
    assert waits == [0.01, 0.02]


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_timeouts_are_retried_then_unavailable(server: LlmServer, provider_name: str) -> None:
    server.script(Delay(3), Delay(3))
    provider = make_provider(server.config(provider_name, timeout_s=0.3, max_retries=1), {})
    started = time.monotonic()
    with pytest.raises(LlmUnavailable, match="timeout") as caught:
        ask(provider)
    assert caught.value.attempts == 2 and caught.value.status is None
    assert len(server.requests) == 2
    assert time.monotonic() - started < 2.5


def test_timeout_then_success(server: LlmServer) -> None:
    server.script(Delay(3), "made it")
    completion = ask(make_provider(server.config("openai", timeout_s=0.3), {}), stream=True)
    assert (completion.text, completion.attempts) == ("made it", 2)


def test_connection_refused_is_unavailable() -> None:
    with LlmServer() as srv:
        config = srv.config("anthropic", max_retries=1)
    with pytest.raises(LlmUnavailable, match="cannot connect") as caught:
        ask(make_provider(config, {}))
    assert caught.value.attempts == 2


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_401_fails_at_once_and_names_the_variable(server: LlmServer, provider_name: str) -> None:
    server.script(Fail(401, message="invalid x-api-key"))
    provider = make_provider(server.config(provider_name, api_key_env=KEY_ENV), ENV)
    with pytest.raises(LlmError) as caught:
        ask(provider)
    err = caught.value
    assert not isinstance(err, LlmUnavailable)
    assert (err.status, err.attempts) == (401, 1)
    assert len(server.requests) == 1, "a 401 must not be retried"
    assert "HTTP 401" in str(err) and "invalid x-api-key" in str(err)
    assert f"check the key in ${KEY_ENV}" in str(err)


@pytest.mark.parametrize("status", [400, 403, 404])
def test_other_client_errors_fail_at_once(server: LlmServer, status: int) -> None:
    server.script(Fail(status, message="nope"))
    with pytest.raises(LlmError, match=f"HTTP {status}") as caught:
        ask(make_provider(server.config("openai"), {}))
    assert caught.value.attempts == 1 and len(server.requests) == 1


# --- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("failure", ["401", "500-exhausted", "timeout"])
def test_key_never_leaks_from_errors(
    server: LlmServer, provider_name: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    echo = f"Incorrect API key provided: {KEY}"  # a server that echoes the key back in full
    script = {"401": [Fail(401, message=echo)], "500-exhausted": [Fail(500, message=echo)] * 2,
              "timeout": [Delay(3)] * 2}
    server.script(*script[failure])
    provider = make_provider(server.config(provider_name, api_key_env=KEY_ENV, max_retries=1, timeout_s=0.3), ENV)
    with caplog.at_level(logging.DEBUG), pytest.raises((LlmError, LlmUnavailable)) as caught:
        ask(provider, stream=failure == "timeout")
    err = caught.value
    assert server.requests and KEY in server.requests[0].raw, "the key must have been sent, or this test proves nothing"
    assert_no_key(str(err), repr(err), err.args, err.hint or "", vars(err), repr(provider), caplog.text)
    # No SDK exception is chained on: its request object holds the auth header.
    assert err.__cause__ is None and err.__context__ is None
    if failure != "timeout":
        assert "[REDACTED]" in str(err)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_key_never_in_completion(server: LlmServer, provider_name: str, stream: bool) -> None:
    server.script(f"the server says {KEY}")  # even a response echoing it
    completion = ask(make_provider(server.config(provider_name, api_key_env=KEY_ENV), ENV), stream=stream)
    assert KEY in server.requests[0].raw
    assert_no_key(completion.request, completion.response, repr(completion.request), completion)


def test_redact() -> None:
    assert redact(f"a {KEY} b {KEY}", [KEY, None, ""]) == "a [REDACTED] b [REDACTED]"
    assert redact("not-needed", ["not-needed"]) == "not-needed"  # the placeholder is no secret


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["api_key", "key", "openai_api_key", "auth_token", "password"])
def test_key_in_config_is_rejected_without_echo(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        LlmConfig.model_validate({"provider": "openai", "model": "m", field: KEY})
    assert "api_key_env" in str(caught.value) and "environment variable" in str(caught.value)
    assert_no_key(str(caught.value))


def test_key_in_config_is_not_echoed_even_when_nested() -> None:
    class Spec(BaseModel):
        llm: LlmConfig | None = None

    with pytest.raises(ValidationError) as caught:
        Spec.model_validate({"llm": {"provider": "anthropic", "model": "m", "api_key": KEY}})
    assert_no_key(str(caught.value), caught.value.errors(include_url=False))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"api_key_env": KEY}, "NAME of the environment"),
        ({"api_key_env": "gsk_" + "Ab3" * 12}, "looks like a key"),
        ({"base_url": f"https://user:{KEY}@llm.example.com/v1"}, "credentials"),
        ({"base_url": f"https://llm.example.com/v1?api_key={KEY}"}, "credentials"),
        ({"base_url": "localhost:8000"}, "http:// or https://"),
        ({"temperature": 1.5, "provider": "anthropic"}, "out of range for anthropic"),
        ({"api_base": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_config_validation(fields: dict[str, object], message: str) -> None:
    data = {"provider": "openai", "model": "m", **fields}
    with pytest.raises(ValidationError, match=message) as caught:
        LlmConfig.model_validate(data)
    assert_no_key(str(caught.value))


def test_config_defaults() -> None:
    config = LlmConfig(provider="anthropic", model="claude-x")
    assert (config.max_tokens, config.timeout_s, config.max_retries, config.backoff_s) == (4096, 120, 4, 2.0)
    assert (config.price_in_per_mtok, config.price_out_per_mtok, config.temperature) == (0, 0, None)
    assert config.key_env == "ANTHROPIC_API_KEY" and config.endpoint == "https://api.anthropic.com"
    assert LlmConfig(provider="openai", model="m", base_url="https://api.openai.com/v1").key_env == "OPENAI_API_KEY"
    assert LlmConfig(provider="openai", model="m", base_url="http://localhost:8000/v1").key_env is None


@pytest.mark.parametrize(("provider_name", "env"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")])
def test_missing_key_names_the_variable(provider_name: str, env: str) -> None:
    with pytest.raises(LlmError, match=f"environment variable {env} is not set") as caught:
        make_provider(LlmConfig(provider=provider_name, model="m"), {})
    assert f"export {env}=" in str(caught.value)
    with pytest.raises(LlmError, match="MY_LLM_KEY is not set"):
        make_provider(LlmConfig(provider=provider_name, model="m", api_key_env="MY_LLM_KEY"), {env: KEY})


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_local_server_needs_no_key_and_never_gets_the_default_one(server: LlmServer, provider_name: str) -> None:
    server.script("local", Fail(401))
    # OPENAI_API_KEY / ANTHROPIC_API_KEY are set, but a custom base_url does not get them unasked.
    provider = make_provider(server.config(provider_name), {"OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": KEY})
    assert ask(provider).text == "local"
    sent = server.requests[0].headers
    assert sent.get("authorization", sent.get("x-api-key")) in ("Bearer not-needed", "not-needed")
    assert KEY not in server.requests[0].raw
    with pytest.raises(LlmError, match="set llm.api_key_env"):
        ask(provider)


def test_unset_named_key_with_base_url_says_so_on_401(server: LlmServer) -> None:
    server.script(Fail(401))
    with pytest.raises(LlmError, match=f"\\${KEY_ENV} is not set"):
        ask(make_provider(server.config("openai", api_key_env=KEY_ENV), {}))


def test_config_from_environment() -> None:
    assert llm_from_env({"PATH": "/bin", "RATIOCINATOR_LLM_MODEL": "  "}) is None
    config = llm_from_env({
        "RATIOCINATOR_LLM_PROVIDER": "openai",
        "RATIOCINATOR_LLM_MODEL": "qwen2.5:7b",
        "RATIOCINATOR_LLM_BASE_URL": "http://localhost:11434/v1",
        "RATIOCINATOR_LLM_API_KEY_ENV": "OLLAMA_KEY",
        "RATIOCINATOR_LLM_PRICE_IN_PER_MTOK": "0.5",
        "RATIOCINATOR_LLM_PRICE_OUT_PER_MTOK": "1.5",
        "RATIOCINATOR_LLM_MAX_TOKENS": "2048",
        "RATIOCINATOR_LLM_TEMPERATURE": "0.2",
        "RATIOCINATOR_LLM_TIMEOUT_S": "30",
        "RATIOCINATOR_LLM_MAX_RETRIES": "6",
        "RATIOCINATOR_LLM_BACKOFF_S": "0.5",
    })
    assert config == LlmConfig(
        provider="openai", model="qwen2.5:7b", base_url="http://localhost:11434/v1", api_key_env="OLLAMA_KEY",
        price_in_per_mtok=0.5, price_out_per_mtok=1.5, max_tokens=2048, temperature=0.2, timeout_s=30,
        max_retries=6, backoff_s=0.5,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RATIOCINATOR_LLM_PROVIDER": "openai"}, "RATIOCINATOR_LLM_MODEL is not set"),
        ({"RATIOCINATOR_LLM_MODEL": "m"}, "RATIOCINATOR_LLM_PROVIDER is not set"),
        ({"RATIOCINATOR_LLM_PROVIDER": "gemini", "RATIOCINATOR_LLM_MODEL": "m"},
         "RATIOCINATOR_LLM_PROVIDER: .*'gemini'"),
        ({"RATIOCINATOR_LLM_PROVIDER": "openai", "RATIOCINATOR_LLM_MODEL": "m", "RATIOCINATOR_LLM_MAX_TOKENS": "lots"},
         "RATIOCINATOR_LLM_MAX_TOKENS: .*integer"),
        ({"RATIOCINATOR_LLM_PROVIDER": "openai", "RATIOCINATOR_LLM_MODEL": "m", "RATIOCINATOR_LLM_MAXTOKENS": "9"},
         "did you mean RATIOCINATOR_LLM_MAX_TOKENS"),
        ({"RATIOCINATOR_LLM_PROVIDER": "openai", "RATIOCINATOR_LLM_MODEL": "m", "RATIOCINATOR_LLM_API_KEY": KEY},
         "the key itself is not read"),
        ({"RATIOCINATOR_LLM_PROVIDER": "openai", "RATIOCINATOR_LLM_MODEL": "m", "RATIOCINATOR_LLM_API_KEY_ENV": KEY},
         "NAME of the environment variable"),
    ],
)
def test_config_from_environment_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        llm_from_env(env)
    assert caught.value.exit_code == 2
    assert_no_key(str(caught.value))


@pytest.mark.subprocess
def test_importing_the_llm_package_does_not_load_the_sdks() -> None:
    code = "import sys, ratiocinator.llm; print(sorted(m for m in ('openai', 'anthropic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
