"""The autoresearch program file: what the loop may change, how it measures, and what it may spend.

A YAML mapping validated like a research spec (unknown keys are errors with the nearest
valid key, every problem is reported with ``file:line``). Paths inside it (``repo``,
``instructions_file``, ``agent.patches``) are relative to the program file, so a program
committed next to its repository works from any working directory::

    repo: ../modgrad
    tag: apr19                      # branch autoresearch/apr19
    editable: ["crates/modgrad-ffn/src/**", "isis/src/main.rs"]
    protected: ["crates/modgrad-training/src/metrics.rs", "val.txt", "Cargo.toml"]
    run: cargo build --release -p isis && ./target/release/isis learn-ffn --budget 300 ... > run.log 2>&1
    log_file: run.log
    metric: {name: val_bpb, direction: lower}
    secondary_metrics: [peak_vram_mb]
    budget_s: 300                   # hard timeout defaults to 2x
    agent: {kind: command, command: 'claude -p "$(cat {prompt_file})" --permission-mode acceptEdits'}
    pass_env: [DATA_ROOT]           # runs inherit the contract's allow-list plus these, nothing else
    backend: ssh                    # where the runs go, with a spec's settings: hosts, vast + hardware, ray_address
    hosts: [{host: gpu-box, user: me, gpus: [0, 1]}]
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ratiocinator.errors import SpecError
from ratiocinator.execution.metrics import compile_pattern
from ratiocinator.llm.config import LlmConfig
from ratiocinator.spec.models import Hardware, RaySettings, SshHost, VastConfig, check_backend_settings, check_pass_env
from ratiocinator.spec.source import Loc, format_validation_error, line_for, read_mapping

TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
NOISE_AUTO_REPLICATES = 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_glob(pattern: str) -> str:
    if not pattern or not pattern.strip():
        raise ValueError("an empty path pattern matches nothing; remove it")
    if pattern.startswith("/") or any(part == ".." for part in pattern.split("/")):
        raise ValueError(f"'{pattern}' must be relative to the repository root, without '..'")
    if pattern.split("/")[0] == ".git":
        raise ValueError(f"'{pattern}' is inside .git; the loop owns git state")
    return pattern


class Metric(_Strict):
    """The one number that decides keep or discard, and how it is read from the run's output."""

    name: str
    direction: Literal["lower", "higher"] = "lower"
    protocol: Literal["key_value", "json_line", "regex"] = "key_value"
    json_prefix: str = Field("METRICS:", min_length=1)
    patterns: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        """``metric: val_bpb`` means ``{name: val_bpb}`` (lower is better, key_value)."""
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not METRIC_NAME.match(value):
            raise ValueError(f"'{value}' is not a metric name (letters, digits, _./-, not starting with a digit)")
        return value

    @model_validator(mode="after")
    def _regex(self) -> Metric:
        for name, pattern in self.patterns.items():
            try:
                compile_pattern(name, pattern)  # on RE2, as the run's output will be parsed
            except ValueError as exc:
                raise ValueError(f"patterns.{name}: {exc}") from None
        if self.protocol == "regex" and self.name not in self.patterns:
            raise ValueError(f"protocol 'regex' needs patterns.{self.name}: 'a regex with one (group) holding the"
                             " value'")
        return self

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"


class AgentSpec(_Strict):
    """Who edits the code: an external command, the configured LLM, or a directory of patches."""

    kind: Literal["command", "llm", "patches"]
    command: str | None = None
    patches: str | None = None
    timeout_s: float = Field(1800.0, gt=0, description="wall limit of one agent turn (command and llm)")
    max_attempts: int = Field(3, ge=1, description="llm: replies per edit, re-asking with git's error when a diff does"
                                                   " not apply")
    max_failures: int = Field(3, ge=1, description="consecutive agent failures (no usable edit) before the loop stops")
    context_bytes: int = Field(60_000, ge=0, description="llm: most bytes of editable files quoted in the prompt")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> AgentSpec:
        if self.kind == "command" and not (self.command and self.command.strip()):
            raise ValueError("agent kind 'command' needs command: the shell line that edits the worktree "
                             "(the prompt file is {prompt_file} and $RATIOCINATOR_PROMPT_FILE)")
        if self.kind == "patches" and not self.patches:
            raise ValueError("agent kind 'patches' needs patches: a directory of *.patch / *.diff files, applied in"
                             " name order")
        if self.kind != "command" and self.command:
            raise ValueError(f"agent.command is only read by kind 'command', not '{self.kind}'")
        if self.kind != "patches" and self.patches:
            raise ValueError(f"agent.patches is only read by kind 'patches', not '{self.kind}'")
        return self


class Program(_Strict):
    """An autoresearch program (see docs/autoresearch.md)."""

    repo: str = Field(min_length=1)
    tag: str
    base_branch: str | None = None
    editable: list[str] = Field(min_length=1)
    protected: list[str] = []
    link: list[str] = []
    run: str = Field(min_length=1)
    log_file: str | None = None
    metric: Metric
    secondary_metrics: list[str] = []
    memory_metric: str | None = "peak_vram_mb"
    budget_s: float = Field(gt=0)
    timeout_s: float | None = Field(None, gt=0)
    max_iterations: int | None = Field(None, ge=0)
    max_dollars: float | None = Field(None, ge=0)
    price_per_hour: float = Field(0.0, ge=0)
    instructions: str = ""
    instructions_file: str | None = None
    agent: AgentSpec
    replicates: int = Field(1, ge=1)
    noise: Literal["off", "auto"] = "off"
    confidence: float = Field(0.95, gt=0, lt=1)
    workers: int = Field(1, ge=1, le=64)
    integrate: Literal["rebase", "merge"] = "rebase"
    overlap: bool = Field(True, description="a worker's agent starts its next turn while its previous attempt is"
                                            " measured (command and llm agents; a patches agent takes no time)")
    gpus_per_worker: int = Field(0, ge=0)
    results_tsv_in_repo: bool = False
    llm: LlmConfig | None = None
    pass_env: list[str] = Field([], description="orchestrator variables (names or globs) runs inherit on top of the"
                                                " run contract's allow-list")
    backend: Literal["local", "ssh", "vast", "ray"] = "local"
    hosts: list[SshHost] = []
    vast: VastConfig | None = None
    ray_address: str | None = None
    ray: RaySettings = RaySettings()
    hardware: Hardware = Hardware()

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not TAG.match(value) or value.endswith(".lock") or ".." in value:
            raise ValueError("a tag uses letters, digits and _.- (at most 64 characters), e.g. apr19")
        return value

    @field_validator("editable", "protected", "link")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        return [_check_glob(p) for p in value]

    @field_validator("pass_env")
    @classmethod
    def _pass_env(cls, value: list[str]) -> list[str]:
        return check_pass_env(value)

    @field_validator("log_file")
    @classmethod
    def _log_file(cls, value: str | None) -> str | None:
        if value is not None:
            _check_glob(value)
            if any(c in value for c in "*?["):
                raise ValueError("log_file is one file the run command writes, not a pattern")
        return value

    @field_validator("secondary_metrics")
    @classmethod
    def _secondary(cls, value: list[str]) -> list[str]:
        for name in value:
            if not METRIC_NAME.match(name):
                raise ValueError(f"'{name}' is not a metric name")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Program:
        if self.timeout_s is not None and self.timeout_s < self.budget_s:
            raise ValueError(f"timeout_s ({self.timeout_s:g}) is below budget_s ({self.budget_s:g}); "
                             "the hard timeout must leave the run its budget")
        if self.instructions and self.instructions_file:
            raise ValueError("give instructions or instructions_file, not both")
        for pattern in self.protected:
            if pattern in self.editable:
                raise ValueError(f"'{pattern}' is both editable and protected; protected wins, so remove it from"
                                 " editable")
        self._check_backend()
        return self

    def _check_backend(self) -> None:
        """The backend settings as a spec checks them, plus what a program says elsewhere."""
        check_backend_settings(self.backend, hosts=self.hosts, vast=self.vast, ray_address=self.ray_address)
        if self.hardware.price_per_hour:
            raise ValueError("hardware.price_per_hour: a program sets price_per_hour at its top level")
        if self.hardware.num_gpus:
            raise ValueError("hardware.num_gpus: a program sets gpus_per_worker (GPUs each worker's runs get)")
        if self.backend != "local" and self.link:
            raise ValueError(f"link: shares paths of the local repository into local worktrees; with backend"
                             f" '{self.backend}' the runs happen elsewhere, so commit what they need or have the"
                             " run command fetch it")

    @property
    def hard_timeout_s(self) -> float:
        """The seed's rule: twice the budget unless set."""
        return self.timeout_s if self.timeout_s is not None else 2.0 * self.budget_s

    @property
    def k(self) -> int:
        """Runs per evaluated commit: 1 is the seed's strictly-better rule, more is noise-aware."""
        if self.replicates > 1:
            return self.replicates
        return NOISE_AUTO_REPLICATES if self.noise == "auto" else 1

    @property
    def noise_aware(self) -> bool:
        return self.k > 1

    @property
    def branch(self) -> str:
        return f"autoresearch/{self.tag}"

    def worker_branch(self, worker: int) -> str:
        return f"autoresearch/{self.tag}-w{worker}"

    def measure_branch(self, worker: int) -> str:
        """Where a worker's attempt is measured (and integrated) while its agent edits the next, with overlap.

        A branch, not a detached HEAD: remote hosts fetch the commits they run by ref.
        """
        return f"autoresearch/{self.tag}-w{worker}-measure"

    @property
    def overlaps(self) -> bool:
        """Whether agents' turns overlap their previous attempts' runs: only an agent whose turn takes time gains."""
        return self.overlap and self.agent.kind != "patches"


@dataclass(frozen=True)
class LoadedProgram:
    """A validated program plus where it came from (for resume, error lines and relative paths)."""

    program: Program
    path: Path
    text: str
    sha256: str
    lines: dict[Loc, int]
    instructions: str

    @property
    def repo(self) -> Path:
        return (self.path.parent / self.program.repo).resolve()

    @property
    def patches_dir(self) -> Path | None:
        patches = self.program.agent.patches
        return None if patches is None else (self.path.parent / patches).resolve()

    def where(self, *loc: str | int) -> str:
        """``file:line`` of a key, for error messages."""
        line = line_for(tuple(loc), self.lines)
        return f"{self.path}:{line}" if line else str(self.path)


def load_program(path: str | Path) -> LoadedProgram:
    """Read, parse and validate a program file; every failure is a SpecError (exit 2)."""
    path = Path(path)
    raw, text, data, lines = read_mapping(path, "program")
    try:
        program = Program.model_validate(data)
    except ValidationError as exc:
        error = format_validation_error(exc, Program, path, lines)
        raise SpecError(error.message.replace("in the spec", "in the program"),
                        hint="docs/autoresearch.md lists every field") from None
    loaded = LoadedProgram(program=program, path=path.resolve(), text=text, sha256=hashlib.sha256(raw).hexdigest(),
                           lines=lines, instructions=program.instructions)
    return _with_paths_checked(loaded)


def _with_paths_checked(loaded: LoadedProgram) -> LoadedProgram:
    """The paths a program names must exist now, not fail an hour into the loop."""
    program = loaded.program
    repo = loaded.repo
    if not repo.is_dir():
        raise SpecError(f"{loaded.where('repo')}: repo '{program.repo}' is not a directory ({repo})",
                        hint="repo is relative to the program file")
    instructions = program.instructions
    if program.instructions_file:
        file = loaded.path.parent / program.instructions_file
        try:
            instructions = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SpecError(f"{loaded.where('instructions_file')}: cannot read instructions_file {file}: {reason}",
                            hint="instructions_file is relative to the program file") from None
    patches = loaded.patches_dir
    if patches is not None and not patches.is_dir():
        raise SpecError(f"{loaded.where('agent', 'patches')}: agent.patches '{program.agent.patches}' is not a"
                        f" directory ({patches})",
                        hint="agent.patches is relative to the program file")
    return LoadedProgram(program=program, path=loaded.path, text=loaded.text, sha256=loaded.sha256,
                         lines=loaded.lines, instructions=instructions)
