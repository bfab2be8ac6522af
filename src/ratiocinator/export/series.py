"""Every streamed metric point of an experiment as one long table: ``series.csv`` or ``series.parquet``.

The ledger keeps each point a runner printed (seq, step, value), packed in chunks; pandas, R,
DuckDB and spreadsheets want rows. One row per (run attempt, metric, point), in run id order,
then metric name, then print order, with the run's arm, replicate, seed, attempt and status, so
a learning curve is one ``groupby`` away and failed or interrupted attempts are not hidden.

``step`` is empty (null) where the runner printed none; ``seq`` is the point's place among
everything the run printed. Values keep NaN and ±inf: a diverging curve is data, written as
``nan``, ``inf`` and ``-inf`` in CSV (Python's ``float`` and pandas read them back) and as
IEEE values in Parquet. Both files are written to a temporary file and renamed into place, so
a reader never sees half of one. CSV needs nothing beyond the standard library; Parquet needs
pyarrow (the ``pandas`` extra).
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ratiocinator.extras import require
from ratiocinator.store.ledger import NO_STEP, Ledger, RunRow

SERIES_COLUMNS: tuple[str, ...] = (
    "experiment_id", "run_id", "arm", "replicate", "seed", "attempt", "status", "metric", "seq", "step", "value",
)
"""The columns of ``series.csv`` and ``series.parquet``, in order."""


@dataclass(frozen=True)
class RunSeries:
    """One metric of one run attempt: every point in print order, NaN and ±inf kept."""

    run: RunRow
    metric: str
    seqs: np.ndarray  # int64
    steps: np.ndarray  # int64; NO_STEP where the runner printed no step
    values: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.values)

    @property
    def step_mask(self) -> np.ndarray:
        """True where the point has a step."""
        return self.steps != NO_STEP

    def step_list(self) -> list[int | None]:
        return [None if s == NO_STEP else int(s) for s in self.steps]


def run_series(ledger: Ledger, experiment_id: str, *, metrics: Collection[str] | None = None,
               run_ids: Collection[int] | None = None) -> Iterator[RunSeries]:
    """Each run's series (all attempts, every status) in run id order, then metric name.

    ``metrics`` / ``run_ids`` keep only those; an unknown experiment id is an error.
    """
    ledger.experiment(experiment_id)
    for run in ledger.runs(experiment_id):
        if run_ids is not None and run.id not in run_ids:
            continue
        for name in ledger.point_names(run.id):
            if metrics is not None and name not in metrics:
                continue
            seqs, steps, values = ledger.series(run.id, name)
            yield RunSeries(run, name, seqs, steps, values)


@contextmanager
def _replaced(path: Path, *, binary: bool) -> Iterator[tuple[Path, IO[Any]]]:
    """A temporary file beside ``path``, fsynced and renamed over it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with (open(tmp, "wb") if binary else open(tmp, "w", newline="", encoding="utf-8")) as fh:
            yield tmp, fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_series_csv(ledger: Ledger, experiment_id: str, path: Path,
                     metrics: Collection[str] | None = None) -> int:
    """Write ``series.csv`` (columns: `SERIES_COLUMNS`); returns the number of points written."""
    points = 0
    with _replaced(Path(path), binary=False) as (_, fh):
        writer = csv.writer(fh)
        writer.writerow(SERIES_COLUMNS)
        for s in run_series(ledger, experiment_id, metrics=metrics):
            r = s.run
            head = (experiment_id, r.id, r.arm, r.replicate, r.seed, r.attempt, r.status, s.metric)
            writer.writerows(
                (*head, int(q), "" if t == NO_STEP else int(t), repr(float(v)))
                for q, t, v in zip(s.seqs, s.steps, s.values, strict=True)
            )
            points += len(s)
    return points


def write_series_parquet(ledger: Ledger, experiment_id: str, path: Path,
                         metrics: Collection[str] | None = None) -> int:
    """Write ``series.parquet`` (columns: `SERIES_COLUMNS`, one row group per run and metric); returns points."""
    pa = require("pyarrow", extra="pandas", purpose="export --to parquet")
    pq = require("pyarrow.parquet", extra="pandas", purpose="export --to parquet")
    schema = pa.schema([
        ("experiment_id", pa.string()), ("run_id", pa.int64()), ("arm", pa.string()), ("replicate", pa.int64()),
        ("seed", pa.int64()), ("attempt", pa.int64()), ("status", pa.string()), ("metric", pa.string()),
        ("seq", pa.int64()), ("step", pa.int64()), ("value", pa.float64()),
    ])
    points = 0
    with _replaced(Path(path), binary=True) as (_, fh):
        writer = pq.ParquetWriter(fh, schema)
        try:
            for s in run_series(ledger, experiment_id, metrics=metrics):
                n, r = len(s), s.run
                columns = [
                    pa.array([experiment_id] * n, pa.string()), pa.array(np.full(n, r.id), pa.int64()),
                    pa.array([r.arm] * n, pa.string()), pa.array(np.full(n, r.replicate), pa.int64()),
                    pa.array(np.full(n, r.seed), pa.int64()), pa.array(np.full(n, r.attempt), pa.int64()),
                    pa.array([r.status] * n, pa.string()), pa.array([s.metric] * n, pa.string()),
                    pa.array(s.seqs, pa.int64()), pa.array(s.steps, pa.int64(), mask=~s.step_mask),
                    pa.array(s.values, pa.float64()),
                ]
                writer.write_batch(pa.record_batch(columns, schema=schema))
                points += n
        finally:
            writer.close()
    return points


__all__ = ["SERIES_COLUMNS", "RunSeries", "run_series", "write_series_csv", "write_series_parquet"]
