"""Nothing a spec names reaches outside its place: a repo_url that git would read as an option, and
paths (deps.requirements, its -r lines, runner_script) that climb or link out of the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.local import LocalBackend
from ratiocinator.errors import SpecError, WorkspaceError
from ratiocinator.pipeline import Research
from ratiocinator.repo.workspace import filter_requirements, resolve_repo_url, within
from ratiocinator.spec.models import load_spec

RUNNER = "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"


@pytest.mark.parametrize(("fields", "message"), [
    ({"repo_url": "--upload-pack=touch x:y"}, "repo_url must not begin with '-'"),
    ({"repo_branch": "--output=/tmp/x"}, "repo_branch must not begin with '-'"),
    ({"deps": {"requirements": "../../../etc/hostname"}}, "must be a path inside the repository"),
    ({"deps": {"requirements": "/etc/hostname"}}, "must be a path inside the repository"),
    ({"runner_script": "../run.sh"}, "must be a path inside the repository"),
])
def test_the_spec_refuses_options_and_paths_out_of_the_repository(study: Study, fields: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(study.spec(**fields))


@pytest.mark.subprocess
def test_validate_says_so_without_a_traceback(study: Study) -> None:
    done = study.cli("validate", str(study.spec(repo_url="--upload-pack=touch x:y")))
    assert done.returncode == 2 and "repo_url must not begin with '-'" in done.stderr
    assert "Traceback" not in done.stderr and not (study.root / "x:y").exists()
    with pytest.raises(WorkspaceError, match="begins with '-'"):
        resolve_repo_url("--upload-pack=touch x:y", study.root)


def test_links_and_requirement_lines_out_of_the_repository_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("numpy\n")
    (root / "linked.txt").symlink_to(secret)
    (root / "nested.txt").write_text(f"-r ../{secret.name}\n")
    (root / "fine.txt").write_text("scipy\n-r extra.txt\n")
    (root / "extra.txt").write_text("numpy\n")
    for name in ("linked.txt", "nested.txt"):
        with pytest.raises(WorkspaceError, match="leaves the repository"):
            filter_requirements(root / name, (), root=root)
    assert "numpy" in filter_requirements(root / "fine.txt", (), root=root)
    assert within(root, "fine.txt", "x") == (root / "fine.txt").resolve()


def test_a_requirements_link_out_of_the_repository_installs_nothing(study: Study, tmp_path: Path) -> None:
    outside = tmp_path / "hostname"
    outside.write_text("this-package-must-never-be-installed\n")
    study.commit({"run.sh": RUNNER})
    os.symlink(outside, study.repo.path / "requirements.txt")
    study.repo.commit({}, "requirements link")
    spec = load_spec(study.spec(deps={"requirements": "requirements.txt"}))
    with pytest.raises(WorkspaceError, match="leaves the repository"):
        Research(spec, study.home, backend=LocalBackend(study.home), check=False).run()
    assert not list(study.home.glob("envs/*/bin/pip"))  # refused before any environment was built


WRITER = """#!/usr/bin/env bash
pwd > "$RATIOCINATOR_OUT_DIR/pwd"
mkdir -p models && echo "$RATIOCINATOR_ARM" > models/best_model.pt
sleep 0.5
own=0; [ "$(cat models/best_model.pt)" = "$RATIOCINATOR_ARM" ] && own=1
touch leftover.tmp
[ "${K:-0}" = 3 ] && [ "$RATIOCINATOR_TRIAL" = 0 ] && exit 3
echo "METRICS: {\\"score\\": $own, \\"k\\": ${K:-0}}"
"""


@pytest.mark.latex
def test_each_run_works_in_its_own_copy_and_the_cached_checkout_stays_pristine(study: Study) -> None:
    import subprocess

    study.commit({"run.sh": WRITER})
    spec = load_spec(study.spec(factors={"K": [1, 2, 3]}, concurrency=3, replicates=1,
                                failure_policy={"max_attempts": 1}))
    Research(spec, study.home, backend=LocalBackend(study.home), check=True, llm_review=False).run()
    ledger = study.ledger()
    runs = ledger.runs(ledger.experiments()[-1].id)
    finals = ledger.run_metrics(ledger.experiments()[-1].id)
    ok = [r for r in runs if r.status == "succeeded"]
    assert len(ok) == 2 and all(finals[r.id]["score"][0] == 1 for r in ok)  # no run saw another's file
    dirs = [Path(r.out_dir, "pwd").read_text().strip() for r in runs]
    assert len(set(dirs)) == 3 and all(d.endswith("/work") for d in dirs)
    (checkout,) = {p.parent for p in study.home.glob("repos/checkouts/*/*/run.sh")}
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=checkout, capture_output=True,
                            text=True, check=True)
    assert status.stdout == ""  # nothing a run or a smoke run wrote landed in the cache
    (failed,) = [r for r in runs if r.status == "failed"]
    assert Path(failed.log_dir, "work", "leftover.tmp").exists()  # a failed run's copy is kept to look at
    assert not any(Path(r.log_dir, "work").exists() for r in ok)  # a succeeded run's is removed
