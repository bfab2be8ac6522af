"""`ratiocinator exec-eval` from the command line: JSON document, output file, user errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import CLI

pytestmark = pytest.mark.subprocess

SAMPLES = Path(__file__).parent / "data" / "exec_eval_samples.jsonl"


def test_json_document_has_limits_summary_and_one_result_per_sample(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([*CLI, "exec-eval", str(SAMPLES), "--json", "--timeout", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert json.loads(out.read_text()) == document
    lines = [line for line in SAMPLES.read_text().splitlines() if line.strip()]
    assert len(document["results"]) == len(lines) == document["summary"]["total"]
    assert document["limits"]["timeout_s"] == 2 and document["limits"]["memory_mb"] == 1024
    labels = {r["id"]: r["label"] for r in document["results"]}
    assert labels["HumanEval/0"] == "success" and labels["HumanEval/0#none"] == "wrong_output"
    assert sum(document["summary"]["counts"].values()) == len(lines)


def test_bad_input_is_a_clear_error_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"code": "x = 1", "test": "assert x == 1"}\n{"code": "oops"\n')
    done = subprocess.run([*CLI, "exec-eval", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{bad}:2" in done.stderr and "invalid JSON" in done.stderr


def test_output_says_what_samples_were_isolated_from(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([*CLI, "exec-eval", str(SAMPLES), "--timeout", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    expected = "isolated" if os.geteuid() == 0 else "open"
    assert document["network"] == expected
    assert {r["evidence"]["network"] for r in document["results"] if r["label"] != "syntax_error"} == {expected}
    summary = [line for line in done.stdout.splitlines() if "passed (" in line]
    assert f"network {expected}" in summary[0]
