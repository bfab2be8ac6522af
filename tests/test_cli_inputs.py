"""Whatever a user types on the command line (a home that is a file, a name too long for the file
system, a spec that is a folder, a device or a named pipe nobody writes, an experiment id like a
path, an output encoding without our characters), every command ends in its output or in a clear
error with exit code 1 or 2: never a traceback, never a freeze.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import small_ledger
from ratiocinator.cli import app

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart" / "quickstart.yaml")
READ_COMMANDS = [
    ["status"], ["status", "nope"], ["status", ""], ["runs", "nope"], ["runs", "../../etc"],
    ["runs", "x" * 5000], ["report", "nope"], ["compare", "a", "b"], ["instances"], ["instances", "--reap"],
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hostile")
    a_file = base / "a_file"
    a_file.write_text("not a folder\n")
    fifo = base / "nobody_writes.yaml"
    os.mkfifo(fifo)
    damaged = base / "damaged"
    damaged.mkdir()
    (damaged / "ledger.db").write_bytes(b"this is not SQLite\n" * 200)
    return {"file": a_file, "below_file": a_file / "home", "long": base / ("x" * 300), "missing": base / "nope",
            "damaged": damaged, "fifo": fifo, "folder": base}


def _run(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, list(args))
    elapsed = time.monotonic() - started
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: raised {result.exception!r}\n{result.output}") from result.exception
    return result.exit_code, result.output, elapsed


@pytest.mark.parametrize("home_kind", ["file", "below_file", "long", "missing", "damaged"])
@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c)[:30])
def test_read_commands_on_a_hostile_home_end_in_a_clear_error(hostile: dict[str, Path], home_kind: str,
                                                              command: list[str]) -> None:
    code, output, _ = _run("--home", str(hostile[home_kind]), *command)
    assert code in (1, 2), output
    assert output.startswith("error: "), output
    assert "Traceback" not in output
    if home_kind == "file":
        assert "the home is a file, not a folder" in output, output


@pytest.mark.parametrize("home_kind", ["file", "below_file", "long"])
def test_plan_into_an_unusable_home_names_the_path(hostile: dict[str, Path], home_kind: str) -> None:
    code, output, _ = _run("--home", str(hostile[home_kind]), "plan", QUICKSTART)
    assert code == 2, output
    assert f"error: {hostile[home_kind]}" in output, output  # after any warning about the checkout


@pytest.mark.parametrize("spec_kind", ["folder", "missing", "long", "fifo", "dev_zero", "dev_null"])
@pytest.mark.parametrize("command", ["validate", "plan", "knobs", "check", "research"])
def test_a_spec_that_is_not_a_spec_file_is_refused_quickly(hostile: dict[str, Path], tmp_path: Path,
                                                          spec_kind: str, command: str) -> None:
    spec = {"dev_zero": Path("/dev/zero"), "dev_null": Path("/dev/null")}.get(spec_kind) or hostile[spec_kind]
    code, output, elapsed = _run("--home", str(tmp_path), command, str(spec))
    assert code == 2, output
    assert output.startswith(f"error: {spec}"), output
    assert elapsed < 10, f"{command} {spec_kind} took {elapsed:.1f}s"
    assert not (tmp_path / "ledger.db").exists(), "a refused spec must not create a ledger"


@pytest.mark.subprocess
@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_narrow_output_encoding_shows_a_question_mark_not_a_traceback(tmp_path: Path, encoding: str) -> None:
    """An ASCII-only or Latin-1 terminal (``PYTHONIOENCODING``, an old locale) gets every line, with ``?``
    for the characters it cannot show."""
    small_ledger.build(tmp_path / "home").close()
    done = subprocess.run([sys.executable, "-m", "ratiocinator", "--home", str(tmp_path / "home"), "status",
                           small_ledger.EXPERIMENT], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": encoding})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr
    first = done.stdout.decode(encoding).splitlines()[0]
    assert first.startswith(small_ledger.EXPERIMENT) and " ? commit " in first
