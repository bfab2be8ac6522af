"""`Research(...).run()` in-process over the in-memory backend: spec to paper, interruption, resume.

The pipeline is the real one (commit resolution and checkout of a real git repository,
knob discovery, planning, the executor, the SQLite ledger, the report); only the runner
processes are scripted (`memory_backend`). The readiness review is skipped (``check=False``):
its smoke runs are real processes, covered by the CLI tests. So is the PDF: these tests run
as on a machine without pdflatex (the paper's .md, .html and .tex are written, the PDF is
not); test_paper.py compiles one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import Study
from memory_backend import Launch, MemoryBackend, Script, metrics
from ratiocinator.execution.executor import ProgressSink
from ratiocinator.pipeline import Research, ResearchOutcome
from ratiocinator.report import publish
from ratiocinator.spec.models import load_spec

RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
K="${K:-1}"
echo "METRICS: {\\"score\\": $(( K * 10 + ${RATIOCINATOR_SEED:-0} ))}"
"""


class Messages(ProgressSink):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def _score(launch: Launch) -> Script:
    """What RUNNER prints, scripted: score = K * 10 + seed, after a few loss points."""
    k = int(launch.env["K"])
    return Script(stdout=[metrics(step=s, loss=1.0 / s) for s in (1, 2, 3)] + [metrics(score=k * 10 + launch.seed)],
                  seconds=0.02)


def _research(study: Study, spec: Path, backend: MemoryBackend,
              progress: ProgressSink | None = None) -> ResearchOutcome:
    return Research(load_spec(spec), study.home, check=False, backend=backend, environ={}, progress=progress).run()


@pytest.fixture(autouse=True)
def no_pdflatex(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without LaTeX: the report skips the PDF and says why."""
    monkeypatch.setattr(publish, "LATEX_ENGINE", "pdflatex-not-installed-here")


@pytest.fixture
def spec(study: Study) -> Path:
    study.commit({"run.sh": RUNNER})
    return study.spec(factors={"K": [1, 2, 3]}, replicates=2, concurrency=2, seed_env=None,
                      hardware={"price_per_hour": 36.0}, max_dollars=50)


def test_research_runs_the_spec_to_a_paper_and_a_rerun_runs_nothing(study: Study, spec: Path) -> None:
    backend = MemoryBackend(_score, home=study.home)
    outcome = _research(study, spec, backend)
    assert (outcome.status, outcome.succeeded, outcome.failed, outcome.exit_code) == ("completed", 6, 0, 0)
    ledger = study.ledger()
    exp = ledger.experiment(outcome.experiment_id)
    head = study.repo.head()
    assert exp.status == "completed" and exp.commit_sha == head
    runs = ledger.runs(exp.id)
    assert Counter((r.arm, r.replicate, r.status) for r in runs) == Counter(
        {(f"K={k}", rep, "succeeded"): 1 for k in (1, 2, 3) for rep in (0, 1)})
    finals = ledger.run_metrics(exp.id)
    assert {(r.arm, r.replicate): finals[r.id]["score"][0] for r in runs} == {
        (f"K={k}", rep): k * 10 + rep for k in (1, 2, 3) for rep in (0, 1)}
    assert all(len(ledger.points(r.id, "loss")) == 3 and r.commit_sha == head for r in runs)
    # the workspace is the real checkout of the resolved commit, and the runner starts from it
    assert backend.prepared == [head] and len(backend.released) == 1
    checkout = Path(backend.launches[0].request.cwd)
    assert checkout.name == head and (checkout / "run.sh").read_text() == (study.repo.path / "run.sh").read_text()
    assert all(launch.request.argv == (str(checkout / "run.sh"),) for launch in backend.launches)
    assert backend.peak_live == 2
    # money: every reservation settled at what the runs cost
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and ledger.open_charges(exp.id) == []
    assert spent == pytest.approx(sum(r.cost for r in runs)) and 0 < spent <= 6 * 36.0 * 30 / 3600
    kinds = [e["kind"] for e in ledger.events(exp.id)]
    assert "readiness_skipped" in kinds and "plan" in kinds
    # the paper, from the ledger
    assert outcome.report is not None and outcome.report.pdf is None and "not installed" in outcome.report.pdf_note
    report = study.home / "reports" / exp.id
    assert all((report / name).exists() for name in ("paper.md", "paper.html", "paper.tex", "facts.json", "runs.csv"))
    paper = (report / "paper.md").read_text()
    assert all(f"K={k}" in paper for k in (1, 2, 3))
    assert len((report / "runs.csv").read_text().strip().splitlines()) == 1 + 6

    again = MemoryBackend(_score, home=study.home)
    rerun = _research(study, spec, again)
    assert rerun.experiment_id == exp.id and rerun.status == "completed" and "already finished" in rerun.message
    assert (rerun.succeeded, rerun.failed) == (6, 0) and rerun.report is not None
    assert again.launches == [] and again.prepared == []
    assert len(study.ledger().runs(exp.id)) == 6
    ledger.close()


def test_an_interrupted_research_resumes_without_rerunning_finished_runs(study: Study, spec: Path) -> None:
    def interrupted_at_the_fourth(launch: Launch) -> Script:
        if len(first.launches) == 4:
            first.interrupt()  # as SIGTERM does: the orchestrator's task is cancelled
            return Script(seconds=30)
        return _score(launch)

    first = MemoryBackend(interrupted_at_the_fourth, home=study.home, slots=1)
    outcome = _research(study, spec, first)
    assert (outcome.status, outcome.exit_code, outcome.succeeded) == ("interrupted", 130, 3)
    ledger = study.ledger()
    exp = ledger.experiment(outcome.experiment_id)
    assert exp.status == "interrupted"
    before = {(r.arm, r.replicate): r for r in ledger.runs(exp.id)}
    assert [(key, r.status) for key, r in before.items()] == [
        (("K=1", 0), "succeeded"), (("K=2", 0), "succeeded"), (("K=3", 0), "succeeded"), (("K=1", 1), "interrupted")]
    assert first.handles[before[("K=1", 1)].id].cancelled and len(first.released) == 1
    assert ledger.open_charges(exp.id) == [] and ledger.money(exp.id)[1] == 0
    assert outcome.report is None  # no paper for an interrupted experiment

    second = MemoryBackend(_score, home=study.home)
    progress = Messages()
    resumed = _research(study, spec, second, progress)
    assert resumed.experiment_id == exp.id
    assert (resumed.status, resumed.succeeded, resumed.failed) == ("completed", 6, 0)
    assert any(line.startswith(f"resuming {exp.id}") for line in progress.lines)
    # only what had not finished ran again: the interrupted replicate as attempt 2, and the rest
    assert sorted((x.arm, x.seed) for x in second.launches) == [("K=1", 1), ("K=2", 1), ("K=3", 1)]
    runs = ledger.runs(exp.id)
    assert Counter((r.arm, r.replicate) for r in runs if r.status == "succeeded") == Counter(
        {(f"K={k}", rep): 1 for k in (1, 2, 3) for rep in (0, 1)})
    assert all(ledger.run(r.id) == r for r in before.values() if r.status == "succeeded")  # kept as they were
    retried = next(r for r in runs if (r.arm, r.replicate, r.status) == ("K=1", 1, "succeeded"))
    assert retried.attempt == 2 and ledger.run(before[("K=1", 1)].id).status == "interrupted"
    assert ledger.experiment(exp.id).status == "completed" and (study.home / "reports" / exp.id / "paper.md").exists()
    assert ledger.open_charges(exp.id) == []
    ledger.close()


def test_research_stops_early_when_the_first_runs_fail_alike(study: Study, spec: Path) -> None:
    broken = Script(stderr=["Traceback (most recent call last):", '  File "run.py", line 3, in <module>',
                            "ZeroDivisionError: division by zero"], exit_code=1)
    backend = MemoryBackend(broken, home=study.home, slots=1)
    outcome = _research(study, spec, backend)
    assert (outcome.status, outcome.succeeded, outcome.failed, outcome.exit_code) == ("stopped", 0, 3, 1)
    assert "the first 3 runs all failed with runtime_error" in outcome.message
    assert len(backend.launches) == 3
    ledger = study.ledger()
    assert ledger.experiment(outcome.experiment_id).status == "stopped"
    assert {r.failure for r in ledger.runs(outcome.experiment_id)} == {"runtime_error"}
    assert (study.home / "reports" / outcome.experiment_id / "paper.md").exists()  # the failures are reported
    ledger.close()


def test_research_ends_budget_exhausted_when_the_money_runs_out(study: Study) -> None:
    study.commit({"run.sh": RUNNER})
    # $3600/h with a 1 s timeout: $1 reserved per run; $2.50 holds two reservations, not the third slot's
    spec = study.spec(factors={"K": [1, 2, 3]}, replicates=2, concurrency=3, train_timeout_s=1,
                      hardware={"price_per_hour": 3600.0}, max_dollars=2.5)
    backend = MemoryBackend(lambda launch: Script(stdout=[metrics(score=int(launch.env["K"]) * 10 + launch.seed)],
                                                  seconds=0.1), home=study.home)
    outcome = _research(study, spec, backend)
    assert outcome.status == "budget_exhausted"
    assert outcome.message.startswith("budget: the next run could cost up to $1")
    assert (outcome.succeeded, outcome.failed, outcome.exit_code) == (2, 0, 0)
    ledger = study.ledger()
    runs = ledger.runs(outcome.experiment_id)
    spent, reserved = ledger.money(outcome.experiment_id)
    assert [(r.arm, r.status) for r in runs] == [("K=1", "succeeded"), ("K=2", "succeeded")]
    assert len(backend.launches) == 2
    assert reserved == 0 and 0 < spent <= 2.5 and ledger.open_charges(outcome.experiment_id) == []
    assert ledger.experiment(outcome.experiment_id).status == "budget_exhausted"
    assert (study.home / "reports" / outcome.experiment_id / "paper.md").exists()
    ledger.close()
