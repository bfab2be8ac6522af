"""Which LLM to call and what it costs: the spec's ``llm:`` section, or the environment.

The config names the environment variable that holds the API key and never the key
itself: specs are committed, copied into workspaces and quoted in reports, so a key
written here would leak. Anything that looks like a key is rejected, and its value is
blanked in the input before the error is raised so that no error rendering (ours or
pydantic's, even when this model is nested in the spec) can echo it.

Without an ``llm:`` section, `llm_from_env` reads the same fields from variables
named ``RATIOCINATOR_LLM_<FIELD>`` (see `ENV_VARS`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ratiocinator.errors import SpecError

ProviderName = Literal["openai", "anthropic"]

DEFAULT_KEY_ENV: dict[str, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# The official endpoints; the SDKs' own defaults, written out so a call never depends on
# OPENAI_BASE_URL / ANTHROPIC_BASE_URL happening to be set in the environment.
OFFICIAL_BASE_URL: dict[str, str] = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}

ENV_PREFIX = "RATIOCINATOR_LLM_"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Field names that can only mean "the key itself".
_SECRET_NAME = re.compile(r"^(api_?key|apikey|key|token|secret|password|bearer|authorization"
                          r"|.*_(key|token|secret|password))$")
# Prefixes of real provider keys (OpenAI, Anthropic, OpenRouter, Groq, xAI, Hugging Face, Google, ...).
_KEY_PREFIX = re.compile(r"^(sk-|sk_|gsk_|xai-|hf_|r8_|pk-|AIza|ghp_|github_pat_|nvapi-)")
_SECRET_QUERY = re.compile(r"(key|token|secret|password|sig)", re.IGNORECASE)
_BLANKED = "<removed: secrets never go in the config>"


def looks_like_key(value: str) -> bool:
    """A provider key's shape: a known prefix, or a long mixed-case alphanumeric run.

    Environment variable names are conventionally upper case and short, so a 24+
    character string mixing lower case, upper case and digits is a key, not a name.
    """
    value = value.strip()
    if _KEY_PREFIX.match(value) and len(value) >= 16:
        return True
    return (
        len(value) >= 24
        and re.fullmatch(r"[A-Za-z0-9_\-.]+", value) is not None
        and any(c.islower() for c in value)
        and any(c.isupper() for c in value)
        and any(c.isdigit() for c in value)
    )


class LlmConfig(BaseModel):
    """One LLM endpoint: provider, model, where it is, how to authenticate, what it costs."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    provider: ProviderName = Field(
        description="openai: any OpenAI-compatible chat-completions server; anthropic: the Messages API"
    )
    model: str = Field(min_length=1, description="model name as the server knows it")
    base_url: str | None = Field(
        None,
        description="server root: OpenAI-compatible ones usually end in /v1 (vLLM http://localhost:8000/v1, "
        "Ollama http://localhost:11434/v1); Anthropic's has no /v1. Default: the official endpoint",
    )
    api_key_env: str | None = Field(
        None,
        description="NAME of the environment variable holding the key (default OPENAI_API_KEY / ANTHROPIC_API_KEY "
        "for the official endpoint; with a custom base_url no key is sent unless this is set)",
    )
    price_in_per_mtok: float = Field(0.0, ge=0, description="dollars per million input tokens")
    price_out_per_mtok: float = Field(0.0, ge=0, description="dollars per million output tokens")
    max_tokens: int = Field(4096, ge=1, description="output token cap per call")
    temperature: float | None = Field(None, ge=0, le=2,
                                      description="sampling temperature; omitted from requests when unset")
    timeout_s: float = Field(120.0, gt=0, description="per-attempt HTTP timeout")
    max_retries: int = Field(4, ge=0,
                             description="retries after the first attempt on timeouts, connection errors, 429, 5xx")
    backoff_s: float = Field(2.0, ge=0, description="first retry wait; doubles each retry (Retry-After wins when sent)")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        """Reject keys written into the config, blanking them so no error message can quote them."""
        if not isinstance(data, MutableMapping):
            return data
        for name in list(data):
            if isinstance(name, str) and name != "api_key_env" and _SECRET_NAME.match(name.lower()):
                data[name] = _BLANKED
                raise ValueError(
                    f"'{name}': an API key never goes in the config (specs are committed and quoted in reports); "
                    "put it in an environment variable and name that variable with api_key_env, "
                    "e.g. api_key_env: OPENAI_API_KEY"
                )
        env = data.get("api_key_env")
        if isinstance(env, str):
            if looks_like_key(env):
                data["api_key_env"] = _BLANKED
                raise ValueError(
                    "'api_key_env' holds what looks like a key itself; it must be the NAME of the environment "
                    "variable that holds the key, e.g. api_key_env: OPENAI_API_KEY"
                )
            if not _ENV_NAME.match(env):
                data["api_key_env"] = _BLANKED
                raise ValueError(
                    "'api_key_env' is not a valid environment variable name (letters, digits, _; not starting "
                    "with a digit); it must name the variable that holds the key, e.g. OPENAI_API_KEY"
                )
        url = data.get("base_url")
        if isinstance(url, str):
            problem = _url_problem(url)
            if problem:
                if "credential" in problem:
                    data["base_url"] = _BLANKED
                raise ValueError(f"'base_url': {problem}")
        return data

    @model_validator(mode="after")
    def _provider_ranges(self) -> LlmConfig:
        if self.provider == "anthropic" and self.temperature is not None and self.temperature > 1:
            raise ValueError(f"'temperature' {self.temperature} is out of range for anthropic (0 to 1)")
        return self

    @property
    def key_env(self) -> str | None:
        """The variable the key is read from; None means no key is sent.

        The provider's default variable only applies to its official endpoint: a custom
        base_url (a local vLLM, a proxy, OpenRouter) never receives your OpenAI or
        Anthropic key unless api_key_env says so.
        """
        if self.api_key_env:
            return self.api_key_env
        return DEFAULT_KEY_ENV[self.provider] if self.official else None

    @property
    def official(self) -> bool:
        """True when calls go to the provider's own API (no base_url, or one on its host)."""
        return self.base_url is None or _same_host(self.base_url, OFFICIAL_BASE_URL[self.provider])

    @property
    def endpoint(self) -> str:
        """The base URL actually used."""
        return (self.base_url or OFFICIAL_BASE_URL[self.provider]).rstrip("/")


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL; expected e.g. http://localhost:8000/v1"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL with a host, e.g. http://localhost:8000/v1"
    if parts.password or any(_SECRET_QUERY.search(k) for k, _ in parse_qsl(parts.query)):
        return "the URL carries credentials; keep the key in an environment variable named by api_key_env"
    return None


def _same_host(url: str, other: str) -> bool:
    return (urlsplit(url).hostname or "").lower() == (urlsplit(other).hostname or "").lower()


# Environment variable for each field; the key itself has none on purpose.
ENV_VARS: dict[str, str] = {name: ENV_PREFIX + name.upper() for name in LlmConfig.model_fields}


def llm_from_env(environ: Mapping[str, str]) -> LlmConfig | None:
    """The LLM config from ``RATIOCINATOR_LLM_*`` variables, or None when none is set.

    For runs whose spec has no ``llm:`` section. RATIOCINATOR_LLM_PROVIDER and
    RATIOCINATOR_LLM_MODEL are required once any of them is set; the rest mirror the
    spec fields (RATIOCINATOR_LLM_BASE_URL, _API_KEY_ENV, _PRICE_IN_PER_MTOK,
    _PRICE_OUT_PER_MTOK, _MAX_TOKENS, _TEMPERATURE, _TIMEOUT_S, _MAX_RETRIES,
    _BACKOFF_S). Empty values count as unset. Unknown RATIOCINATOR_LLM_* names are
    errors, so a typo is not silently ignored.
    """
    present = {name: value for name, value in environ.items() if name.startswith(ENV_PREFIX) and value.strip()}
    if not present:
        return None
    by_var = {var: field for field, var in ENV_VARS.items()}
    problems: list[str] = []
    data: dict[str, str] = {}
    for var in sorted(present):
        if var in by_var:
            data[by_var[var]] = present[var].strip()
        elif _SECRET_NAME.match(var[len(ENV_PREFIX):].lower()):
            problems.append(
                f"{var}: the key itself is not read from a RATIOCINATOR_LLM_ variable; keep it in e.g. "
                f"OPENAI_API_KEY and name that variable with {ENV_VARS['api_key_env']}"
            )
        else:
            near = difflib.get_close_matches(var, list(by_var), n=1, cutoff=0.6)
            problems.append(f"{var}: unknown variable" + (f" — did you mean {near[0]}?" if near else ""))
    for field in ("provider", "model"):
        if field not in data:
            problems.append(f"{ENV_VARS[field]} is not set (needed once any RATIOCINATOR_LLM_ variable is)")
    if not problems:
        try:
            return LlmConfig.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                field = str(err["loc"][0]) if err["loc"] else ""
                where = ENV_VARS.get(field, "RATIOCINATOR_LLM_*")
                got = err.get("input")
                shown = f" (got {got!r})" if field not in ("api_key_env", "base_url") and isinstance(got, str) else ""
                problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}{shown}")
    raise SpecError(
        "LLM configuration from the environment is invalid:\n  " + "\n  ".join(problems),
        hint="fix or unset the RATIOCINATOR_LLM_* variables, or give the spec an llm: section; valid variables: "
        + ", ".join(ENV_VARS.values()),
    )
