"""A real ledger file filled with planted results, for testing what the paper reports.

The experiment, arms and runs go through the ledger's own write methods, exactly as
the pipeline records them; only the values are chosen by the test.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import yaml

from ratiocinator.execution.metrics import MetricPoint
from ratiocinator.planning.plan import PlannedArm, factor_arm_name
from ratiocinator.store.ledger import Ledger


def spec_text(**overrides: object) -> str:
    """A valid spec; an override of None removes the key."""
    data: dict[str, object] = {
        "name": "planted",
        "topic": "Does a larger learning rate help a tiny MLP?",
        "goal_metric": "acc",
        "maximize": True,
        "repo_url": "https://example.org/tiny-mlp.git",
        "repo_branch": "main",
        "runner_script": "train.py",
        "paper_title": "Planted Means: A Report Test",
        "replicates": 3,
        "max_dollars": 5,
        "train_timeout_s": 120,
        "hardware": {"gpu": "RTX 4090", "num_gpus": 1, "price_per_hour": 0.5},
        "arms": [{"name": "base", "env": {"LR": "0.1"}}, {"name": "fast", "env": {"LR": "0.3"}}],
    }
    data.update(overrides)
    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False)


class PlantedStudy:
    """One experiment in ``home/ledger.db`` (so the CLI finds it with ``--home``); ``spec`` overrides spec keys."""

    def __init__(self, home: Path, planned: list[PlannedArm], *, baseline_arm: str, exp_id: str = "exp-1",
                 **spec: object) -> None:
        self.home = home
        self.ledger = Ledger(home / "ledger.db")
        self.text = spec_text(**spec)
        self.sha = hashlib.sha256(self.text.encode()).hexdigest()
        self.id = exp_id
        self.ledger.create_experiment(id=exp_id, name=str(spec.get("name", "planted")), spec_path="planted.yaml",
                                      spec_text=self.text, spec_sha256=self.sha, backend="local")
        self.ledger.update_experiment(exp_id, commit_sha="c0ffee1234", status="completed")
        self.ledger.record_arms(exp_id, 1, planned, baseline=baseline_arm)
        self.arm_ids = {a.name: a.id for a in self.ledger.arms(exp_id)}
        self.replicates: dict[str, int] = {}

    @classmethod
    def open(cls, home: Path, exp_id: str) -> PlantedStudy:
        """An experiment already in ``home/ledger.db``, to add runs to."""
        study = cls.__new__(cls)
        study.home, study.id = home, exp_id
        study.ledger = Ledger(home / "ledger.db")
        experiment = study.ledger.experiment(exp_id)
        study.text, study.sha = experiment.spec_text, experiment.spec_sha256
        study.arm_ids = {a.name: a.id for a in study.ledger.arms(exp_id)}
        study.replicates = {}
        for run in study.ledger.runs(exp_id):
            study.replicates[run.arm] = max(study.replicates.get(run.arm, 0), run.replicate + 1)
        return study

    @classmethod
    def arms(cls, **envs: dict[str, str]) -> list[PlannedArm]:
        return [PlannedArm(name=name, env=env) for name, env in envs.items()]

    @classmethod
    def grid(cls, **factors: list[str]) -> list[PlannedArm]:
        names = list(factors)
        out = []
        for values in itertools.product(*factors.values()):
            levels = dict(zip(names, values, strict=True))
            out.append(PlannedArm(name=factor_arm_name(levels), env=dict(levels), factors=dict(levels)))
        return out

    def run(
        self,
        arm: str,
        *,
        final: dict[str, float] | None = None,
        curve: dict[str, list[float]] | None = None,
        status: str = "succeeded",
        failure: str | None = None,
        reason: str = "",
        exit_code: int | None = 0,
        signal: int | None = None,
        stderr: str | None = None,
        stdout: str | None = None,
        cost: float | None = 0.01,
    ) -> int:
        replicate = self.replicates.get(arm, 0)
        self.replicates[arm] = replicate + 1
        run_id = self.ledger.start_run(
            experiment_id=self.id, arm_id=self.arm_ids[arm], replicate=replicate, seed=replicate, host="localhost",
            slot="slot0", commit_sha="c0ffee1234", env={}, argv=["python", "/ck/train.py"], run_root=self.home / "runs",
        )
        log_dir = Path(self.ledger.run(run_id).log_dir)
        log_dir.mkdir(parents=True)
        for name, text in (("stderr.log", stderr), ("stdout.log", stdout)):
            if text is not None:
                (log_dir / name).write_text(text)
        points = [MetricPoint(name=n, value=v, step=10 * i, seq=i) for n, values in (curve or {}).items()
                  for i, v in enumerate(values)]
        self.ledger.add_points(run_id, points)
        final = final or {}
        self.ledger.finish_run(run_id, status=status, failure=failure, reason=reason, exit_code=exit_code,
                               signal=signal,
                               final=final, counts={n: 1 for n in final}, cost=cost)
        return run_id

    def plant(self, values: dict[str, list[float]], metric: str = "acc", *,
              curves: bool = True) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = {}
        for arm, finals in values.items():
            for value in finals:
                curve = {metric: list(np.linspace(0.1, value, 5))} if curves else None
                ids.setdefault(arm, []).append(self.run(arm, final={metric: value}, curve=curve))
        return ids

    @property
    def report_dir(self) -> Path:
        return self.home / "reports" / self.id
