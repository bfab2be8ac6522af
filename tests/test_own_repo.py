"""A first study of one's own repository, without friction: constants, one smoke run per arm, the code
that runs named, tables that fit, the goal metric in view, typos caught with a suggestion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLI, Study
from gitrepo import GitRepo
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.records import EventKind

pytestmark = pytest.mark.subprocess

# Logs every start (trial flag, arm, the constant) to TRIAL_LOG, passed on purpose by the spec.
RUNNER = '''
import json
import os
import time

x = float(os.environ.get("X", "1"))
sleep_s = float(os.environ.get("SLEEP_S", "0"))
with open(os.environ["TRIAL_LOG"], "a") as fh:
    fh.write(f"{os.environ['RATIOCINATOR_TRIAL']} {os.environ['RATIOCINATOR_ARM']} {sleep_s}\\n")
time.sleep(sleep_s)
seed = int(os.environ["RATIOCINATOR_SEED"])
print("METRICS: " + json.dumps({"epoch": 1, "aaa_first": 1.0, "loss": 1.0 / x + 0.01 * seed}), flush=True)
'''


def _spec(study: Study, **fields: object) -> Path:
    base: dict[str, object] = {"runner_script": "train.py", "goal_metric": "loss", "maximize": False,
                               "env": {"SLEEP_S": "0.1"}, "factors": {"X": [1, 2]}, "replicates": 2,
                               "pass_env": ["TRIAL_LOG"]}
    return study.spec(**{**base, **fields})


def _log(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()]  # type: ignore[misc]


@pytest.mark.latex
def test_constants_reach_every_run_and_a_passed_check_is_not_run_again(study: Study) -> None:
    study.commit({"train.py": RUNNER})
    spec = _spec(study)
    log = study.root / "trial.log"
    env = {"TRIAL_LOG": str(log)}

    planned = study.cli("plan", str(spec), "--json")
    assert planned.returncode == 0, planned.stderr
    arms = json.loads(planned.stdout)["arms"]
    assert json.loads(planned.stdout)["constants"] == {"SLEEP_S": "0.1"}
    assert [a["name"] for a in arms] == ["X=1", "X=2"]  # named by the factor alone
    assert all(a["env"]["SLEEP_S"] == "0.1" for a in arms)
    shown = study.cli("plan", str(spec)).stdout
    assert shown.count("SLEEP_S") == 1 and "constants (every arm): SLEEP_S=0.1" in shown

    checked = study.cli("check", str(spec), env=env, timeout=240)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert sorted(_log(log)) == [("1", "X=1", "0.1"), ("1", "X=2", "0.1")]

    done = study.cli("research", str(spec), env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reusing the review that passed" in done.stdout
    starts = _log(log)
    assert sum(trial == "1" for trial, _, _ in starts) == 2  # one smoke run per arm, not two
    assert sorted(s for s in starts if s[0] == "0") == [("0", "X=1", "0.1")] * 2 + [("0", "X=2", "0.1")] * 2
    ledger = study.ledger()
    exp = ledger.experiments()[0]
    assert {a.name for a in ledger.arms(exp.id)} == {"X=1", "X=2"}
    verdicts = ledger.readiness_verdicts(exp.id)
    assert verdicts and verdicts[-1].is_code_ready and verdicts[-1].commit == exp.commit_sha

    runs = study.cli("runs", exp.id)
    assert runs.returncode == 0
    first_row = next(line for line in runs.stdout.splitlines() if "succeeded" in line)
    assert first_row.index("loss=") < first_row.index("aaa_first=")  # the goal first, not alphabetical
    only = study.cli("runs", exp.id, "--metrics", "epoch").stdout
    assert "epoch=1" in only and "loss=" not in only
    typo = study.cli("runs", exp.id, "--metrics", "los")
    assert typo.returncode == 2 and "did you mean 'loss'?" in typo.stderr


@pytest.mark.latex
def test_a_new_commit_after_a_finished_experiment_is_named_with_the_way_to_study_it(study: Study) -> None:
    old = study.commit({"train.py": RUNNER})
    spec = _spec(study, env={"SLEEP_S": "0"}, replicates=1, check={"smoke": False})
    env = {"TRIAL_LOG": str(study.root / "trial.log")}
    first = study.cli("research", str(spec), env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr

    (study.repo.path / "train.py").write_text(RUNNER.lstrip() + "# tuned\n")
    warned = study.cli("plan", str(spec))
    assert ("uncommitted changes" in warned.stderr and "train.py" in warned.stderr
            and "differ from the commit that will run" in warned.stderr and old[:7] in warned.stderr)
    new = study.repo.commit({}, "tune")
    again = study.cli("research", str(spec), env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{old[:7]}, but main has moved to {new[:7]}" in again.stdout
    assert "1 file(s) changed: train.py" in again.stdout and "--new" in again.stdout
    clean = study.cli("plan", str(spec))
    assert "uncommitted" not in clean.stderr


def test_a_mistyped_knob_gets_a_suggestion_and_no_table(study: Study) -> None:
    study.commit({"train.py": RUNNER.replace('"X"', '"WIDTH"')})
    spec = _spec(study, factors={"WIDHT": [1, 2]}, env={})
    done = study.cli("plan", str(spec))
    assert done.returncode == 2
    assert "did you mean WIDTH?" in done.stderr
    hint = done.stderr.split("knobs the runner reads:", 1)[1].splitlines()[0]
    assert "WIDTH" in hint and "SLEEP_S" in hint
    assert "RATIOCINATOR_" not in hint and "TRIAL_LOG" in hint
    assert "arm " not in done.stdout and "runs" not in done.stdout  # no plan table before the refusal


def test_contract_and_platform_variables_are_not_offered_as_knobs(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\nexport OMP_NUM_THREADS=\"${OMP_NUM_THREADS:-1}\"\n"
                            "echo \"${RATIOCINATOR_SEED}\" > \"${RATIOCINATOR_OUT_DIR}/seed\"\n"
                            "echo \"METRICS: {\\\"score\\\": ${WIDTH:-1}}\"\n"})
    done = study.cli("plan", str(study.spec(factors={"WDTH": [1, 2]})))
    assert done.returncode == 2 and "did you mean WIDTH?" in done.stderr
    hint = done.stderr.split("knobs the runner reads:", 1)[1].splitlines()[0]
    assert hint.strip() == "WIDTH"


def test_a_constant_the_runner_never_reads_is_refused_at_its_line(study: Study) -> None:
    study.commit({"train.py": RUNNER})
    spec = _spec(study, env={"SLEEP_S": "0.1", "EPOHCS": 5})
    done = study.cli("plan", str(spec))
    assert done.returncode == 2
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if "EPOHCS" in text)
    assert f"{spec}:{line}: arm '(every arm)' sets EPOHCS" in done.stderr


def test_tables_at_80_columns_abbreviate_knob_names_the_same_way_with_a_legend(study: Study) -> None:
    study.commit({"train.py": "import os\nprint(os.environ['CONV_TYPE'], os.environ['HIDDEN_DIM'],"
                              " os.environ['LOSS'])\n"})
    spec = _spec(study, env={}, factors={"CONV_TYPE": ["SAGE", "GATCONV"], "HIDDEN_DIM": [128, 256],
                                         "LOSS": ["cross_entropy", "mse"]})
    narrow = study.cli("plan", str(spec), env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    table = [line for line in lines if "CT=" in line or "knobs" in line]
    assert len(table) >= 9 and all(len(line.rstrip()) <= 80 for line in table)
    assert "CT=GATCONV,HD=256,LOSS=cross_entropy" in narrow.stdout and "CT=SAGE,HD=128,LOSS=mse" in narrow.stdout
    assert "…" not in narrow.stdout
    assert "CT = CONV_TYPE, HD = HIDDEN_DIM" in narrow.stdout
    wide = study.cli("plan", str(spec), "--wide", env={"COLUMNS": "80"})
    assert "CONV_TYPE=GATCONV,HIDDEN_DIM=256,LOSS=cross_entropy" in wide.stdout.replace("\n", "")
    roomy = study.cli("plan", str(spec), env={"COLUMNS": "200"})
    assert "CONV_TYPE=GATCONV,HIDDEN_DIM=256,LOSS=cross_entropy" in roomy.stdout and "CT = " not in roomy.stdout


def test_version_flag_prints_the_installed_version(study: Study) -> None:
    from importlib.metadata import version

    done = study.cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ratiocinator {version('ratiocinator')}"


def test_a_runner_without_trial_mode_gets_a_warning_with_the_cost_of_its_smoke_runs(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\nsleep \"${NAP:-0}\"\necho \"METRICS: {\\\"score\\\": ${NAP:-0}}\"\n"})
    spec = study.spec(arms=[{"name": "short", "env": {"NAP": "0.2"}}, {"name": "long", "env": {"NAP": "1.5"}}])
    done = study.cli("check", str(spec), "--json", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    trial = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "trial")
    assert trial["status"] == "warning" and "never reads RATIOCINATOR_TRIAL" in trial["summary"]
    assert 1.5 <= trial["evidence"][0]["longest_trial_s"] < 10 and trial["evidence"][0]["arms"] == 2
    assert "the longest trial so far took 1." in trial["summary"]


def test_a_smoke_phase_over_its_limit_names_the_arms_it_could_not_finish_and_offers_a_cap(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\nsleep \"${NAP:-0}\"\n"})
    spec = study.spec(arms=[{"name": "quick", "env": {"NAP": "0"}}, {"name": "slow", "env": {"NAP": "20"}}],
                      check={"smoke_timeout_s": 2})
    done = study.cli("check", str(spec), "--json", timeout=240)
    assert done.returncode == 1
    smoke = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "smoke")
    assert "1 of 2 arm(s) could not finish within check.smoke_timeout_s (2s): slow" in smoke["summary"]
    assert "had printed metrics before the limit" in smoke["summary"]
    assert "per-run cap (check.smoke_timeout_s: 4, say)" in smoke["summary"]


def test_check_names_the_commit_when_lfs_refuses_the_data_and_knobs_still_lists(study: Study) -> None:
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 123456\n"
    commit = study.commit({"run.sh": "#!/usr/bin/env bash\necho \"METRICS: {\\\"score\\\": ${WIDTH:-1}}\"\n",
                           ".gitattributes": "*.pt filter=lfs diff=lfs merge=lfs -text\n", "data/train.pt": pointer})
    spec = study.spec(factors={"WIDTH": [1, 2]})
    checked = study.cli("check", str(spec), "--json", timeout=240)
    assert checked.returncode == 1
    result = json.loads(checked.stdout)
    assert result["commit"] == commit and result["checks"][0]["name"] == "lfs"
    text = study.cli("check", str(spec), timeout=240)
    assert f"code at {commit[:12]}: not ready" in text.stdout
    knobs = study.cli("knobs", str(spec))
    assert knobs.returncode == 0, knobs.stderr
    assert "WIDTH" in knobs.stdout and "Git LFS pointers" in knobs.stderr and "from the code alone" in knobs.stderr


def test_a_gpu_spec_without_backend_is_told_where_it_runs_and_how_to_rent(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"})
    spec = study.spec(hardware={"gpu": "Imaginary GPU 9000", "num_gpus": 1},
                      deps={"pre_install": ["apt-get install -y git-lfs > /dev/null 2>&1 || true",
                                            "cd /workspace/experiment && git lfs pull"],
                            "verify": "test -d \"$RATIOCINATOR_WORKSPACE\" && python3 -c 'print(1)'"})
    done = study.cli("validate", str(spec))
    assert done.returncode == 0, done.stderr
    assert "names no backend, so it is local (the default)" in done.stdout
    assert "`backend: vast` rents Imaginary GPU 9000" in done.stdout
    warning = next(line for line in done.stderr.splitlines() if "deps.pre_install[1]" in line)
    assert "/workspace/experiment" in warning and "$RATIOCINATOR_WORKSPACE" in warning and "/dev/null" not in warning
    assert "deps.pre_install[0]" not in done.stderr and "deps.verify" not in done.stderr
    explicit = study.cli("validate", str(study.spec(name="local", backend="local", hardware={"gpu": "X"})))
    assert "names no backend" not in explicit.stdout


@pytest.mark.latex
def test_deps_steps_start_in_the_checkout_and_know_its_path(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"})
    seen = study.root / "seen.txt"
    spec = study.spec(deps={"pre_install": [f"echo \"$RATIOCINATOR_WORKSPACE $PWD\" > {seen}"]},
                      check={"smoke": False})
    done = study.cli("research", str(spec), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    workspace, cwd = seen.read_text().split()
    assert workspace == cwd and Path(workspace, "run.sh").is_file()


def test_importing_the_ssh_backend_prints_no_third_party_deprecation_warnings() -> None:
    done = subprocess.run([sys.executable, "-W", "default", "-c", "import ratiocinator.backends.ssh"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0 and "CryptographyDeprecationWarning" not in done.stderr, done.stderr


def test_a_check_that_passed_is_kept_under_its_key(study: Study) -> None:
    study.commit({"train.py": RUNNER})
    spec = _spec(study)
    done = study.cli("check", str(spec), env={"TRIAL_LOG": str(study.root / "t.log")}, timeout=240)
    assert done.returncode == 0, done.stdout
    ledger = study.ledger()
    events = ledger.db.execute("SELECT data_json FROM events WHERE experiment_id IS NULL AND kind = ?",
                               (EventKind.READINESS,)).fetchall()
    assert len(events) == 1 and json.loads(events[0][0])["review_key"]


DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-repo.md"


def _files_of(page: Path) -> dict[str, str]:
    """The files a docs page writes out: each fenced block right after a ``<!-- file: PATH -->`` line."""
    files: dict[str, str] = {}
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("<!-- file: ") and line.endswith(" -->"):
            assert lines[i + 1].startswith("```"), f"{page}:{i + 1}: no code block after the file marker"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            files[line[len("<!-- file: "):-len(" -->")]] = "\n".join(lines[i + 2:end]) + "\n"
    return files


@pytest.mark.latex
def test_the_bring_your_own_repo_page_runs_as_written(tmp_path: Path) -> None:
    files = _files_of(DOCS_PAGE)
    assert set(files) == {"train.py", "scripts/run.sh", "spec.yaml"}
    repo = GitRepo(tmp_path / "my-model")
    for name, content in files.items():
        (repo.path / name).parent.mkdir(parents=True, exist_ok=True)
        (repo.path / name).write_text(content)
    (repo.path / "scripts" / "run.sh").chmod(0o755)
    repo.commit({}, "study: learning rate and batch size")
    home = tmp_path / "home"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "--home", str(home), *args], capture_output=True, text=True, timeout=600,
                              cwd=repo.path)

    planned = cli("plan", "spec.yaml")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "constants (every arm): EPOCHS=20" in planned.stdout and "uncommitted" not in planned.stderr
    done = cli("research", "spec.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = Ledger(home / "ledger.db")
    exp = ledger.experiments()[0]
    runs = ledger.runs(exp.id)
    assert len(runs) == 12 and all(r.status == "succeeded" for r in runs)
    assert {a.name for a in ledger.arms(exp.id)} == {"LR=0.01,BATCH=8", "LR=0.01,BATCH=32", "LR=0.05,BATCH=8",
                                                     "LR=0.05,BATCH=32"}
    checks = {c["name"]: c["status"] for c in ledger.readiness_verdicts(exp.id)[-1].checks}
    assert checks["smoke"] == "passed" and checks["cross_arm"] == "passed" and checks["trial"] == "passed"
    paper = next((home / "reports").iterdir()) / "paper.md"
    text = paper.read_text()
    facts = json.loads((paper.parent / "facts.json").read_text())
    factors = {f["key"].split("]")[0].removeprefix("factor[") for f in facts["facts"] if f["key"].startswith("factor[")}
    assert factors == {"LR", "BATCH"}, factors  # the constant EPOCHS is no factor of the paper
    assert "Main effects" in text
    shown = cli("runs", "lr-study")
    assert shown.returncode == 0 and "val_loss=" in shown.stdout
