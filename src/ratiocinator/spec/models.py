"""The research spec: what to study, where the code is, and what may be spent.

The seed's flat format loads unchanged; the extensions (``env``, ``arms``, ``factors``,
``design``, ``baseline``, ``replicates``, ``seed_env``, ``concurrency``, ``backend``,
``extra_knobs``, ``hosts``, ``vast``, ``ray_address``, ``ray``, ``failure_policy``, ``check``, ``llm``, ``search``,
``hardware.price_per_hour``, ``data.path``, ``data.url``, ``metrics.patterns``) are documented in docs/spec.md.
Unknown keys are errors, never silently dropped.

``search`` is what the offline (no-LLM) planner explores after iteration 1::

    search:
      space:                                     # knob -> range or choices
        LR: {low: 1.0e-4, high: 1.0e-1, log: true}
        LAYERS: {low: 1, high: 8, step: 1}       # integers when low, high (and step) are integers
        ARCH: {choices: [gcn, gat, gin, sage]}
      arms_per_iteration: 4                      # new configurations per later iteration
      confirm_top: 1                             # best arms that get confirmation replicates
      confirm_replicates: 2                      # extra replicates for each of them (0: none)
      seed: 0                                    # sampler seed: same ledger, same proposals

A knob that is both a factor and a search dimension must have its factor levels inside
the dimension, so the first iteration's arms can seed the search.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ratiocinator.execution.metrics import compile_pattern
from ratiocinator.llm.config import LlmConfig
from ratiocinator.spec.hypotheses import Hypothesis, check_hypotheses
from ratiocinator.spec.source import Loc, format_validation_error, line_for, read_mapping

# Matched whole (fullmatch): "$" would also match before a trailing newline.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+\-]{0,99}")
ENV_VALUE_MAX = 32 * 1024  # one environment string; the kernel refuses a launch past 128 KiB
# Variables the backend owns; an arm setting them would break pinning or bookkeeping.
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "PATH", "VIRTUAL_ENV"})
RESERVED_PREFIX = "RATIOCINATOR_"

Scalar = str | int | float | bool
PositiveInt = Annotated[int, Field(ge=1)]


def scalar_to_env(value: Scalar) -> str:
    """Environment values are strings; booleans keep their YAML spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_env_name(name: str, what: str) -> str:
    if not ENV_NAME.fullmatch(name):
        raise ValueError(f"{what} '{name}' is not a valid environment variable name (letters, digits, _; not starting"
                         " with a digit)")
    if name in RESERVED_ENV or name.startswith(RESERVED_PREFIX):
        raise ValueError(f"{what} '{name}' is set by Ratiocinator itself and cannot be an experiment knob")
    return name


def check_pass_env(value: list[str]) -> list[str]:
    """``pass_env`` (of a spec or an autoresearch program): variable names or globs, never the contract's own."""
    for pattern in value:
        if not re.fullmatch(r"[A-Za-z_*?][A-Za-z0-9_*?]*", pattern):
            raise ValueError(f"pass_env entry '{pattern}' is not a variable name or a glob of one (letters, digits,"
                             " _, * and ?)")
        if pattern.startswith(RESERVED_PREFIX):
            raise ValueError(f"pass_env entry '{pattern}': the RATIOCINATOR_* variables are the run contract's")
    return value


def _check_env_value(value: Scalar, what: str) -> None:
    if len(scalar_to_env(value)) > ENV_VALUE_MAX:
        raise ValueError(f"{what}'s value is {len(scalar_to_env(value)):,} characters; an environment value may hold"
                         f" at most {ENV_VALUE_MAX:,} (put large data in a file and pass its path)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hardware(_Strict):
    """What the runs need; each backend honours or reports every field."""

    gpu: str | None = None
    num_gpus: int = Field(0, ge=0)
    min_cpu_ram_gb: float | None = Field(None, ge=0)
    min_inet_down: float | None = Field(None, ge=0)
    min_cuda_version: str | None = None
    max_dph: float | None = Field(None, ge=0)
    disk_gb: float | None = Field(None, ge=0)
    image: str | None = None
    price_per_hour: float = Field(0.0, ge=0, description="local/SSH price used for budget accounting")

    @field_validator("min_cuda_version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("min_cuda_version")
    @classmethod
    def _version_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(\.\d+){0,2}", value):
            raise ValueError("expected a version like 12.0 or \"12.4\"")
        return value


SHA256 = re.compile(r"[0-9a-f]{64}")
HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


class Data(_Strict):
    """What the runs read, staged once per host and exported as ``RATIOCINATOR_DATA_DIR`` (see docs/data.md).

    ``local``: a directory on the orchestrator's machine. ``url``: one or more HTTP(S) files, each
    with an optional ``sha256`` (a list when ``url`` is a list); archives are unpacked. ``rsync``: a
    directory on an rsync server, ``url: rsync://host[:port]/module[/path]``. ``hf``: a Hugging Face
    dataset or model ``repo`` at a ``revision`` (the token only from ``HF_TOKEN`` named in ``pass_env``).
    """

    source: Literal["none", "local", "url", "rsync", "hf"] = "none"
    path: str | None = None
    url: str | list[str] | None = None
    sha256: str | list[str] | None = None
    repo: str | None = Field(None, description="with source: hf, the repository (org/name)")
    repo_type: Literal["dataset", "model"] = "dataset"
    revision: str = Field("main", min_length=1, description="with source: hf, a branch, tag or commit")
    endpoint: str | None = Field(None, description="with source: hf, the Hub's URL (default https://huggingface.co)")

    @field_validator("repo")
    @classmethod
    def _hf_repo(cls, value: str | None) -> str | None:
        if value is not None and not HF_REPO.fullmatch(value):
            raise ValueError(f"data.repo '{value}' is not a Hugging Face repository name (org/name)")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"data.endpoint '{value}' is not an http:// or https:// URL")
        return value

    @field_validator("url")
    @classmethod
    def _urls(cls, value: str | list[str] | None) -> str | list[str] | None:
        for url in [value] if isinstance(value, str) else value or []:
            if not re.fullmatch(r"(https?|rsync)://[^\s/]+(/\S*)?", url):
                raise ValueError(f"data.url '{url}' is not an http(s):// URL (source: url) or an rsync:// URL"
                                 " (source: rsync)")
        if isinstance(value, list):
            if not value:
                raise ValueError("data.url is an empty list; give at least one URL")
            if len(set(value)) != len(value):
                raise ValueError("data.url lists a URL twice")
        return value

    @field_validator("sha256", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        for digest in value if isinstance(value, list) else [value]:
            if isinstance(digest, int | float) and not isinstance(digest, bool):
                raise ValueError("data.sha256 was read as a number: put the digest in quotes")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256s(cls, value: str | list[str] | None) -> str | list[str] | None:
        for digest in [value] if isinstance(value, str) else value or []:
            if not SHA256.fullmatch(digest):
                raise ValueError(f"data.sha256 '{digest}' is not a SHA-256 (64 lowercase hex digits, as"
                                 " `sha256sum FILE` prints)")
        return value

    @model_validator(mode="after")
    def _fields_for_source(self) -> Data:
        if self.source == "local" and not self.path:
            raise ValueError("data.source 'local' needs data.path (a directory, exported to runs as"
                             " RATIOCINATOR_DATA_DIR)")
        if self.source == "url" and not self.url:
            raise ValueError("data.source 'url' needs data.url (a URL, or a list of them)")
        if self.source == "url" and any(u.startswith("rsync://") for u in self.urls):
            raise ValueError("data.url names an rsync:// URL: use source: rsync for it")
        if self.source == "rsync":
            if not isinstance(self.url, str) or not self.url.startswith("rsync://"):
                raise ValueError("data.source 'rsync' needs data.url: rsync://host[:port]/module[/path] (one URL)")
            if self.sha256 is not None:
                raise ValueError("data.sha256 is for files (source: url); an rsync directory is checked by its tree"
                                 " hash, recorded in the ledger")
        elif self.source != "url" and (self.url or self.sha256):
            raise ValueError(f"data.{'url' if self.url else 'sha256'} is only used with source: url or rsync"
                             f" (the source is '{self.source}')")
        if self.source == "hf" and not self.repo:
            raise ValueError("data.source 'hf' needs data.repo (org/name), and optionally data.revision and"
                             " data.repo_type (dataset or model)")
        hf_fields = [k for k in ("repo", "endpoint", "repo_type", "revision") if k in self.model_fields_set]
        if self.source != "hf" and hf_fields:
            raise ValueError(f"data.{hf_fields[0]} is only used with source: hf (the source is '{self.source}')")
        if self.source != "local" and self.path:
            raise ValueError(f"data.path is only used with source: local (the source is '{self.source}')")
        if self.source == "url" and self.sha256 is not None:
            urls, digests = self.urls, self.sha256
            if isinstance(digests, str) != isinstance(self.url, str) or len(self.checksums) != len(urls):
                raise ValueError(f"data.sha256 must match data.url: one digest for one URL, a list of {len(urls)}"
                                 f" for a list of {len(urls)} URLs (got {digests!r})")
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url or [])

    @property
    def checksums(self) -> list[str | None]:
        """One expected digest (or None) per URL, in order."""
        if self.sha256 is None:
            return [None] * len(self.urls)
        return [self.sha256] if isinstance(self.sha256, str) else list(self.sha256)


def _in_repository(value: str, what: str) -> str:
    """A path the spec names inside the repository: relative, and not climbing out of it."""
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if value.startswith(("/", "~")) or ".." in parts:
        raise ValueError(f"{what} '{value}' must be a path inside the repository, relative to its root"
                         " (no leading / or ~, no ..)")
    return value


class Deps(_Strict):
    pre_install: list[str] = []
    requirements: str | None = None
    exclude_from_requirements: list[str] = []
    verify: str | None = None

    @field_validator("requirements")
    @classmethod
    def _requirements_inside(cls, value: str | None) -> str | None:
        return None if value is None else _in_repository(value, "deps.requirements")


class Metrics(_Strict):
    protocol: Literal["json_line", "key_value", "regex"] = "json_line"
    json_prefix: str = Field("METRICS:", min_length=1)
    patterns: dict[str, str] = {}

    @model_validator(mode="after")
    def _patterns_for_regex(self) -> Metrics:
        if self.protocol == "regex" and not self.patterns:
            raise ValueError("protocol 'regex' needs metrics.patterns: {metric_name: 'regex with one (group)'}")
        for name, pattern in self.patterns.items():
            try:
                compile_pattern(name, pattern)  # on RE2, as the runs' output will be parsed
            except ValueError as exc:
                raise ValueError(f"metrics.patterns.{name}: {exc}") from None
        return self


class FailurePolicy(_Strict):
    """What a failed run costs: transient failures are retried, deterministic ones never."""

    max_attempts: PositiveInt = Field(3, description="attempts per replicate; only transient failures (infra,"
                                                     " shared-host oom) retry")
    retry_backoff_s: float = Field(10.0, ge=0,
                                   description="wait before the first retry; doubles per attempt, at most 300 s")
    stop_after: PositiveInt = Field(3, description="stop when the first N finished runs all fail with one deterministic"
                                                   " class")


class Check(_Strict):
    """The readiness review run before ``research`` spends anything."""

    smoke: bool = True
    smoke_timeout_s: float = Field(120.0, gt=0, description="wall limit of each trial-mode smoke run")
    allow_unchanged_knobs: list[str] = Field(
        [], description="knobs allowed to change nothing in trial mode (say, EPOCHS capped by the runner)"
    )


class Report(_Strict):
    """How the paper draws what the runs streamed."""

    curves: list[str] | None = Field(
        None, description="streamed metrics the learning-curve figure draws, one panel each (a train_X and val_X pair"
        " share one); default: every metric a run reported more than once")

    @field_validator("curves")
    @classmethod
    def _curves(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not name.strip() for name in value)):
            raise ValueError("name at least one metric, e.g. [train_loss, val_loss], or leave curves out")
        return value


class SshHost(_Strict):
    """One machine of ``hosts:`` in the spec (``backend: ssh``); its private key never leaves this machine."""

    host: str = Field(description="name or address to connect to")
    port: int = Field(22, ge=1, le=65535)
    user: str | None = Field(None, description="login name; default: the SSH config's or the local user")
    identity_file: str | None = Field(None, description="private key to log in with (stays local); default: agent and"
                                                        " ~/.ssh/id_*")
    known_hosts: str | None = Field(None, description="known_hosts file to trust; default ~/.ssh/known_hosts")
    trust_on_first_use: bool = Field(False, description="pin an unknown host key on first connect"
                                                        " in <home>/ssh_known_hosts")
    workdir: str = Field("~/.ratiocinator", description="base directory on the host (checkouts, venvs, runs)")
    slots: int = Field(1, ge=1, description="concurrent runs on this host")
    gpus: list[int] | None = Field(None, description="GPU indices runs may be pinned to (CUDA_VISIBLE_DEVICES)")
    python: str = Field("python3", description="interpreter on the host for the launcher and the venvs")
    price_per_hour: float | None = Field(None, ge=0, description="default: hardware.price_per_hour")
    env_forward: list[str] = Field(["*"], description="glob patterns of orchestrator variables runs may see")

    @field_validator("host", "python", "workdir")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip() or any(c in value for c in "\n\r\0"):
            raise ValueError("must be a non-empty single line")
        return value

    @property
    def label(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH writes this host in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


class VastConfig(_Strict):
    """Renting on the Vast.ai marketplace (``backend: vast``); the key comes from ``VAST_API_KEY``."""

    base_url: str = "https://console.vast.ai/api/v0"
    instances: PositiveInt | None = Field(None, description="instances rented for the experiment (default: concurrency"
                                                            " / slots_per_instance)")
    slots_per_instance: PositiveInt = 1
    boot_timeout_s: float = Field(600.0, gt=0, description="an instance not reachable by SSH by then is destroyed")
    setup_allowance_s: float = Field(900.0, ge=0, description="clone and deps, paid once per instance")
    work_s: float | None = Field(None, gt=0,
                                 description="billed work per instance (default: its share of runs × train_timeout_s)")
    min_reliability: float = Field(0.95, ge=0, le=1)
    verified: bool = True
    allow_mixed_gpus: bool = False
    ssh_user: str = "root"
    workdir: str = "~/.ratiocinator"
    storage_per_gb_month: float = Field(0.10, ge=0)
    health_check_s: float = Field(60.0, ge=0, description="a launch re-reads its instance when the last read is older")
    api_attempts: PositiveInt = Field(6, description="tries per API call on 429, 5xx, timeouts and dropped connections")
    api_backoff_s: float = Field(1.0, gt=0, description="the first retry's wait (doubling with jitter, up to 30 s)")
    destroy_confirm_s: float = Field(60.0, gt=0, description="how long a destroy waits to see the instance gone")


class RaySettings(_Strict):
    """Running on an existing Ray cluster (``backend: ray``, ``ray_address``)."""

    num_cpus_per_run: float = Field(1.0, gt=0)
    workdir: str | None = Field(None, description="per-node root for checkouts, venvs and run dirs")
    schedule_timeout_s: float = Field(600.0, gt=0, description="a run no node takes by then fails as infra")
    env_forward: list[str] = Field([], description="inherited variables (fnmatch patterns) sent to runs")


class Arm(_Strict):
    """One configuration: knobs as environment variables, optional runner flags."""

    name: str
    env: dict[str, Scalar] = {}
    args: dict[str, Scalar | None] = {}
    description: str = ""

    @field_validator("name")
    @classmethod
    def _arm_name(cls, value: str) -> str:
        if not ARM_NAME.fullmatch(value):
            raise ValueError("arm names use letters, digits and _.,=+- (at most 100 characters, not starting with"
                             " punctuation)")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        for key, knob in value.items():
            _check_env_name(key, "knob")
            _check_env_value(knob, f"knob '{key}'")
        return value

    @field_validator("args")
    @classmethod
    def _flags(cls, value: dict[str, Scalar | None]) -> dict[str, Scalar | None]:
        for flag in value:
            if not re.fullmatch(r"--?[A-Za-z0-9][A-Za-z0-9_\-]*", flag):
                raise ValueError(f"runner flag '{flag}' must look like --name or -n")
        return value


class SearchDimension(_Strict):
    """One knob's search range: ``choices``, or ``low``/``high`` with an optional ``log`` or ``step``.

    Integer when low, high (and step) are all integers, so LAYERS: {low: 1, high: 8}
    never proposes 2.5 to a runner that calls int() on it.
    """

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Scalar] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        # Said here, with the nearest key: the generic unknown-key message cannot see
        # inside the space mapping's values.
        if isinstance(data, dict):
            valid = list(cls.model_fields)
            for key in data:
                if key not in valid:
                    near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                    suggestion = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
                    raise ValueError(f"unknown key '{key}' in a search dimension — {suggestion}")
        return data

    @field_validator("low", "high", "step", mode="before")
    @classmethod
    def _not_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")  # noqa: TRY004 (pydantic reports ValueError only)
        return value

    @field_validator("choices", mode="before")
    @classmethod
    def _scalar_choices(cls, value: object) -> object:
        # One message instead of pydantic's four (one per member of the Scalar union).
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, (str, int, float, bool)):
                    raise ValueError(f"choices must be strings, numbers or booleans; got {item!r}")
        return value

    @model_validator(mode="after")
    def _shape(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a search dimension is either {choices: [...]} or {low, high}, not both")
            if not self.choices:
                raise ValueError("choices is empty; list at least one value")
            rendered = [scalar_to_env(v) for v in self.choices]
            if len(set(rendered)) != len(rendered):
                raise ValueError(f"choices lists a value twice: {rendered}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a search dimension needs low and high (a range) or choices (a list of values)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step must be positive (got {self.step})")
            if self.log:
                raise ValueError("log and step cannot be combined; use one")
            ratio = (self.high - self.low) / self.step
            if abs(ratio - round(ratio)) > 1e-9 * max(1.0, abs(ratio)):
                raise ValueError(f"high - low ({self.high} - {self.low}) must be a multiple of step ({self.step})")
        return self

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step)
                                            if v is not None)

    def value_of(self, text: str) -> Scalar | None:
        """The dimension's value for a knob's environment string, or None if it lies outside."""
        if self.choices is not None:
            return next((c for c in self.choices if scalar_to_env(c) == text), None)
        try:
            number = float(text)
        except ValueError:
            return None
        assert self.low is not None and self.high is not None
        if not math.isfinite(number) or not self.low <= number <= self.high:
            return None
        if self.is_int:
            if not number.is_integer() or (int(number) - self.low) % (self.step or 1):
                return None
            return int(number)
        if self.step is not None:
            k = round((number - self.low) / self.step)
            if abs(number - (self.low + k * self.step)) > 1e-9 * max(1.0, abs(self.step)):
                return None
            return self.low + k * self.step  # on the grid exactly, as a sampler computes it
        return number

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {[scalar_to_env(c) for c in self.choices]}"
        extra = " (log scale)" if self.log else f" in steps of {self.step}" if self.step is not None else ""
        return f"{'an integer' if self.is_int else 'a number'} in [{self.low}, {self.high}]{extra}"


class Search(_Strict):
    """What the offline planner explores after iteration 1, and how it confirms what it finds."""

    space: dict[str, SearchDimension]
    arms_per_iteration: PositiveInt = 4
    confirm_top: int = Field(1, ge=0)
    confirm_replicates: int = Field(2, ge=0)
    seed: int = Field(0, ge=0)

    @field_validator("space")
    @classmethod
    def _space(cls, value: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        if not value:
            raise ValueError("search.space names no knobs; give each knob a range {low, high} or {choices: [...]}")
        for name in value:
            _check_env_name(name, "search knob")
        return value


def check_backend_settings(backend: str, *, hosts: Sequence[object], vast: object | None,
                           ray_address: str | None) -> None:
    """Each backend's own settings only with that backend (a spec's and an autoresearch program's)."""
    if backend == "ssh" and not hosts:
        raise ValueError("backend: ssh needs hosts: [{host: ..., user: ...}, ...]")
    if backend != "ssh" and hosts:
        raise ValueError("hosts: is only used with backend: ssh")
    if backend != "vast" and vast is not None:
        raise ValueError("vast: is only used with backend: vast")
    if backend != "ray" and ray_address:
        raise ValueError("ray_address: is only used with backend: ray")


class Spec(_Strict):
    """A research spec (seed fields first, then extensions)."""

    name: str | None = None
    topic: str = Field(min_length=1)
    goal_metric: str = Field(min_length=1)
    maximize: bool
    repo_url: str = Field(min_length=1)
    repo_branch: str = "HEAD"
    runner_script: str = Field(min_length=1)
    hardware: Hardware = Hardware()
    data: Data = Data()
    deps: Deps = Deps()
    metrics: Metrics = Metrics()
    max_iterations: PositiveInt = 1
    max_dollars: float = Field(0.0, ge=0)
    train_timeout_s: float = Field(3600.0, gt=0)
    download_timeout_s: float = Field(600.0, gt=0)
    paper_title: str | None = None

    env: dict[str, Scalar] = Field({}, description="constant knobs every arm gets (an arm's own env wins); never"
                                                    " part of arm names, factors or hypotheses")
    arms: list[Arm] = []
    factors: dict[str, list[Scalar]] = {}
    design: Literal["grid", "ablation"] = "grid"
    baseline: str | dict[str, Scalar] | None = None
    replicates: PositiveInt = 3
    seed_env: str | None = None
    concurrency: PositiveInt | None = None
    backend: Literal["local", "ssh", "vast", "ray"] = "local"
    hosts: list[SshHost] = []
    vast: VastConfig | None = None
    ray_address: str | None = Field(None, description="Ray cluster address (host:port, ray://..., or auto)")
    ray: RaySettings = RaySettings()
    extra_knobs: list[str] = []
    pass_env: list[str] = Field([], description="orchestrator variables (names or globs) runs and deps steps inherit on"
                                                " purpose, e.g. HF_TOKEN for a study that downloads a gated model")
    failure_policy: FailurePolicy = FailurePolicy()
    check: Check = Check()
    report: Report = Report()
    llm: LlmConfig | None = None
    hypotheses: list[Hypothesis] = Field([], description="what the study expects, each judged from the runs")
    search: Search | None = None  # last: its validator reads factors and seed_env

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", value):
            raise ValueError("name uses letters, digits and _.- (at most 64 characters)")
        return value

    @field_validator("factors")
    @classmethod
    def _factors(cls, value: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for name, levels in value.items():
            _check_env_name(name, "factor")
            if not levels:
                raise ValueError(f"factor '{name}' has no values")
            for level in levels:
                _check_env_value(level, f"factor '{name}'")
            rendered = [scalar_to_env(v) for v in levels]
            if len(set(rendered)) != len(rendered):
                raise ValueError(f"factor '{name}' lists a value twice: {rendered}")
        return value

    @field_validator("hypotheses")
    @classmethod
    def _hypotheses(cls, value: list[Hypothesis], info: ValidationInfo) -> list[Hypothesis]:
        check_hypotheses(value, info.data.get("factors") or {}, [a.name for a in info.data.get("arms") or []])
        return value

    @field_validator("env")
    @classmethod
    def _constants(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        for key, knob in value.items():
            _check_env_name(key, "constant knob")
            _check_env_value(knob, f"constant knob '{key}'")
        return value

    @field_validator("seed_env")
    @classmethod
    def _seed_env(cls, value: str | None) -> str | None:
        return None if value is None else _check_env_name(value, "seed_env")

    @field_validator("runner_script")
    @classmethod
    def _runner_inside(cls, value: str) -> str:
        return _in_repository(value, "runner_script")

    @field_validator("repo_url", "repo_branch")
    @classmethod
    def _not_an_option(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("-"):  # git would read it as an option (--upload-pack=...)
            raise ValueError(f"{info.field_name} must not begin with '-'")
        return value

    @field_validator("pass_env")
    @classmethod
    def _pass_env(cls, value: list[str]) -> list[str]:
        return check_pass_env(value)

    @field_validator("extra_knobs")
    @classmethod
    def _extra_knobs(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.startswith("-"):
                _check_env_name(name, "extra knob")
        return value

    @field_validator("search")
    @classmethod
    def _search_fits_factors(cls, value: Search | None, info: ValidationInfo) -> Search | None:
        """Factor levels outside the space could not seed the search (and would say the space is wrong)."""
        if value is None:
            return value
        if info.data.get("seed_env") in value.space:
            raise ValueError(f"seed_env '{info.data['seed_env']}' is set per replicate; it cannot be a search knob")
        for name, levels in (info.data.get("factors") or {}).items():
            dim = value.space.get(name)
            if dim is None:
                continue
            outside = [scalar_to_env(v) for v in levels if dim.value_of(scalar_to_env(v)) is None]
            if outside:
                raise ValueError(
                    f"factor '{name}' has level{'s' if len(outside) > 1 else ''} {', '.join(outside)} outside"
                    f" search.space.{name} ({dim.describe()}); widen the range or change the levels"
                )
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Spec:
        if self.metrics.protocol == "regex" and self.goal_metric not in self.metrics.patterns:
            raise ValueError(
                f"goal_metric '{self.goal_metric}' has no entry in metrics.patterns "
                f"(has: {', '.join(sorted(self.metrics.patterns))})"
            )
        if isinstance(self.baseline, dict):
            if not self.factors:
                raise ValueError("baseline is a mapping of factor values, but the spec has no factors")
            missing = set(self.factors) - set(self.baseline)
            extra = set(self.baseline) - set(self.factors)
            if missing or extra:
                raise ValueError(
                    "baseline must give one value for every factor"
                    + (f"; missing: {', '.join(sorted(missing))}" if missing else "")
                    + (f"; not a factor: {', '.join(sorted(extra))}" if extra else "")
                )
            for name, value in self.baseline.items():
                levels = [scalar_to_env(v) for v in self.factors[name]]
                if scalar_to_env(value) not in levels:
                    raise ValueError(f"baseline {name}={scalar_to_env(value)} is not one of the factor's values"
                                     f" {levels}")
        if self.design == "ablation" and self.factors and self.baseline is None:
            raise ValueError("design 'ablation' varies one factor at a time from the baseline: set baseline: {FACTOR:"
                             " value, ...}")
        if self.seed_env and any(self.seed_env in arm.env for arm in self.arms):
            raise ValueError(f"seed_env '{self.seed_env}' is set per replicate; arms must not set it")
        check_backend_settings(self.backend, hosts=self.hosts, vast=self.vast, ray_address=self.ray_address)
        if self.seed_env and self.seed_env in self.factors:
            raise ValueError(f"seed_env '{self.seed_env}' is set per replicate; it cannot also be a factor")
        if self.seed_env and self.seed_env in self.env:
            raise ValueError(f"seed_env '{self.seed_env}' is set per replicate; it cannot also be a constant in env")
        both = sorted(set(self.env) & set(self.factors))
        if both:
            raise ValueError(f"{', '.join(both)} {'is' if len(both) == 1 else 'are'} both a constant (env) and a"
                             " factor; a factor's levels would always win — keep it in one place")
        varied = sorted(set(self.env) & set(self.search.space if self.search else {}))
        if varied:
            raise ValueError(f"{', '.join(varied)} {'is' if len(varied) == 1 else 'are'} both a constant (env) and a"
                             " search knob; remove it from env to let the search vary it")
        return self

    @property
    def title(self) -> str:
        return self.paper_title or f"{self.name or 'Experiment'}: {self.goal_metric}"


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec plus where it came from (for hashing, resume and error lines)."""

    spec: Spec
    path: Path
    text: str
    sha256: str
    lines: dict[Loc, int]

    @property
    def name(self) -> str:
        return self.spec.name or re.sub(r"[^A-Za-z0-9_.\-]", "-", self.path.stem)[:64]

    def where(self, *loc: str | int) -> str:
        """``file:line`` for a location in the spec, for error messages."""
        line = line_for(tuple(loc), self.lines)
        return f"{self.path}:{line}" if line else str(self.path)


def load_spec(path: str | Path) -> LoadedSpec:
    """Read, parse and validate a spec file; every failure is a SpecError (exit 2)."""
    path = Path(path)
    raw, text, data, lines = read_mapping(path, "spec")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, Spec, path, lines) from None
    return LoadedSpec(spec=spec, path=path.resolve(), text=text, sha256=hashlib.sha256(raw).hexdigest(), lines=lines)
