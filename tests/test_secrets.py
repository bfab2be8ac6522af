"""No provider key or token of the orchestrator reaches a runner, a smoke run or a deps step, on
the local backend and on SSH hosts, unless the spec passes it on purpose (``pass_env``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.local import LocalBackend
from ratiocinator.backends.ssh import SshBackend, SshHost
from ratiocinator.execution.contract import inherited_env
from ratiocinator.pipeline import Research
from ratiocinator.spec.models import load_spec
from sshd import Sshd

SECRETS = {
    "OPENAI_API_KEY": "sk-planted-openai", "ANTHROPIC_API_KEY": "sk-ant-planted",
    "AWS_SECRET_ACCESS_KEY": "planted-aws", "AWS_ACCESS_KEY_ID": "AKIAPLANTED", "GITHUB_TOKEN": "ghp_planted",
    "HF_TOKEN": "hf_planted",
    "WANDB_API_KEY": "planted-wandb", "VAST_API_KEY": "planted-vast", "GOOGLE_API_KEY": "planted-google",
    "AZURE_OPENAI_API_KEY": "planted-azure", "SLACK_BOT_TOKEN": "xoxb-planted", "DATABASE_URL": "postgres://u:p@h/db",
    "STRIPE_SECRET_KEY": "sk_live_planted", "MY_TEAM_SECRET": "planted-custom",
}
# The runner, its trial (smoke) runs, pre_install and verify all dump what they can see.
RUNNER = """#!/usr/bin/env bash
env > "$RATIOCINATOR_OUT_DIR/env-$RATIOCINATOR_TRIAL.txt"
echo 'METRICS: {"score": 1}'
"""


def _plant(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _leaks(dumps: list[Path]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for dump in dumps:
        text = dump.read_text()
        for name, value in SECRETS.items():
            if value in text or f"{name}=" in text:
                seen.setdefault(dump.name, []).append(name)
    return seen


def _spec(study: Study, dumps: Path, **fields: object) -> Path:
    study.commit({"run.sh": RUNNER})
    return study.spec(deps={"pre_install": [f'env > "{dumps}/pre_install.txt"'],
                            "verify": f'env > "{dumps}/verify.txt"'}, **fields)


def test_the_allow_list_keeps_paths_locale_and_gpus_and_drops_keys() -> None:
    environ = {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "CUDA_HOME": "/cuda", "OMP_NUM_THREADS": "2",
               "https_proxy": "http://p:3128", "RATIOCINATOR_HOME": "/x", **SECRETS}
    assert inherited_env(environ) == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "CUDA_HOME": "/cuda",
                                      "OMP_NUM_THREADS": "2", "https_proxy": "http://p:3128"}
    assert inherited_env(environ, ["HF_TOKEN", "AWS_*"])["HF_TOKEN"] == "hf_planted"
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} <= set(inherited_env(environ, ["AWS_*"]))


@pytest.mark.subprocess
@pytest.mark.latex
def test_no_planted_secret_reaches_runs_smoke_runs_or_deps_steps_locally(
        study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(monkeypatch)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    spec = load_spec(_spec(study, dumps))
    outcome = Research(spec, study.home, backend=LocalBackend(study.home), check=True, llm_review=False).run()
    assert outcome.status == "completed", outcome.message
    seen = sorted({*dumps.glob("*.txt"), *study.home.rglob("env-*.txt")})
    names = {p.name for p in seen}
    assert {"pre_install.txt", "verify.txt", "env-0.txt", "env-1.txt"} <= names, names  # runs and a smoke run
    assert _leaks(seen) == {}
    assert "PATH=" in (dumps / "verify.txt").read_text()  # what a step needs still arrives


@pytest.mark.subprocess
@pytest.mark.latex
def test_a_variable_the_spec_passes_reaches_runs_and_deps_steps(
        study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(monkeypatch)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    spec = load_spec(_spec(study, dumps, pass_env=["HF_TOKEN"]))
    outcome = Research(spec, study.home, backend=LocalBackend(study.home), check=False).run()
    assert outcome.status == "completed", outcome.message
    seen = [*dumps.glob("*.txt"), *study.home.rglob("env-*.txt")]
    assert {name for leaked in _leaks(seen).values() for name in leaked} == {"HF_TOKEN"}
    assert all("HF_TOKEN=hf_planted" in p.read_text() for p in seen)


@pytest.mark.latex
def test_no_planted_secret_reaches_runs_on_an_ssh_host(
        sshd: Sshd, study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(monkeypatch)
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line())
    host = SshHost(host="127.0.0.1", port=sshd.port, user=sshd.user, identity_file=str(sshd.client_key),
                   known_hosts=str(known), workdir=str(tmp_path / "remote"))
    study.commit({"run.sh": RUNNER})
    spec = load_spec(study.spec(replicates=2))
    outcome = Research(spec, study.home, backend=SshBackend([host], study.home), check=False).run()
    assert outcome.status == "completed", outcome.message
    seen = sorted((tmp_path / "remote").rglob("env-*.txt"))
    assert len(seen) == 2 and _leaks(seen) == {}
