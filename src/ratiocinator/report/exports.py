"""Plain-file exports of an experiment's runs: ``runs.json``, ``runs.csv`` and ``results.tsv``.

The ledger is the record, but people analyse results with pandas, spreadsheets, ``jq``
and the autoresearch ``results.tsv`` convention. These exports are flat projections of
the ledger, one row per run attempt (every status, every attempt), so nothing is hidden
and nothing is computed: statistics live in ``analysis.py``. Non-finite final metric
values are never written as numbers (strict JSON has no NaN; a ``nan`` cell silently
becomes a float in most CSV readers): they are blank/null and named in
``nonfinite_metrics``. Every file is written atomically, so a reader never sees half of
one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ratiocinator.store.ledger import ArmRow, Ledger, RunRow

RUN_COLUMNS: tuple[str, ...] = (
    "run_id",
    "experiment_id",
    "arm",
    "description",
    "iteration",
    "is_baseline",
    "replicate",
    "seed",
    "attempt",
    "status",
    "failure",
    "reason",
    "exit_code",
    "signal",
    "started_at",
    "ended_at",
    "duration_s",
    "host",
    "slot",
    "commit",
    "cost_usd",
    "log_dir",
    "out_dir",
    "nonfinite_metrics",
)
"""The fixed leading columns of ``runs.csv``, in order.

They are the scalar fields of a run record (see :func:`run_records`) plus
``nonfinite_metrics``: the names of the metrics whose final value was NaN or infinite,
joined with ``;`` (their ``metric.NAME`` cells are empty). After them come
``knob.NAME`` (one per knob any arm sets, sorted), ``factor.NAME`` (sorted), ``args``
(the arm's extra runner argv, ``shlex.join``-ed) and ``metric.NAME`` (final values,
sorted). Empty cell = no value; booleans are ``true``/``false``; floats are written
with ``repr`` so they round-trip exactly.
"""

RESULTS_STATUSES = ("keep", "discard")
CRASH = "crash"

# Everything str.splitlines() breaks on, plus tab: none may survive into a TSV cell.
_TSV_BREAKS = re.compile(r"[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
# Final metrics that report memory, in order of preference, with their divisor to GB.
_MEMORY_METRICS: tuple[tuple[str, float], ...] = (
    ("memory_gb", 1.0),
    ("peak_memory_gb", 1.0),
    ("peak_vram_mb", 1024.0),
    ("peak_memory_mb", 1024.0),
)

Finals = Mapping[str, tuple[float | None, bool]]


def _iso_utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class LedgerRows:
    """What every export reads: runs (id order), arms by id, final metrics by run id.

    Read once and passed to each writer, since reading 10,000 runs is most of an export's cost.
    """

    runs: list[RunRow]
    arms: dict[int, ArmRow]
    finals: Mapping[int, Finals]


def load_rows(ledger: Ledger, experiment_id: str) -> LedgerRows:
    ledger.experiment(experiment_id)  # an unknown id is an error, not an empty export
    arms = {a.id: a for a in ledger.arms(experiment_id)}
    return LedgerRows(ledger.runs(experiment_id), arms, ledger.run_metrics(experiment_id))


def _load(ledger: Ledger, experiment_id: str,
          rows: LedgerRows | None) -> tuple[list[RunRow], dict[int, ArmRow], Mapping[int, Finals]]:
    rows = rows or load_rows(ledger, experiment_id)
    return rows.runs, rows.arms, rows.finals


def _record(run: RunRow, arm: ArmRow, finals: Finals) -> dict[str, Any]:
    names = sorted(finals)
    return {
        "run_id": run.id,
        "experiment_id": run.experiment_id,
        "arm": run.arm,
        "description": arm.description,
        "iteration": arm.iteration,
        "is_baseline": arm.is_baseline,
        "replicate": run.replicate,
        "seed": run.seed,
        "attempt": run.attempt,
        "status": run.status,
        "failure": run.failure,
        "reason": run.reason,
        "exit_code": run.exit_code,
        "signal": run.signal,
        "started_at": _iso_utc(run.started_at),
        "ended_at": _iso_utc(run.ended_at),
        "duration_s": run.duration_s,
        "host": run.host,
        "slot": run.slot,
        "commit": run.commit_sha,
        "cost_usd": run.cost,
        "knobs": dict(arm.env),
        "args": list(arm.args),
        "factors": dict(arm.factors),
        "metrics": {name: finals[name][0] if finals[name][1] else None for name in names},
        "nonfinite_metrics": [name for name in names if not finals[name][1]],
        "log_dir": run.log_dir,
        "out_dir": run.out_dir,
    }


def run_records(ledger: Ledger, experiment_id: str, rows: LedgerRows | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per run attempt of the experiment, in run id order.

    Fields: run_id, experiment_id, arm, description (the arm's), iteration,
    is_baseline, replicate, seed, attempt, status, failure (None unless failed or
    interrupted with a class), reason, exit_code, signal, started_at / ended_at
    (ISO-8601 UTC; ended_at None while unfinished), duration_s, host, slot, commit,
    cost_usd, knobs (the arm's env), args (the arm's extra argv), factors (the arm's
    factor levels), metrics ({name: final value, None when non-finite}),
    nonfinite_metrics (names whose final value was NaN/inf), log_dir, out_dir.
    """
    runs, arms, finals = _load(ledger, experiment_id, rows)
    return [_record(run, arms[run.arm_id], finals.get(run.id, {})) for run in runs]


def write_runs_json(ledger: Ledger, experiment_id: str, path: Path, rows: LedgerRows | None = None) -> None:
    """``{"experiment_id": ..., "runs": [record, ...]}`` as strict JSON (no NaN), one run per line."""
    write_atomic(Path(path),
                 json_records({"experiment_id": experiment_id}, "runs", run_records(ledger, experiment_id, rows)))


def json_records(head: dict[str, Any], name: str, records: Sequence[Any]) -> str:
    """``head`` plus ``name: records`` as strict JSON with one record per line.

    Line-per-record diffs well and reads in any JSON parser; it also keeps to
    the C encoder, which ``indent=`` gives up (10x slower on 10,000 runs).
    """
    def dump(value: Any) -> str:
        return json.dumps(value, allow_nan=False, ensure_ascii=False)

    fields = [f"{dump(k)}: {dump(v)}" for k, v in head.items()]
    body = ",\n".join(dump(r) for r in records)
    fields.append(f"{dump(name)}: [\n{body}\n]" if records else f"{dump(name)}: []")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_runs_csv(ledger: Ledger, experiment_id: str, path: Path, rows: LedgerRows | None = None) -> None:
    """One row per run attempt; the columns are documented at :data:`RUN_COLUMNS`."""
    rows = rows or load_rows(ledger, experiment_id)
    records = run_records(ledger, experiment_id, rows)
    knobs = sorted({k for arm in rows.arms.values() for k in arm.env})
    factors = sorted({f for arm in rows.arms.values() for f in arm.factors})
    metrics = sorted({m for r in records for m in r["metrics"]})
    header = [*RUN_COLUMNS, *(f"knob.{k}" for k in knobs), *(f"factor.{f}" for f in factors), "args",
              *(f"metric.{m}" for m in metrics)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for r in records:
        scalars = {**r, "nonfinite_metrics": ";".join(r["nonfinite_metrics"])}
        writer.writerow([
            *(_cell(scalars[c]) for c in RUN_COLUMNS),
            *(_cell(r["knobs"].get(k)) for k in knobs),
            *(_cell(r["factors"].get(f)) for f in factors),
            shlex.join(r["args"]),
            *(_cell(r["metrics"].get(m)) for m in metrics),
        ])
    write_atomic(Path(path), buffer.getvalue())


def _flatten(text: str) -> str:
    """No tab or line break survives: each run of them becomes one space."""
    return _TSV_BREAKS.sub(" ", text)


def _memory_gb(finals: Finals) -> float | None:
    for name, per_gb in _MEMORY_METRICS:
        value, finite = finals.get(name, (None, False))
        if finite and value is not None:
            return value / per_gb
    return None


def _crash_cause(run: RunRow, finals: Finals, goal_metric: str) -> str:
    """``class: reason`` of a run that has no result, in the ledger's failure vocabulary."""
    if run.status == "succeeded":  # succeeded, yet no finite value of *this* goal metric
        kind = "nan_divergence" if goal_metric in finals else "no_metrics"
        reason = run.reason or (f"the final {goal_metric} is not finite" if goal_metric in finals
                                else f"no {goal_metric} was reported")
    else:
        kind, reason = run.failure or run.status, run.reason
    return f"{kind}: {reason}" if reason else kind


def results_tsv_rows(
    ledger: Ledger, experiment_id: str, *, goal_metric: str, arm_status: Mapping[str, str],
    rows: LedgerRows | None = None
) -> list[tuple[str, str, str, str, str]]:
    """The data rows of ``results.tsv`` (commit, goal, memory_gb, status, description), one per run in id order.

    A run is a ``crash`` unless it succeeded with a finite ``goal_metric``; every other
    run takes its arm's status from ``arm_status`` ("keep" or "discard"), which must
    name every such arm.
    """
    for name, status in arm_status.items():
        if status not in RESULTS_STATUSES:
            raise ValueError(f"arm_status for arm '{name}' is {status!r}; it must be 'keep' or 'discard'")
    runs, arms, all_finals = _load(ledger, experiment_id, rows)
    out: list[tuple[str, str, str, str, str]] = []
    for run in runs:
        arm = arms[run.arm_id]
        finals = all_finals.get(run.id, {})
        goal, finite = finals.get(goal_metric, (None, False))
        description = f"{arm.name}: {arm.description}" if arm.description else arm.name
        description += f" (replicate {run.replicate}, seed {run.seed})"
        if run.status == "succeeded" and finite and goal is not None:
            if arm.name not in arm_status:
                raise ValueError(
                    f"arm_status has no entry for arm '{arm.name}' (run {run.id} succeeded); give 'keep' or 'discard'"
                )
            memory = _memory_gb(finals)
            row = (f"{goal:.6f}", f"{0.0 if memory is None else memory:.1f}", arm_status[arm.name])
        else:
            description += f" — {_crash_cause(run, finals, goal_metric)}"
            row = (f"{0.0:.6f}", f"{0.0:.1f}", CRASH)
        out.append((run.commit_sha[:7], row[0], row[1], row[2], _flatten(description)))
    return out


def write_results_tsv(
    ledger: Ledger, experiment_id: str, path: Path, *, goal_metric: str, arm_status: Mapping[str, str],
    rows: LedgerRows | None = None,
) -> None:
    """``results.tsv`` in the autoresearch format: a header, then :func:`results_tsv_rows`."""
    header = ("commit", _flatten(goal_metric), "memory_gb", "status", "description")
    lines = results_tsv_rows(ledger, experiment_id, goal_metric=goal_metric, arm_status=arm_status, rows=rows)
    write_atomic(Path(path), "".join("\t".join(line) + "\n" for line in (header, *lines)))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A reader (or a crash) never sees half a file; text is written as UTF-8.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & umask, like open()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
