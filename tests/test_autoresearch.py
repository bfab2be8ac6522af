"""Autoresearch: the keep/discard loop over code edits, against real git repositories and real runs.

The target repository (tests/data/autoresearch/target) has a tiny `train.py` that prints the
seed contract's `val_bpb:` and `peak_vram_mb:` lines. Its val_bpb is a fixed function of
config.py plus seed noise of -0.002, 0 or +0.002 picked by (hash of config.py + how many
times that exact config ran before) mod 3, with the run counter outside the repository:
any three runs of one config average to its true value, and a change that only moves the
seed draw (patch 06) looks better on its first run. The patches: 01 improves, 02 worsens,
03 crashes, 04 hangs past the hard timeout (with a child process), 05 edits the protected
evaluate.py, 06 is pure seed noise, 07 improves again.
"""

from __future__ import annotations

import fcntl
import html
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import CLI, process_alive
from gitrepo import GIT_ENV, GitRepo, git
from llmserver import LlmServer, Reply
from ratiocinator.autoresearch import AutoResearch, load_program
from ratiocinator.autoresearch.decide import noise_aware, noise_floor, strictly_better
from ratiocinator.autoresearch.engine import Engine, RunOutcome, RunRequest
from ratiocinator.autoresearch.gitops import Change, Git
from ratiocinator.autoresearch.guard import check_edit, matches, protected_hashes
from ratiocinator.autoresearch.log import apply_attempt
from ratiocinator.autoresearch.store import Attempt, Store
from ratiocinator.errors import SpecError, UsageError
from ratiocinator.store.ledger import Ledger

DATA = Path(__file__).parent / "data" / "autoresearch"
TARGET = DATA / "target"
PATCHES = DATA / "patches"


@dataclass
class Lab:
    """A target repository, patch directories, program files and a --home, in one temp dir."""

    root: Path
    repo: GitRepo
    home: Path
    base: str

    def env(self, counters: str = "counters", **extra: str) -> dict[str, str]:
        return {**os.environ, **GIT_ENV, "AR_COUNTER_DIR": str(self.root / counters),
                "AR_PID_FILE": str(self.root / "pids"), **extra}

    def patches(self, name: str, *files: str, extra: dict[str, str] | None = None) -> Path:
        """A patch directory holding the named data patches (by prefix) and any extra ones."""
        directory = self.root / name
        directory.mkdir()
        for prefix in files:
            (source,) = PATCHES.glob(f"{prefix}-*")
            shutil.copy(source, directory / source.name)
        for file, text in (extra or {}).items():
            (directory / file).write_text(text)
        return directory

    def program(self, name: str = "program", *, patches: Path | None = None, **fields: object) -> Path:
        data: dict[str, object] = {
            "repo": "repo",
            "tag": name,
            "editable": ["config.py"],
            "protected": ["prepare.py", "evaluate.py"],
            "run": f"{sys.executable} train.py > run.log 2>&1",
            "log_file": "run.log",
            "metric": {"name": "val_bpb", "direction": "lower"},
            "secondary_metrics": ["peak_vram_mb"],
            "budget_s": 1,
            "timeout_s": 2,
            "agent": {"kind": "patches", "patches": str(patches or PATCHES)},
            "pass_env": ["AR_*"],  # runs inherit the contract's allow-list, plus these
        }
        data.update(fields)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "--home", str(self.home), *args], capture_output=True, text=True,
                              timeout=timeout, env=env or self.env(), cwd=self.root, check=False)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*CLI, "--home", str(self.home), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(), cwd=self.root)

    def run(self, program: Path, **env: str) -> object:
        return AutoResearch(load_program(program), self.home, environ=self.env(**env)).run()

    def attempts(self, tag: str) -> list[Attempt]:
        store = Store(Ledger(self.home / "ledger.db"))
        try:
            session = store.session_by_tag(tag)
            assert session is not None
            return store.attempts(session.id)
        finally:
            store.close()

    def kept_history(self, tag: str) -> list[str]:
        """The shared branch's commits after the base, oldest first."""
        return self.repo.git("rev-list", "--reverse", "--first-parent", f"autoresearch/{tag}", f"^{self.base}").split()

    def results(self, tag: str) -> str:
        return (self.home / "autoresearch" / tag / "results.tsv").read_text()


def shown_text(markdown: str) -> str:
    """Markdown as read: fact links reduced to the numbers they show."""
    return re.sub(r"\[([^\]]*)\]\(#f[0-9]+\)", r"\1", markdown)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


def new_lab(tmp_path: Path) -> Lab:
    repo = GitRepo(tmp_path / "repo")
    for source in TARGET.iterdir():
        shutil.copy(source, repo.path / source.name)
    base = repo.commit({}, "base")
    return Lab(root=tmp_path, repo=repo, home=tmp_path / "home", base=base)


def make_patch(root: Path, comment: str, edits: dict[str, str], file: str = "config.py") -> str:
    """A patch against the target's base content, made by git (so its line numbers are right)."""
    scratch = GitRepo(root / f"scratch-{len(list(root.glob('scratch-*')))}")
    for source in TARGET.iterdir():
        shutil.copy(source, scratch.path / source.name)
    scratch.commit({}, "base")
    text = (scratch.path / file).read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    (scratch.path / file).write_text(text)
    return f"# {comment}\n{scratch.git('diff')}\n"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_attempt(lab: Lab, tag: str, ref: str) -> Attempt | None:
    """The attempt of patch ``ref`` once its run has started (pid recorded and the pid file written)."""
    if not (lab.home / "ledger.db").exists():
        return None
    try:
        attempts = lab.attempts(tag)
    except AssertionError:
        return None
    found = [a for a in attempts if a.agent_ref == ref and a.pid is not None]
    pids = lab.root / "pids"
    return found[0] if found and pids.exists() and pids.read_text().count("\n") >= 1 else None


# -- the check: the whole loop over the patch directory ------------------------------------


@pytest.mark.subprocess
def test_patch_loop_keeps_exactly_the_improvements(lab: Lab) -> None:
    program = lab.program("t")
    done = lab.cli("autoresearch", str(program))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "the agent gave up: no patches left" in done.stdout

    attempts = lab.attempts("t")
    by_ref = {a.agent_ref: a for a in attempts}
    assert [a.status for a in attempts] == ["baseline", "keep", "discard", "crash", "crash", "violation", "keep",
                                            "keep"]
    keep = [by_ref[r].commit_sha for r in ("01-deeper.patch", "06-seed.patch", "07-wider.patch")]
    assert lab.kept_history("t") == keep  # exactly the improving commits, in order
    assert git("rev-parse", "autoresearch/t", cwd=lab.repo.path) == keep[-1]

    c = {ref[:2]: a.commit_sha[:7] for ref, a in by_ref.items() if ref}
    expected = (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        f"{lab.base[:7]}\t1.142000\t2.5\tkeep\tbaseline\n"
        f"{c['01']}\t1.102000\t2.5\tkeep\tdeepen the model from 4 to 6 layers\n"
        f"{c['02']}\t1.202000\t1.2\tdiscard\thalve the width to 32 to train faster\n"
        f"{c['03']}\t0.000000\t0.0\tcrash\t03-crash (exit code 1)\n"
        f"{c['04']}\t0.000000\t0.0\tcrash\tprefetch batches in a background loader process (killed at the 2 s hard"
        " timeout)\n"
        f"{c['05']}\t0.000000\t0.0\tcrash\tsimplify the evaluation (violation: changed protected evaluate.py)\n"
        f"{c['06']}\t1.098000\t2.5\tkeep\tchange the random seed from 42 to 137\n"
        f"{c['07']}\t1.052000\t5.0\tkeep\tdouble the width to 128\n"
    )
    assert lab.results("t") == expected

    # The crash kept its evidence; the hang was killed at the hard timeout, its child process too.
    assert "ZeroDivisionError" in by_ref["03-crash.patch"].log_tail
    hang = by_ref["04-hang.patch"]
    assert 2.0 <= hang.run_s < 3.5
    pids = [int(p) for p in (lab.root / "pids").read_text().split()]
    assert len(pids) == 2 and not any(process_alive(p) for p in pids)

    # The violation never ran, was reverted, and the protected file is untouched everywhere.
    cheat = by_ref["05-cheat.patch"]
    assert cheat.run_s == 0 and cheat.values == [] and "evaluate.py" in cheat.reason
    original = (TARGET / "evaluate.py").read_text()
    assert (lab.repo.path / "evaluate.py").read_text() == original
    assert (lab.home / "autoresearch" / "t" / "worker-0" / "evaluate.py").read_text() == original
    assert git("show", "autoresearch/t:evaluate.py", cwd=lab.repo.path) + "\n" == original

    # Nothing lost: every attempt's diff rebuilds its commit's tree on a new branch.
    store = Store(Ledger(lab.home / "ledger.db"))
    session = store.session_by_tag("t")
    assert session is not None
    for a in attempts[1:]:
        commit = apply_attempt(store, session, a.id, f"recovered-{a.iteration}")
        assert lab.repo.git("rev-parse", f"{commit}^{{tree}}") == lab.repo.git("rev-parse", f"{a.commit_sha}^{{tree}}")
        assert lab.repo.git("rev-parse", f"{commit}^") == a.parent_commit
    store.close()
    via_cli = lab.cli("autoresearch-log", str(program), "--apply", str(by_ref["02-narrower.patch"].id), "--branch",
                      "narrow")
    assert via_cli.returncode == 0, via_cli.stderr
    assert "WIDTH = 32" in git("show", "narrow:config.py", cwd=lab.repo.path)
    again = lab.cli("autoresearch-log", str(program), "--apply", str(by_ref["02-narrower.patch"].id), "--branch",
                    "narrow")
    assert again.returncode == 2 and "already exists" in again.stderr

    listing = lab.cli("autoresearch-log", str(program), "--json")
    record = json.loads(listing.stdout)
    assert [a["status"] for a in record["attempts"]] == [a.status for a in attempts]
    assert "+WIDTH = 32" in record["attempts"][2]["diff"]
    table = lab.cli("autoresearch-log", str(program))
    assert table.returncode == 0 and "halve the width" in table.stdout

    report = lab.home / "autoresearch" / "t"
    assert (report / "progress.png").stat().st_size > 10_000
    text = (report / "report.md").read_text()
    shown = shown_text(text)
    assert "7 attempts: 3 keep, 1 discard, 2 crash, 1 violation" in shown and "![" in text and "(progress.png)" in text
    assert "The keep rate is 75.00% of the measured attempts" in shown
    html_text = (report / "report.html").read_text()
    for a in attempts:  # every attempt with its decision and reason
        assert f"<tr><td>{a.iteration}</td><td>{'baseline' if a.is_baseline else a.status}</td>" in html_text
        assert html.escape(a.reason or "—") in html_text
    assert {"report.html", "report.tex", "facts.json"} <= {p.name for p in report.iterdir()}
    verified = lab.cli("verify", str(report))
    assert verified.returncode == 0, verified.stderr
    match = re.search(r"The baseline measured val\\_bpb = \[([0-9.]+)\]", text)
    assert match, text[:500]
    (report / "report.md").write_text(text.replace(f"[{match.group(1)}]", "[0.123456]", 1))
    forged = lab.cli("verify", str(report))
    assert forged.returncode == 1 and "shows 0.123456" in forged.stderr
    assert lab.repo.git("status", "--porcelain") == ""  # the user's checkout was never touched
    assert lab.repo.git("rev-parse", "--abbrev-ref", "HEAD") == "main"


@pytest.mark.subprocess
def test_noise_aware_mode_discards_the_seed_change_that_default_mode_keeps(lab: Lab) -> None:
    patches = lab.patches("subset", "01", "02", "06", "07")
    lab.run(lab.program("plain", patches=patches), counters="c1")
    lab.run(lab.program("noisy", patches=patches, replicates=3), counters="c2")

    plain = {a.agent_ref: a for a in lab.attempts("plain")}
    noisy = {a.agent_ref: a for a in lab.attempts("noisy")}
    assert plain["06-seed.patch"].status == "keep"  # greedy: one lucky draw (1.098 < 1.102) is kept
    seed = noisy["06-seed.patch"]
    assert seed.status == "discard" and len(seed.values) == 3 and "noise floor" in seed.reason
    assert [noisy[r].status for r in ("01-deeper.patch", "02-narrower.patch", "07-wider.patch")] == [
        "keep", "discard", "keep"]
    assert len(noisy["02-narrower.patch"].values) == 1  # not better on its first run: no reruns spent
    assert sorted(noisy[""].values) == pytest.approx([1.138, 1.14, 1.142])  # the baseline's three runs: floor 0.002
    assert lab.kept_history("noisy") == [noisy["01-deeper.patch"].commit_sha, noisy["07-wider.patch"].commit_sha]
    c = {ref[:2]: a.commit_sha[:7] for ref, a in noisy.items() if ref}
    assert lab.results("noisy") == (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        f"{lab.base[:7]}\t1.140000\t2.5\tkeep\tbaseline\n"
        f"{c['01']}\t1.100000\t2.5\tkeep\tdeepen the model from 4 to 6 layers\n"
        f"{c['02']}\t1.202000\t1.2\tdiscard\thalve the width to 32 to train faster\n"
        f"{c['06']}\t1.100000\t2.5\tdiscard\tchange the random seed from 42 to 137\n"
        f"{c['07']}\t1.050000\t5.0\tkeep\tdouble the width to 128\n"
    )
    shown = shown_text((lab.home / "autoresearch" / "noisy" / "report.md").read_text())
    assert "exceeds the noise floor (0.002000)" in shown


# -- resume, interruption, refusal, validation --------------------------------------------------


@pytest.mark.subprocess
def test_resume_after_kill_and_sigterm_loses_and_duplicates_nothing(lab: Lab) -> None:
    hang = (PATCHES / "04-hang.patch").read_text()
    patches = lab.patches("resume", "01", extra={
        "02-slow.patch": hang.replace("# prefetch", "# slow one: prefetch"),
        "03-slow.patch": hang.replace("# prefetch", "# slow two: prefetch"),
        "04-wider.patch": (PATCHES / "07-wider.patch").read_text(),
    })
    program = lab.program("r", patches=patches, timeout_s=30)

    first = lab.popen("autoresearch", str(program))
    # The baseline runs first; on a busy machine that can take longer than the default wait.
    slow = wait_for(lambda: running_attempt(lab, "r", "02-slow.patch"), timeout=120, what="the first slow run")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    orphans = [int(p) for p in (lab.root / "pids").read_text().split()]
    assert all(process_alive(p) for p in orphans)  # kill -9 left the run's process group behind

    (lab.root / "pids").unlink()
    second = lab.popen("autoresearch", str(program))
    wait_for(lambda: running_attempt(lab, "r", "03-slow.patch"), what="the second slow run")
    assert not any(process_alive(p) for p in orphans)  # the resume killed the orphaned run
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=20)
    assert second.returncode == 130, stderr
    assert not any(process_alive(int(p)) for p in (lab.root / "pids").read_text().split())

    third = lab.cli("autoresearch", str(program))
    assert third.returncode == 0, third.stderr + third.stdout
    attempts = lab.attempts("r")
    assert [(a.iteration, a.status, a.agent_ref) for a in attempts] == [
        (0, "baseline", ""), (1, "keep", "01-deeper.patch"), (2, "interrupted", "02-slow.patch"),
        (3, "interrupted", "03-slow.patch"), (4, "keep", "04-wider.patch")]
    assert attempts[2].id == slow.id and "orchestrator stopped" in attempts[2].reason
    assert "session stopped" in attempts[3].reason
    assert lab.kept_history("r") == [attempts[1].commit_sha, attempts[4].commit_sha]
    rows = lab.results("r").splitlines()
    assert len(rows) == 6 and rows[3].split("\t")[3:] == [
        "crash", "slow one: prefetch batches in a background loader process (interrupted: the orchestrator stopped"
                 " during this attempt)"]


@pytest.mark.subprocess
def test_refuses_an_existing_branch_the_ledger_does_not_know(lab: Lab) -> None:
    lab.repo.git("branch", "autoresearch/mine")
    done = lab.cli("autoresearch", str(lab.program("mine")))
    assert done.returncode == 2
    assert ("branch 'autoresearch/mine' already exists" in done.stderr
            and "no autoresearch session 'mine'" in done.stderr)
    assert "Traceback" not in done.stderr


@pytest.mark.subprocess
def test_refuses_a_second_orchestrator_on_the_same_session(lab: Lab) -> None:
    lock = lab.home / "autoresearch" / "busy" / "lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        done = lab.cli("autoresearch", str(lab.program("busy")))
    assert done.returncode == 2 and "'busy' is already running" in done.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize(("command", "status", "reason", "failure"), [
    ("echo 'val_bpb: 1.5'; echo 'peak_vram_mb: 512' > run.log", "ok", "", None),
    ("echo hello", "crash", "no val_bpb in the output", "no_metrics"),
    ("echo 'val_bpb: nan'", "crash", "val_bpb is nan", "nan_divergence"),
    ("echo 'val_bpb: 1.5'; exit 3", "crash", "exit code 3", "unknown"),
    ("kill -9 $$", "crash", "killed by signal 9", "killed"),
    (f"{sys.executable} -c 'import no_such_module'", "crash", "exit code 1", "missing_dependency"),
])
def test_a_run_is_judged_by_its_exit_and_its_metric_and_a_crash_gets_its_class(
        lab: Lab, command: str, status: str, reason: str, failure: str | None) -> None:
    outcome = run_once(lab, lab.program("judge", run=command))
    assert (outcome.status, outcome.reason, outcome.failure) == (status, reason, failure)
    if status == "ok":
        assert outcome.metric == 1.5 and outcome.metrics["peak_vram_mb"] == 512  # read from run.log too
    else:
        assert outcome.evidence["class"] == failure and outcome.evidence["evidence"]


@pytest.mark.subprocess
def test_a_run_inherits_the_allow_list_and_pass_env_only(lab: Lab) -> None:
    program = lab.program("env", run='env > "$RATIOCINATOR_OUT_DIR/env.txt"; echo "val_bpb: 1"',
                          pass_env=["KEEP_*"])
    outcome = run_once(lab, program, OPENAI_API_KEY="sk-secret", KEEP_ME="yes", RATIOCINATOR_HOME="/elsewhere")
    assert outcome.status == "ok"
    env = dict(line.split("=", 1) for line in (lab.root / "run" / "out" / "env.txt").read_text().splitlines()
               if "=" in line)
    assert env["KEEP_ME"] == "yes" and env["RATIOCINATOR_BUDGET_S"] == "1" and "PATH" in env
    assert "OPENAI_API_KEY" not in env and "AR_COUNTER_DIR" not in env and "RATIOCINATOR_HOME" not in env


def run_once(lab: Lab, program: Path, **env: str) -> RunOutcome:
    """One run of the base commit in the repository, as a worker's would be."""
    engine = Engine(load_program(program), lab.home, lab.env(**env))
    try:
        return engine.run(RunRequest(commit=lab.base, worker=0, worktree=lab.repo.path,
                                     env={"RATIOCINATOR_BUDGET_S": "1"}, run_dir=lab.root / "run", run_id=1),
                          timeout_s=10, stop=threading.Event())
    finally:
        engine.close()


@pytest.mark.subprocess
def test_program_errors_name_file_and_line(lab: Lab) -> None:
    path = lab.root / "bad.yaml"
    path.write_text("repo: repo\ntag: bad\nedtiable: [config.py]\nrun: python train.py\nmetric: val_bpb\n"
                    "budget_s: soon\nagent: {kind: patches}\n")
    with pytest.raises(SpecError) as info:
        load_program(path)
    message = str(info.value)
    assert f"{path}:3: unknown key 'edtiable' — did you mean 'editable'?" in message
    assert f"{path}:6: 'budget_s'" in message
    assert f"{path}:7: 'agent'" in message and "needs patches" in message
    done = lab.cli("autoresearch", str(path))
    assert done.returncode == 2 and "problems in the program" in done.stderr and "Traceback" not in done.stderr

    path.write_text("repo: nowhere\ntag: bad\neditable: [config.py]\nrun: x\nmetric: val_bpb\nbudget_s: 1\n"
                    "agent: {kind: command, command: x}\n")
    with pytest.raises(SpecError, match=r"bad.yaml:1: repo 'nowhere' is not a directory"):
        load_program(path)


OVERLAPPING_AGENT = """
import os, pathlib, re
turns = pathlib.Path(os.environ["AR_TURNS"])
turn = len(turns.read_text().splitlines()) + 1 if turns.exists() else 1
prompt = pathlib.Path(os.environ["RATIOCINATOR_PROMPT_FILE"]).read_text()
(turns.parent / f"prompt-{turn}.md").write_text(prompt)
config = pathlib.Path("config.py")
text = config.read_text()
depth = re.search(r"DEPTH = (\\d+)", text).group(1)
with turns.open("a") as log:
    log.write(f"{turn} DEPTH={depth}\\n")
if turn == 1:
    config.write_text(text.replace("DEPTH = 4", "DEPTH = 5"))
    print("HYPOTHESIS: one more layer fits better")
elif turn == 2:
    config.write_text(text.replace("WIDTH = 64", "WIDTH = 128"))
    print("HYPOTHESIS: twice the width fits better")
else:
    pathlib.Path(os.environ["RATIOCINATOR_GIVE_UP_FILE"]).write_text("two ideas were all it had")
"""


def assert_turns_overlap_runs(lab: Lab, tag: str, **fields: object) -> None:
    """OVERLAPPING_AGENT's session: its second turn is made while the first attempt is measured."""
    script = lab.root / "agent.py"
    script.write_text(OVERLAPPING_AGENT)
    turns = lab.root / f"{tag}-turns" / "turns.txt"
    turns.parent.mkdir()
    program = lab.program(tag, agent={"kind": "command", "command": f"{sys.executable} {script}"}, timeout_s=30,
                          **fields)
    outcome = lab.run(program, AR_TRAIN_SLEEP="2", AR_TURNS=str(turns))
    assert outcome.exit_code == 0 and "the agent gave up: two ideas were all it had" in outcome.reason, outcome.reason

    base, first, second = lab.attempts(tag)
    assert (base.status, first.status, second.status) == ("baseline", "keep", "keep")
    # The second turn began while the first attempt was still measured: it saw the old depth, and was
    # told what was running so as not to repeat it.
    assert turns.read_text().splitlines()[:2] == ["1 DEPTH=4", "2 DEPTH=4"]
    assert second.started_at < first.ended_at  # recorded (after its turn) before the first was decided
    prompt = (turns.parent / "prompt-2.md").read_text()
    assert "## Being measured now" in prompt and "#1: one more layer fits better" in prompt
    # Its predecessor was kept meanwhile: it was rebased onto that keep before its only measurement.
    assert "before it was measured, rebased onto it" in second.reason and len(second.values) == 1
    assert lab.repo.git("rev-parse", f"{second.commit_sha}^") == first.commit_sha
    assert lab.kept_history(tag) == [first.commit_sha, second.commit_sha]
    final = lab.repo.git("show", f"autoresearch/{tag}:config.py")
    assert "DEPTH = 5" in final and "WIDTH = 128" in final
    # The agent's worktree ends at the best; the measuring one has its own branch (hosts fetch commits by ref).
    worker = Git(lab.home / "autoresearch" / tag / "worker-0")
    assert worker.head() == second.commit_sha and worker.current_branch() == f"autoresearch/{tag}-w0"
    assert Git(lab.home / "autoresearch" / tag / "measure-0").current_branch() == f"autoresearch/{tag}-w0-measure"


@pytest.mark.subprocess
def test_an_agents_turn_overlaps_its_previous_attempts_measuring(lab: Lab) -> None:
    assert_turns_overlap_runs(lab, "ovl")


# -- parallel workers ------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_two_workers_share_the_best_and_only_advance_on_improvements(lab: Lab) -> None:
    slow_wider = make_patch(lab.root, "slowly double the width to 128",
                            {"WIDTH = 64": "WIDTH = 128", "EXTRAS = ()": "EXTRAS = ()\nimport time\ntime.sleep(0.8)"})
    patches = lab.patches("parallel", "01", "02", "06", extra={"01b-slow-wider.patch": slow_wider})
    outcome = lab.run(lab.program("par", patches=patches, workers=2, timeout_s=10, gpus_per_worker=1),
                      AR_TRAIN_SLEEP="0.2")
    assert outcome.exit_code == 0, outcome.reason

    attempts = lab.attempts("par")
    assert {a.worker for a in attempts if not a.is_baseline} == {0, 1}
    assert sorted(a.agent_ref for a in attempts if a.agent_ref) == sorted(p.name for p in patches.iterdir())
    keeps = {a.commit_sha: a for a in attempts if a.status in ("keep", "baseline")}
    history = lab.kept_history("par")
    assert history and all(c in keeps for c in history)  # the shared branch only ever holds kept commits
    values = [keeps[lab.base].metric] + [keeps[c].metric for c in history]
    assert all(b < a for a, b in itertools.pairwise(values))  # each one strictly better than the one before
    final = lab.repo.git("show", "autoresearch/par:config.py")
    assert "DEPTH = 6" in final and "WIDTH = 128" in final  # both improvements combined, whichever finished first
    assert outcome.best_metric == pytest.approx(1.05, abs=0.0025)
    # The slow candidate finished after the fast one was kept: it beat the new best on its own numbers,
    # so it was rebased onto it and measured again before being kept.
    slow = next(a for a in attempts if a.agent_ref == "01b-slow-wider.patch")
    assert slow.status == "keep" and "rebased onto it" in slow.reason
    assert lab.repo.git("rev-parse", f"{slow.commit_sha}^") in history
    for a in attempts:  # each worker's runs were pinned to its own GPU slot
        assert a.status not in ("keep", "discard", "baseline") or f"cuda {a.worker}" in a.log_tail
    for i in (0, 1):
        tree = Git(lab.home / "autoresearch" / "par" / f"worker-{i}")
        assert tree.head() == history[-1] and tree.current_branch() == f"autoresearch/par-w{i}"


def test_integration_rebases_merges_and_reports_conflicts(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    base = repo.commit({"a.txt": "1\n2\n3\n4\n5\n6\n7\n8\n9\n", "b.txt": "b\n"}, "base")
    env = {**os.environ, **GIT_ENV}
    g = Git(repo.path, env)
    g.run("checkout", "-q", "-b", "best")
    best = repo.commit({"a.txt": "one\n2\n3\n4\n5\n6\n7\n8\n9\n"}, "best")
    g.run("checkout", "-q", "-b", "cand", base)
    cand = repo.commit({"a.txt": "1\n2\n3\n4\n5\n6\n7\n8\nnine\n"}, "cand")
    clash = repo.commit({"a.txt": "uno\n2\n3\n4\n5\n6\n7\n8\nnine\n"}, "clash")

    rebased = g.rebase_onto(cand, best)
    assert rebased is not None and g.out("rev-parse", f"{rebased}^") == best
    assert (repo.path / "a.txt").read_text() == "one\n2\n3\n4\n5\n6\n7\n8\nnine\n"
    merged = g.merge_into(cand, best, "merge")
    assert (merged is not None and g.out("rev-parse", f"{merged}^1") == best
            and g.out("rev-parse", f"{merged}^2") == cand)
    assert g.rebase_onto(clash, best) is None and g.merge_into(clash, best, "merge") is None
    assert g.out("status", "--porcelain") == ""  # conflicts leave nothing half-done


# -- agents ----------------------------------------------------------------------------------------

AGENT = """
import os, pathlib, re, subprocess
assert pathlib.Path("val.txt").read_text() == "held-out data", "the linked data file is missing"
prompt = pathlib.Path(os.environ["RATIOCINATOR_PROMPT_FILE"]).read_text()
assert "Results so far" in prompt and "lower is better" in prompt and "`evaluate.py`" in prompt, prompt
config = pathlib.Path("config.py")
text = config.read_text()
depth = int(re.search(r"DEPTH = (\\d+)", text).group(1))
if depth >= 6:
    pathlib.Path(os.environ["RATIOCINATOR_GIVE_UP_FILE"]).write_text("depth 6 is the optimum")
    raise SystemExit(0)
config.write_text(text.replace(f"DEPTH = {depth}", f"DEPTH = {depth + 1}"))
if depth == 5:  # this turn the agent also commits on its own, as some coding agents do
    subprocess.run(["git", "commit", "-qam", "agent's own commit"], check=True)
    print(f"HYPOTHESIS: one more layer ({depth + 1}) lowers val_bpb further")
else:
    pathlib.Path(os.environ["RATIOCINATOR_HYPOTHESIS_FILE"]).write_text(
        f"a deeper model ({depth + 1} layers) fits better\\n")
"""


@pytest.mark.subprocess
def test_command_agent_edits_states_its_hypothesis_and_gives_up(lab: Lab) -> None:
    script = lab.root / "agent.py"
    script.write_text(AGENT)
    (lab.repo.path / "val.txt").write_text("held-out data")  # untracked data, shared into the worktree by `link`
    program = lab.program("cmd", agent={"kind": "command", "command": f"{sys.executable} {script} # {{prompt_file}}"},
                          instructions="Lower val_bpb by changing the depth.", link=["val.txt"],
                          protected=["prepare.py", "evaluate.py", "val.txt"], results_tsv_in_repo=True,
                          overlap=False)  # each turn reads the depth its predecessor's result left
    outcome = lab.run(program)
    assert outcome.exit_code == 0 and "the agent gave up: depth 6 is the optimum" in outcome.reason
    attempts = lab.attempts("cmd")
    assert [(a.status, a.hypothesis) for a in attempts] == [
        ("baseline", "baseline"), ("keep", "a deeper model (5 layers) fits better"),
        ("keep", "one more layer (6) lowers val_bpb further")]
    history = lab.kept_history("cmd")
    assert history == [attempts[1].commit_sha, attempts[2].commit_sha]  # the agent's own commit was folded into one
    assert lab.repo.git("log", "-1", "--format=%s", "autoresearch/cmd") == "one more layer (6) lowers val_bpb further"
    prompt = (lab.home / "autoresearch" / "cmd" / "worker-0" / ".autoresearch" / "prompt.md").read_text()
    assert "Lower val_bpb by changing the depth." in prompt and "| 1 | keep | 1.1" in prompt
    assert (lab.repo.path / "results.tsv").read_text() == lab.results("cmd")
    assert lab.repo.git("status", "--porcelain") == "?? val.txt"  # results.tsv and run.log stay out of git's way

    # A protected file that changed since the session started makes every result incomparable: refused on resume.
    (lab.repo.path / "val.txt").write_text("other data")
    with pytest.raises(UsageError, match="protected files differ from when session 'cmd' started: val.txt changed"):
        lab.run(program)


@pytest.mark.subprocess
def test_max_dollars_stops_the_loop_before_a_run_could_overrun(lab: Lab) -> None:
    # $100 per second and a 2 s hard timeout: each run reserves $200 before it starts and costs about $35
    # (0.3 s), so after two or three runs the next one could overrun $300 and is never started.
    program = lab.program("money", patches=lab.patches("paid", "01", "02", "06", "07"), price_per_hour=360_000,
                          max_dollars=300)
    outcome = lab.run(program, AR_TRAIN_SLEEP="0.3")
    assert outcome.exit_code == 0 and "max_dollars reached" in outcome.reason
    store = Store(Ledger(lab.home / "ledger.db"))
    session = store.session_by_tag("money")
    assert session is not None
    spent, reserved = store.money(session.id)
    attempts = store.attempts(session.id)
    store.close()
    assert reserved == 0 and 0 < spent <= 300
    assert 1 <= len(attempts) - 1 < 4 and all(a.status != "running" for a in attempts)
    assert sum(a.cost for a in attempts) == pytest.approx(spent)


@pytest.mark.subprocess
def test_llm_agent_reasks_with_gits_complaint_then_applies_the_diff(lab: Lab) -> None:
    text = (PATCHES / "01-deeper.patch").read_text()
    good = text[text.index("diff --git"):]
    bad = good.replace("# More layers help, up to a point", "# Layers are what matters")
    with LlmServer() as server:
        server.script(
            Reply(json.dumps({"hypothesis": "deepen to 6 layers", "diff": bad})),
            Reply(json.dumps({"hypothesis": "deepen to 6 layers", "diff": good})),
            Reply(json.dumps({"hypothesis": "nothing left worth trying", "diff": "", "give_up": True})),
        )
        llm = {"provider": "openai", "model": "test-model", "base_url": server.base_url("openai"),
               "backoff_s": 0.01, "timeout_s": 5, "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}
        outcome = lab.run(lab.program("llm", agent={"kind": "llm"}, llm=llm))
        requests = list(server.requests)
    assert outcome.exit_code == 0 and "nothing left worth trying" in outcome.reason
    first_prompt = requests[0].body["messages"][-1]["content"]
    assert "### config.py" in first_prompt and "DEPTH = 4" in first_prompt  # the LLM sees the editable file
    reask = requests[1].body["messages"][-1]["content"]
    assert "git apply --check" in reask and "patch does not apply" in reask
    attempts = lab.attempts("llm")
    assert [(a.status, a.hypothesis) for a in attempts] == [("baseline", "baseline"), ("keep", "deepen to 6 layers")]
    assert attempts[1].cost > 0
    ledger = Ledger(lab.home / "ledger.db")
    assert len(ledger.db.execute("SELECT * FROM llm_calls WHERE stage = 'autoresearch:llm'").fetchall()) == 3
    ledger.close()


# -- the pure parts --------------------------------------------------------------------------------


def test_strictly_better_is_the_seed_rule() -> None:
    assert strictly_better(1.0, 1.1, lower_is_better=True).keep
    assert not strictly_better(1.1, 1.1, lower_is_better=True).keep  # ties are discarded
    assert not strictly_better(1.0, 1.1, lower_is_better=False).keep
    assert "worse" in strictly_better(1.2, 1.1, lower_is_better=True).reason


def test_noise_aware_rule() -> None:
    best = [1.10, 1.102, 1.098]
    floor = noise_floor([1.14, 1.142, 1.138])
    assert floor == pytest.approx(0.002)
    rule = {"k": 3, "floor": floor, "confidence": 0.95, "lower_is_better": True}
    assert noise_aware([1.11], best, **rule).action == "discard"  # not better at first: no reruns
    assert noise_aware([1.09], best, **rule).action == "rerun"
    assert noise_aware([1.09, 1.092], best, **rule).action == "rerun"
    assert noise_aware([1.05, 1.052, 1.048], best, **rule).keep
    lucky = noise_aware([1.098, 1.1, 1.102], best, **rule)
    assert not lucky.keep and "noise floor" in lucky.reason
    # Real but below the noise floor, however precisely measured.
    assert not noise_aware([1.0985, 1.0985, 1.0985], best, **rule).keep
    # Beyond the floor on average but too spread to be significant.
    spread = noise_aware([1.02, 1.16, 1.05], best, **rule)
    assert not spread.keep and "not significant" in spread.reason
    assert noise_aware([2.0, 2.1, 2.05], [1.0, 1.01, 0.99], k=3, floor=0.01, confidence=0.95,
                       lower_is_better=False).keep


def test_guard_patterns_and_protected_hashes(tmp_path: Path) -> None:
    assert (matches("crates/ffn/src/a/b.rs", "crates/ffn/src/**")
            and not matches("crates/ffn/Cargo.toml", "crates/ffn/src/**"))
    assert matches("x.py", "*.py") and not matches("d/x.py", "*.py") and matches("d/x.py", "**/*.py")
    assert matches("data/v/1.bin", "data") and matches("data/v/1.bin", "data/")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.bin").write_bytes(b"\x00\x01")
    (tmp_path / "eval.py").write_text("x = 1\n")
    before = protected_hashes(tmp_path, ["eval.py", "data/**", "missing.txt"])
    assert set(before) == {"eval.py", "data/val.bin"}
    (tmp_path / "data" / "extra.bin").write_bytes(b"")
    (tmp_path / "eval.py").write_text("x = 2\n")
    after = protected_hashes(tmp_path, ["eval.py", "data/**", "missing.txt"])
    verdict = check_edit([Change("M", "eval.py"), Change("A", "notes.md")], editable=["*.py"],
                         protected=["eval.py", "data/**"],
                         expected=before, actual=after)
    assert verdict.problems == ("changed protected eval.py", "added notes.md, which is not editable",
                                "created protected data/extra.bin")
    assert check_edit([Change("M", "model.py")], editable=["*.py"], protected=["eval.py"], expected=before,
                      actual=before).ok


@pytest.mark.subprocess
def test_log_refuses_unknown_sessions_and_attempts(lab: Lab) -> None:
    program = lab.program("nolog")
    done = lab.cli("autoresearch-log", str(program))
    assert done.returncode == 2 and "no ledger" in done.stderr
    ran = lab.cli("autoresearch", str(lab.program("other")), "--max-iterations", "0")
    assert ran.returncode == 0 and "max_iterations reached (0)" in ran.stdout  # the baseline, then nothing
    done = lab.cli("autoresearch-log", str(program))
    assert done.returncode == 2 and "no autoresearch session 'nolog'" in done.stderr
    store = Store(Ledger(lab.home / "ledger.db"))
    session = store.session_by_tag("other")
    assert session is not None
    (baseline,) = store.attempts(session.id)
    with pytest.raises(UsageError, match="changed nothing"):
        apply_attempt(store, session, baseline.id, "b")
    with pytest.raises(UsageError, match="no autoresearch attempt 999"):
        apply_attempt(store, session, 999, "b")
    store.close()
