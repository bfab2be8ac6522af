"""An experiment as MLflow runs, for the tracking UI people already use (``export EXP --to mlflow``).

The ledger stays the record; this writes a copy that MLflow's UI, its client and its
``search_runs`` read, nested as the study is:

* one run for the experiment (``ratiocinator.kind = experiment``): the spec's essentials as
  params, run counts and spend as metrics, the paper with its figures and exports as artifacts
  under ``report/``, and the spec as ``spec.yaml``;
* under it, one run per arm (``arm``): its knobs as params, and per metric its summary over the
  arm's succeeded runs (``NAME.mean``, ``.std``, ``.n``, ``.ci95_low``, ``.ci95_high``, and for
  the goal ``.diff_vs_baseline`` and ``.p_holm``), with the verdict against the baseline as tags;
* under each arm, one run per attempt (``attempt``): params = the arm's knobs and the seed,
  metrics = every streamed series with its steps (a series printed without steps gets its
  point index), tags = ``status``, ``failure``, ``arm``, ``commit``, ``replicate``, ``attempt``.
  MLflow's run status follows the ledger's: FINISHED, FAILED, KILLED (interrupted) or RUNNING.

The ledger keeps a point's order and step, not its time: every point carries its run's start
time. Metric names MLflow refuses (characters outside letters, digits and ``_-. /:``) are
renamed with ``_`` and listed in the result. Exporting an experiment a second time into the
same MLflow experiment is refused unless ``replace`` is given, which deletes the earlier copy
first (MLflow keeps deleted runs until ``mlflow gc``), so runs are never doubled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ratiocinator.errors import UsageError
from ratiocinator.extras import require
from ratiocinator.store.ledger import NO_STEP, ArmRow, Ledger, RunRow
from ratiocinator.store.records import ExperimentStatus, RunStatus

if TYPE_CHECKING:
    from ratiocinator.analysis.inference import ArmGoal, BaselineComparison
    from ratiocinator.analysis.summary import ArmSummary

KIND_TAG = "ratiocinator.kind"
EXPERIMENT_TAG = "ratiocinator.experiment"
RUN_ID_TAG = "ratiocinator.run_id"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
GIT_COMMIT_TAG = "mlflow.source.git.commit"

# MLflow's own batch and size limits (mlflow.utils.validation).
METRICS_PER_BATCH = 1000
PARAMS_TAGS_PER_BATCH = 100
TAG_VALUE_CHARS = 5000
PARAM_VALUE_CHARS = 6000
SQLITE = "sqlite:///"
_INVALID_NAME = re.compile(r"[^\w\-. /:]")

RUN_STATUS = {RunStatus.SUCCEEDED: "FINISHED", RunStatus.FAILED: "FAILED", RunStatus.INTERRUPTED: "KILLED"}
EXPERIMENT_STATUS = {
    ExperimentStatus.COMPLETED: "FINISHED", ExperimentStatus.BUDGET_EXHAUSTED: "FINISHED",
    ExperimentStatus.STOPPED: "FINISHED", ExperimentStatus.FAILED: "FAILED", ExperimentStatus.NOT_READY: "FAILED",
    ExperimentStatus.INTERRUPTED: "KILLED", ExperimentStatus.PAUSED: "KILLED",
}


@dataclass(frozen=True)
class MlflowExport:
    """Where an export went and what it wrote."""

    tracking_uri: str
    experiment_name: str
    mlflow_experiment_id: str
    experiment_run_id: str
    arm_runs: int
    attempt_runs: int
    points: int
    replaced: int
    artifacts: tuple[str, ...]
    renamed_metrics: dict[str, str] = field(default_factory=dict)


def _ms(ts: float | None) -> int | None:
    return None if ts is None else int(round(ts * 1000))


def _clip(text: object, limit: int) -> str:
    value = str(text)
    return value if len(value) <= limit else value[: limit - 1] + "…"


class _Names:
    """Metric names MLflow accepts, the same for a name wherever it appears."""

    def __init__(self) -> None:
        self.renamed: dict[str, str] = {}
        self._taken: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name in self.renamed:
            return self.renamed[name]
        clean = _INVALID_NAME.sub("_", name).lstrip("/") or "_"
        while clean in self._taken and self._taken[clean] != name:
            clean += "_"
        self._taken[clean] = name
        if clean != name:
            self.renamed[name] = clean
        return clean


class _Writer:
    """The MLflow calls: one client, batches within MLflow's limits."""

    def __init__(self, client: Any) -> None:
        self.client = client
        entities = require("mlflow.entities", extra="mlflow", purpose="export --to mlflow")
        self.Metric, self.Param, self.RunTag = entities.Metric, entities.Param, entities.RunTag

    def run(self, experiment_id: str, name: str, start: float | None, tags: dict[str, str]) -> str:
        created = self.client.create_run(experiment_id, start_time=_ms(start), run_name=name,
                                         tags={k: _clip(v, TAG_VALUE_CHARS) for k, v in tags.items()})
        return str(created.info.run_id)

    def params(self, run_id: str, params: dict[str, str]) -> None:
        items = [self.Param(k, _clip(v, PARAM_VALUE_CHARS)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + PARAMS_TAGS_PER_BATCH])

    def metrics(self, run_id: str, points: Iterable[tuple[str, float, int, int]]) -> int:
        """(name, value, timestamp ms, step) points, in batches; returns how many."""
        batch: list[Any] = []
        n = 0
        for name, value, timestamp, step in points:
            batch.append(self.Metric(name, value, timestamp, step))
            if len(batch) == METRICS_PER_BATCH:
                self.client.log_batch(run_id, metrics=batch)
                n, batch = n + len(batch), []
        if batch:
            self.client.log_batch(run_id, metrics=batch)
            n += len(batch)
        return n

    def end(self, run_id: str, status: str | None, end: float | None) -> None:
        if status is not None:  # None: still running in the ledger, left RUNNING
            self.client.set_terminated(run_id, status=status, end_time=_ms(end))


def _experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The MLflow experiment's id, created when missing (a local SQLite store's artifacts go beside it)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise UsageError(f"MLflow experiment '{name}' at {tracking_uri} is deleted",
                             hint="restore it (mlflow experiments restore), or pass --mlflow-experiment NAME")
        return str(found.experiment_id)
    location = None
    if tracking_uri.startswith(SQLITE):  # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute.db
        database = unquote(tracking_uri[len(SQLITE):].partition("?")[0])
        if database and database != ":memory:":
            location = (Path(database).resolve().parent / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def _earlier_runs(client: Any, experiment_id: str, ledger_experiment: str) -> list[str]:
    """MLflow run ids of an earlier export of this ledger experiment."""
    ids: list[str] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{EXPERIMENT_TAG}` = '{ledger_experiment}'",
                                  max_results=1000, page_token=token)
        ids.extend(r.info.run_id for r in page)
        token = page.token
        if not token:
            return ids


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _knob_params(env: dict[str, str], args: Sequence[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """The arm's knobs by their own names (``knob.NAME`` where that would clash), and its extra argv."""
    taken = set(reserved)
    params = {(f"knob.{k}" if k in taken else k): v for k, v in env.items()}
    if args:
        params["knob.args" if "args" in params else "args"] = " ".join(args)
    return params


def export_mlflow(ledger: Ledger, experiment_id: str, *, tracking_uri: str | None = None,
                  experiment_name: str | None = None, report_dir: Path | None = None,
                  replace: bool = False) -> MlflowExport:
    """Write ``experiment_id`` from ``ledger`` to MLflow (see the module doc); returns what was written.

    ``tracking_uri`` defaults to MLflow's own (``MLFLOW_TRACKING_URI``, else its default store);
    ``experiment_name`` to the ledger experiment's name; ``report_dir``'s files become the
    experiment run's ``report/`` artifacts.
    """
    mlflow = require("mlflow", extra="mlflow", purpose="export --to mlflow")
    from ratiocinator.analysis.inference import arm_goals
    from ratiocinator.report.paper import analyse

    experiment, spec, runs, finals, inference = analyse(ledger, experiment_id)
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = experiment_name or experiment.name
    mlflow_id = _experiment(client, name, str(uri))
    earlier = _earlier_runs(client, mlflow_id, experiment.id)
    if earlier and not replace:
        raise UsageError(
            f"experiment {experiment.id} is already in MLflow experiment '{name}' at {uri} ({len(earlier)} runs)",
            hint="pass --replace to delete that copy and export again")
    for run_id in earlier:
        client.delete_run(run_id)

    writer = _Writer(client)
    names = _Names()
    summary = inference.summary
    spent, _ = ledger.money(experiment.id)
    base_tags = {EXPERIMENT_TAG: experiment.id}
    top = writer.run(mlflow_id, experiment.id, experiment.created_at, {
        **base_tags, KIND_TAG: "experiment", "status": experiment.status, NOTE_TAG: spec.topic,
        **({GIT_COMMIT_TAG: experiment.commit_sha, "commit": experiment.commit_sha} if experiment.commit_sha else {}),
        **({"best_arm": summary.best_arm} if summary.best_arm else {}),
    })
    writer.params(top, {"goal_metric": spec.goal_metric, "maximize": str(spec.maximize), "design": spec.design,
                        "replicates": str(spec.replicates), "backend": experiment.backend,
                        "baseline": inference.baseline or "", "max_dollars": repr(spec.max_dollars)})
    now = _ms(max([experiment.updated_at, *(r.ended_at or r.started_at for r in runs)])) or 0
    counts = {"runs.attempts": len(runs), "runs.succeeded": summary.status_counts.get(RunStatus.SUCCEEDED, 0),
              "runs.failed": summary.status_counts.get(RunStatus.FAILED, 0), "spent_usd": spent}
    writer.metrics(top, ((k, float(v), now, 0) for k, v in counts.items()))
    artifacts = _artifacts(client, top, report_dir, experiment.spec_text)

    describe = {m: {g.name: g for g in arm_goals(summary, m)} for m in summary.metrics}
    arm_runs: dict[int, str] = {}
    arms = {a.arm.id: a.arm for a in summary.arms}
    for arm in summary.arms:
        row, own = arm.arm, [r for r in runs if r.arm_id == arm.arm.id]
        comparison = inference.comparison(arm.name)
        tags = {**base_tags, KIND_TAG: "arm", PARENT_TAG: top, "arm": arm.name,
                "is_baseline": str(arm.name == inference.baseline).lower(), NOTE_TAG: row.description}
        if comparison is not None:
            tags.update(verdict=comparison.verdict.value, verdict_reason=comparison.reason)
        arm_id = arm_runs[row.id] = writer.run(mlflow_id, arm.name, min((r.started_at for r in own),
                                                                      default=experiment.created_at), tags)
        writer.params(arm_id, _knob_params(row.env, row.args))
        writer.metrics(arm_id, _arm_metrics(arm, describe, comparison, summary.goal_metric, names, now))
        running = any(r.status == RunStatus.RUNNING for r in own)
        writer.end(arm_id, None if running else "FINISHED", max((r.ended_at for r in own if r.ended_at), default=None))

    points = 0
    for run in runs:
        points += _attempt(writer, ledger, mlflow_id, run, arms[run.arm_id], arm_runs[run.arm_id], base_tags,
                           finals.get(run.id, {}), names)
    writer.end(top, EXPERIMENT_STATUS.get(ExperimentStatus(experiment.status)),
               max([experiment.updated_at, *(r.ended_at or 0 for r in runs)]))
    return MlflowExport(str(uri), name, mlflow_id, top, len(arm_runs), len(runs), points, len(earlier),
                        tuple(artifacts), dict(names.renamed))


def _artifacts(client: Any, run_id: str, report_dir: Path | None, spec_text: str) -> list[str]:
    client.log_text(run_id, spec_text, "spec.yaml")
    logged = ["spec.yaml"]
    if report_dir is not None and Path(report_dir).is_dir():
        client.log_artifacts(run_id, str(report_dir), artifact_path="report")
        logged += sorted(f"report/{p.relative_to(report_dir)}" for p in Path(report_dir).rglob("*") if p.is_file())
    return logged


def _arm_metrics(arm: ArmSummary, describe: dict[str, dict[str, ArmGoal]], comparison: BaselineComparison | None,
                 goal: str, names: _Names, timestamp: int) -> Iterator[tuple[str, float, int, int]]:
    """Per metric, its summary over the arm's succeeded runs (the paper's numbers); undefined ones are left out."""
    yield "runs.attempts", float(arm.n_attempts), timestamp, 0
    yield "runs.succeeded", float(arm.n_succeeded), timestamp, 0
    for metric, by_arm in describe.items():
        d = by_arm[arm.name].describe
        key = names(metric)
        values = {"n": float(d.n), "mean": d.mean, "std": d.std,
                  "ci95_low": d.ci.low if d.ci else None, "ci95_high": d.ci.high if d.ci else None}
        if metric == goal and comparison is not None:
            values.update(diff_vs_baseline=comparison.comparison.diff, p_holm=comparison.p_holm)
        for what, value in values.items():
            if _finite_or_none(value) is not None:
                assert value is not None
                yield f"{key}.{what}", float(value), timestamp, 0


def _attempt(writer: _Writer, ledger: Ledger, mlflow_id: str, run: RunRow, arm: ArmRow, parent: str,
             base_tags: dict[str, str], finals: Mapping[str, tuple[float | None, bool]], names: _Names) -> int:
    """One attempt's run: its tags, params and every point of every series it streamed (read run by run)."""
    tags = {**base_tags, KIND_TAG: "attempt", PARENT_TAG: parent, RUN_ID_TAG: str(run.id), "arm": run.arm,
            "status": run.status, "replicate": str(run.replicate), "attempt": str(run.attempt), "host": run.host,
            "commit": run.commit_sha, GIT_COMMIT_TAG: run.commit_sha}
    if run.failure:
        tags["failure"] = run.failure
    if run.reason:
        tags["reason"] = run.reason
    run_id = writer.run(mlflow_id, f"{run.arm} #{run.replicate} try {run.attempt}", run.started_at, tags)
    writer.params(run_id, {**_knob_params(arm.env, arm.args, reserved=("seed",)), "seed": str(run.seed)})
    stamp = _ms(run.started_at) or 0

    def points() -> Iterator[tuple[str, float, int, int]]:
        streamed = ledger.point_names(run.id)
        for metric in streamed:
            key = names(metric)
            for i, (_, step, value) in enumerate(zip(*ledger.series(run.id, metric), strict=True)):
                yield key, float(value), stamp, i if step == NO_STEP else int(step)
        for metric, (value, _) in finals.items():  # a final value no point carried (key_value, regex)
            if metric not in streamed:
                yield names(metric), float("nan") if value is None else value, stamp, 0

    n = writer.metrics(run_id, points())
    writer.end(run_id, RUN_STATUS.get(RunStatus(run.status)), run.ended_at)
    return n
