"""The Python surface, for notebooks and scripts: open a home, read its experiments, run studies.

    import ratiocinator

    home = ratiocinator.open_home()              # --home's default: RATIOCINATOR_HOME, else ./.ratiocinator
    exp = home.experiment("quickstart")          # an id, an id prefix or a name (the newest of that name)
    exp.arms().to_pandas()                       # mean, sd and 95% CI of the goal per arm
    exp.runs(), exp.series("val_r2"), exp.verdicts()

Every result is a frozen dataclass, or a `Table` of them: a sequence with ``to_dicts()`` and, where
pandas is installed (the ``pandas`` extra), ``to_pandas()``. The numbers are the ones the paper
shows, computed by the same analysis from the same ledger, which is read fresh on every call:
an experiment that is still running shows its runs as they finish. Nothing here writes to the
ledger except ``research`` and ``check``, which are the CLI commands of the same names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ratiocinator.errors import UsageError
from ratiocinator.extras import require
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.paths import Paths, no_ledger

if TYPE_CHECKING:
    from ratiocinator.check.readiness import Readiness
    from ratiocinator.execution.executor import ProgressSink
    from ratiocinator.export.mlflow_export import MlflowExport
    from ratiocinator.pipeline import ResearchOutcome
    from ratiocinator.store.records import DecisionRecord, ReadinessRecord

T = TypeVar("T")
HOME_ENV = "RATIOCINATOR_HOME"
DEFAULT_HOME = ".ratiocinator"


def _when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)


class Table(Sequence[T], Generic[T]):
    """An immutable sequence of result records, with flat exports for analysis tools."""

    def __init__(self, rows: Sequence[T]) -> None:
        self._rows = tuple(rows)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Table[T]: ...

    def __getitem__(self, index: int | slice) -> T | Table[T]:
        return Table(self._rows[index]) if isinstance(index, slice) else self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[T]:
        return iter(self._rows)

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self._rows[:3])) + (", ..." if len(self._rows) > 3 else "")
        return f"Table({len(self._rows)} rows: [{shown}])"

    def to_dicts(self) -> list[dict[str, Any]]:
        """One flat dict per row: a mapping field (knobs, metrics) becomes one ``field.key`` entry per key."""
        return [row for record in self._rows for row in _flat_rows(record)]

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of `to_dicts` (needs pandas: ``pip install 'ratiocinator[pandas]'``)."""
        pd = require("pandas", extra="pandas", purpose="Table.to_pandas()")
        return pd.DataFrame(self.to_dicts())


def _flat_rows(record: Any) -> list[dict[str, Any]]:
    rows = getattr(record, "_rows", None)
    if callable(rows):  # a record that is several rows (a series: one per point)
        return list(rows())
    out: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, dict):
            out.update({f"{f.name}.{k}": v for k, v in value.items()})
        else:
            out[f.name] = value
    return [out]


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentInfo:
    """One experiment of a home, as ``ratiocinator status`` lists it."""

    id: str
    name: str
    status: str
    goal_metric: str | None
    backend: str
    commit: str | None
    runs: int
    succeeded: int
    failed: int
    running: int
    spent_usd: float
    reserved_usd: float
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Arm:
    """An arm with its goal statistics over its succeeded runs (as in the paper's arm table)."""

    name: str
    is_baseline: bool
    description: str
    iteration: int
    knobs: dict[str, str]
    factors: dict[str, str]
    args: tuple[str, ...]
    attempts: int
    succeeded: int
    failed: int
    metric: str  # the goal metric
    n: int
    mean: float | None
    std: float | None
    ci95_low: float | None  # t interval of the mean; None below 2 values
    ci95_high: float | None
    min: float | None
    max: float | None
    run_ids: tuple[int, ...]  # the runs the statistics came from


@dataclass(frozen=True)
class Run:
    """One run attempt (every status) with its final metrics; a non-finite final value is None, and named."""

    id: int
    arm: str
    replicate: int
    seed: int
    attempt: int
    status: str
    failure: str | None
    reason: str
    started_at: datetime
    ended_at: datetime | None
    duration_s: float | None
    host: str
    commit: str
    cost_usd: float | None
    knobs: dict[str, str]
    metrics: dict[str, float | None]
    nonfinite_metrics: tuple[str, ...]
    log_dir: str


@dataclass(frozen=True)
class Series:
    """Every streamed point of one metric of one run: ``steps[i]`` (None where none was printed) and
    ``values[i]`` (NaN and ±inf kept) in print order; `to_pandas` of a table of them has a row per point."""

    run_id: int
    arm: str
    replicate: int
    seed: int
    attempt: int
    status: str
    metric: str
    steps: tuple[int | None, ...]
    values: tuple[float, ...]

    def _rows(self) -> Iterator[dict[str, Any]]:
        head = {"run_id": self.run_id, "arm": self.arm, "replicate": self.replicate, "seed": self.seed,
                "attempt": self.attempt, "status": self.status, "metric": self.metric}
        for step, value in zip(self.steps, self.values, strict=True):
            yield {**head, "step": step, "value": value}


@dataclass(frozen=True)
class ArmVerdict:
    """An arm against the baseline on the goal metric: Welch's test, Holm-adjusted across the arms,
    and the verdict the paper states (improvement, regression, within noise floor, not significant, ...)."""

    arm: str
    baseline: str
    metric: str
    verdict: str
    reason: str
    diff: float | None  # mean(arm) - mean(baseline)
    diff_ci95_low: float | None
    diff_ci95_high: float | None
    p: float | None
    p_holm: float | None
    hedges_g: float | None
    n_arm: int
    n_baseline: int
    run_ids: tuple[int, ...]


# -- views --------------------------------------------------------------------------------


class Experiment:
    """One experiment of a home; each method reads the ledger afresh."""

    def __init__(self, home: Home, experiment_id: str) -> None:
        self.home = home
        self.id = experiment_id

    def __repr__(self) -> str:
        return f"Experiment({self.id!r}, status={self.info().status!r})"

    @property
    def _ledger(self) -> Ledger:
        return self.home.ledger

    def info(self) -> ExperimentInfo:
        return self.home._info(self._ledger.experiment(self.id))

    @property
    def status(self) -> str:
        return self._ledger.experiment(self.id).status

    @property
    def report_dir(self) -> Path:
        """Where ``research`` and ``report`` write the paper (``paper.html``, ``.md``, ``.tex``, ``.pdf``)."""
        return Paths(self.home.path).report(self.id)

    def _analysis(self) -> Any:
        from ratiocinator.report.paper import analyse

        return analyse(self._ledger, self.id)

    def arms(self) -> Table[Arm]:
        """Every arm, in the order it was planned, with its goal statistics."""
        _, spec, _, _, inference = self._analysis()
        rows = []
        for goal in inference.goals:
            s, d = goal.summary, goal.describe
            rows.append(Arm(
                name=s.name, is_baseline=s.name == inference.baseline, description=s.arm.description,
                iteration=s.arm.iteration, knobs=dict(s.arm.env), factors=dict(s.arm.factors), args=tuple(s.arm.args),
                attempts=s.n_attempts, succeeded=s.n_succeeded, failed=s.status_counts.get("failed", 0),
                metric=spec.goal_metric, n=d.n, mean=d.mean, std=d.std, ci95_low=d.ci.low if d.ci else None,
                ci95_high=d.ci.high if d.ci else None, min=d.min, max=d.max, run_ids=goal.stats.run_ids))
        return Table(rows)

    def runs(self, *, status: str | None = None) -> Table[Run]:
        """Every run attempt in id order (or those with ``status``: succeeded, failed, interrupted, running)."""
        ledger = self._ledger
        arms = {a.id: a for a in ledger.arms(self.id)}
        finals = ledger.run_metrics(self.id)
        rows = []
        for r in ledger.runs(self.id, status=status):
            own = finals.get(r.id, {})
            rows.append(Run(
                id=r.id, arm=r.arm, replicate=r.replicate, seed=r.seed, attempt=r.attempt, status=r.status,
                failure=r.failure, reason=r.reason, started_at=_when(r.started_at) or datetime.now(UTC),
                ended_at=_when(r.ended_at), duration_s=r.duration_s, host=r.host, commit=r.commit_sha, cost_usd=r.cost,
                knobs=dict(arms[r.arm_id].env), metrics={k: v if ok else None for k, (v, ok) in sorted(own.items())},
                nonfinite_metrics=tuple(sorted(k for k, (_, ok) in own.items() if not ok)), log_dir=r.log_dir))
        return Table(rows)

    def series(self, metric: str | Collection[str] | None = None, *,
               run_ids: Collection[int] | None = None) -> Table[Series]:
        """The streamed points of ``metric`` (a name or several; default: every metric) of every run
        attempt, or of ``run_ids``; read while runs are alive, it has the points recorded so far."""
        from ratiocinator.export.series import run_series

        metrics = {metric} if isinstance(metric, str) else (None if metric is None else set(metric))
        return Table([
            Series(s.run.id, s.run.arm, s.run.replicate, s.run.seed, s.run.attempt, s.run.status, s.metric,
                   tuple(s.step_list()), tuple(float(v) for v in s.values))
            for s in run_series(self._ledger, self.id, metrics=metrics, run_ids=run_ids)
        ])

    def verdicts(self) -> Table[ArmVerdict]:
        """Each arm against the baseline on the goal metric, as the paper judges it."""
        _, spec, _, _, inference = self._analysis()
        rows = []
        for c in inference.comparisons:
            t = c.comparison
            rows.append(ArmVerdict(
                arm=c.arm, baseline=c.baseline, metric=spec.goal_metric, verdict=c.verdict.value, reason=c.reason,
                diff=t.diff, diff_ci95_low=t.diff_ci.low if t.diff_ci else None,
                diff_ci95_high=t.diff_ci.high if t.diff_ci else None, p=t.p, p_holm=c.p_holm, hedges_g=t.hedges_g,
                n_arm=t.n_other, n_baseline=t.n_baseline, run_ids=c.run_ids))
        return Table(rows)

    def readiness(self) -> list[ReadinessRecord]:
        """Every readiness review of the code (or its skipping), oldest first."""
        return self._ledger.readiness_verdicts(self.id)

    def decisions(self) -> list[DecisionRecord]:
        """What the planner decided for each iteration, and why."""
        return self._ledger.decisions(self.id)

    def to_mlflow(self, tracking_uri: str | None = None, *, experiment_name: str | None = None,
                  replace: bool = False) -> MlflowExport:
        """``ratiocinator export EXP --to mlflow`` (the paper is attached when it has been written)."""
        from ratiocinator.export.mlflow_export import export_mlflow

        return export_mlflow(self._ledger, self.id, tracking_uri=tracking_uri, experiment_name=experiment_name,
                             report_dir=self.report_dir, replace=replace)


class Home:
    """A Ratiocinator home (``--home``): its ledger, workspaces and reports.

    Usable as a context manager, which closes the ledger's connections on exit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ledger: Ledger | None = None

    def __repr__(self) -> str:
        return f"Home({str(self.path)!r})"

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    @property
    def ledger(self) -> Ledger:
        """The home's ledger, opened on first use; a home with none yet is an error that says how to make one."""
        if self._ledger is None:
            path = Paths(self.path).ledger
            if not path.exists():
                raise no_ledger(path, hint="run a study first (Home.research or `ratiocinator research SPEC`),"
                                           " or open the home it ran in")
            self._ledger = Ledger(path)
        return self._ledger

    def _info(self, e: Any) -> ExperimentInfo:
        from ratiocinator.store.records import RunStatus

        runs = self.ledger.runs(e.id)
        spent, reserved = self.ledger.money(e.id)
        return ExperimentInfo(
            id=e.id, name=e.name, status=e.status, goal_metric=_goal_metric(e.spec_text), backend=e.backend,
            commit=e.commit_sha, runs=len(runs), succeeded=sum(r.status == RunStatus.SUCCEEDED for r in runs),
            failed=sum(r.status == RunStatus.FAILED for r in runs),
            running=sum(r.status == RunStatus.RUNNING for r in runs), spent_usd=spent, reserved_usd=reserved,
            created_at=_when(e.created_at) or datetime.now(UTC), updated_at=_when(e.updated_at) or datetime.now(UTC))

    def experiments(self) -> Table[ExperimentInfo]:
        """Every experiment, oldest first."""
        return Table([self._info(e) for e in self.ledger.experiments()])

    def experiment(self, ref: str | None = None) -> Experiment:
        """By id, unique id prefix or name (the newest of that name); with no ``ref``, the newest experiment."""
        if ref is None:
            every = self.ledger.experiments()
            if not every:
                raise UsageError(f"no experiments in {self.ledger.path}", hint="run a study first")
            return Experiment(self, every[-1].id)
        return Experiment(self, self.ledger.find_experiment(ref).id)

    def research(self, spec: str | os.PathLike[str], *, new: bool = False, check: bool = True,
                 llm_review: bool = True, progress: ProgressSink | bool = True) -> ResearchOutcome:
        """``ratiocinator research SPEC``: the whole pipeline, resumed when it ran before (``new`` starts afresh).

        ``progress``: True prints a line per run, False is silent, or a `ProgressSink` of your own.
        The outcome's ``experiment_id`` opens the result: ``home.experiment(outcome.experiment_id)``.
        """
        from ratiocinator.execution.progress import PlainProgress
        from ratiocinator.pipeline import Research
        from ratiocinator.spec.models import load_spec

        sink = PlainProgress() if progress is True else None if progress is False else progress
        self.close()  # the run opens its own ledger connections
        return Research(load_spec(Path(spec)), self.path, progress=sink, new=new, check=check,
                        llm_review=llm_review).run()

    def check(self, spec: str | os.PathLike[str], *, smoke: bool = True, llm: bool = True,
              on_message: Callable[[str], None] | None = None) -> Readiness:
        """``ratiocinator check SPEC``: static checks, smoke runs and (when one is configured) the LLM's review.

        The result's ``is_code_ready`` is the verdict, ``checks`` the evidence, ``to_json()`` all of it.
        """
        from ratiocinator.pipeline import check_spec
        from ratiocinator.spec.models import load_spec

        return check_spec(load_spec(Path(spec)), self.path, smoke=smoke, use_llm=llm, on_message=on_message)


def _goal_metric(spec_text: str) -> str | None:
    import yaml

    from ratiocinator.spec.source import load_stored

    try:
        data = load_stored(spec_text)
    except yaml.YAMLError:
        return None
    goal = data.get("goal_metric") if isinstance(data, dict) else None
    return goal if isinstance(goal, str) else None


def open_home(path: str | os.PathLike[str] | None = None) -> Home:
    """The home at ``path``; by default the CLI's: ``RATIOCINATOR_HOME``, else ``./.ratiocinator``."""
    chosen = path if path is not None else os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Home(Path(chosen).expanduser().resolve())


__all__ = ["Arm", "ArmVerdict", "Experiment", "ExperimentInfo", "Home", "Run", "Series", "Table", "open_home"]
