"""Optional extras: pyproject.toml and `ratiocinator.extras` agree, the core install carries none of them,
and a command that needs a missing one names the extra (exit 2, no traceback, nothing recorded)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ratiocinator.cli import app
from ratiocinator.extras import EXTRAS, MissingExtra, require
from ratiocinator.llm.config import LlmConfig
from ratiocinator.llm.providers import make_provider
from without_extras import EXTRA_PACKAGES, env_without

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# pyproject distribution name -> the module it provides, where they differ
MODULE_OF = {"google-re2": "re2", "PyYAML": "yaml"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]


def test_pyproject_extras_are_the_ones_the_code_names() -> None:
    optional = PYPROJECT["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert sorted(MODULE_OF.get(_name(r), _name(r)) for r in optional[extra]) == sorted(modules), extra
    every = re.search(r"\[(.*)\]", optional["all"][0])
    assert every is not None and set(EXTRAS) <= set(every.group(1).split(","))
    assert "ratiocinator[all]" in optional["test"]  # `make test` installs everything
    core = {MODULE_OF.get(_name(r), _name(r)) for r in PYPROJECT["dependencies"]}
    assert not core & set(EXTRA_PACKAGES), "a package of an extra is back in the core install"
    assert PYPROJECT["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """``import module`` fails as for a package that is not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "optuna")
    with pytest.raises(MissingExtra) as caught:
        require("optuna", extra="search", purpose="the search planner")
    assert caught.value.exit_code == 2 and caught.value.extra == "search"
    assert str(caught.value) == ("the search planner needs the package 'optuna', which is not installed\n"
                                 "  hint: pip install 'ratiocinator[search]'")
    assert require("json", extra="search", purpose="-").dumps([]) == "[]"


def _cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _spec(tmp_path: Path, **fields: object) -> str:
    data = {"name": "s", "topic": "t", "goal_metric": "score", "maximize": True, "repo_url": str(tmp_path),
            "runner_script": "run.sh", "arms": [{"name": "a"}], **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.mark.parametrize(("backend", "blocked", "extra"), [("ssh", "asyncssh", "ssh"), ("vast", "tenacity", "vast"),
                                                           ("ray", "ray", "ray")])
def test_a_backend_without_its_extra_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str,
                                                      blocked: str, extra: str) -> None:
    _block(monkeypatch, blocked)
    fields: dict[str, object] = {"backend": backend}
    if backend == "ssh":
        fields["hosts"] = [{"host": "example.invalid"}]
    code, output = _cli(tmp_path, "validate", _spec(tmp_path, **fields))
    assert code == 2 and f"backend '{backend}' needs the package '{blocked}'" in output, output
    assert f"pip install 'ratiocinator[{extra}]'" in output and "Traceback" not in output
    assert "spec.yaml:" in output  # where the backend is chosen


def test_a_search_space_without_optuna_is_refused_before_anything_is_recorded(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "optuna")
    spec = _spec(tmp_path, search={"space": {"LR": {"low": 0.001, "high": 0.1, "log": True}}})
    code, output = _cli(tmp_path, "research", spec)
    assert code == 2 and "pip install 'ratiocinator[search]'" in output and "Traceback" not in output
    assert not (tmp_path / "home" / "ledger.db").exists()


def test_an_llm_without_its_sdk_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "anthropic")
    with pytest.raises(MissingExtra, match=r"the anthropic LLM provider \(model 'm'\) needs the package 'anthropic'"):
        make_provider(LlmConfig(provider="anthropic", model="m"), {"ANTHROPIC_API_KEY": "k"})
    spec = _spec(tmp_path, llm={"provider": "anthropic", "model": "m"})
    code, output = _cli(tmp_path, "check", spec, "--no-smoke")
    assert code == 2 and "pip install 'ratiocinator[llm]'" in output and "Traceback" not in output


def test_mlflow_and_parquet_exports_without_their_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import small_ledger

    small_ledger.build(tmp_path / "home").close()
    _block(monkeypatch, "mlflow", "pyarrow", "pandas")
    code, output = _cli(tmp_path, "export", "tiny", "--to", "mlflow", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert code == 2 and "pip install 'ratiocinator[mlflow]'" in output and "Traceback" not in output
    code, output = _cli(tmp_path, "export", "tiny", "--to", "parquet")
    assert code == 2 and "pip install 'ratiocinator[pandas]'" in output
    code, output = _cli(tmp_path, "export", "tiny", "--to", "csv")  # the standard library is enough
    assert code == 0 and "15 metric points" in output
    from ratiocinator.api import open_home

    with pytest.raises(MissingExtra, match=r"ratiocinator\[pandas\]"):
        open_home(tmp_path / "home").experiment().runs().to_pandas()


@pytest.mark.subprocess
def test_the_cli_starts_and_validates_with_no_extra_installed(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    done = subprocess.run([sys.executable, "-m", "ratiocinator", "--home", str(tmp_path / "h"), "validate", spec],
                          capture_output=True, text=True, timeout=120, env=env_without())
    assert done.returncode == 0, done.stderr
    assert "valid spec 's'" in done.stdout
