"""`ratiocinator dashboard` against a live experiment, in a real headless chromium.

The runner streams a point every 0.2 s until the test opens its gate, so the test decides when a
run finishes and can watch the page follow it: the experiment and its running count appear, a
curve gains points while its run is alive, and the finished run shows up without a reload.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from browser import headless_chromium
from conftest import CLI, Study
from ratiocinator.autoresearch.store import Store
from ratiocinator.store.ledger import Ledger

pytestmark = pytest.mark.subprocess

GATED_RUNNER = """
#!/usr/bin/env bash
# Streams score = step every 0.2 s until the test creates $GATE/go-$SEED, then prints the final score.
set -euo pipefail
GATE="${GATE:-/nonexistent}"
i=0
while [ ! -e "$GATE/go-$SEED" ]; do
  i=$((i + 1))
  echo "METRICS: {\\"step\\": $i, \\"score\\": $i}"
  sleep 0.2
  [ "$i" -lt 1500 ] || exit 5
done
echo "METRICS: {\\"score\\": $((100 + SEED))}"
"""

WAIT_S = 60


@contextmanager
def dashboard(home: Path) -> Iterator[str]:
    """`ratiocinator dashboard --port 0` on ``home``; yields its URL."""
    proc = subprocess.Popen([*CLI, "--home", str(home), "dashboard", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"the dashboard did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        yield match.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(browser: object, script: str, what: str, timeout: float = WAIT_S) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: d.execute_script(script), what)


def _no_script_errors(browser: object) -> None:
    """Nothing on the page failed: an error in a chart call would leave the rest of the page stale."""
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # type: ignore[attr-defined]
    assert not errors, errors


def _curve_points(browser: object, run_id: int) -> int:
    return int(browser.execute_script(  # type: ignore[attr-defined]
        "const c = document.getElementById('curves');"
        f"const t = (c && c.data || []).find(t => t.meta === {run_id}); return t ? t.x.length : 0;"))


def test_the_page_follows_a_live_experiment_without_reloading(study: Study, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    study.commit({"run.sh": GATED_RUNNER})
    spec = study.spec(arms=[{"name": "gated", "env": {"GATE": str(gate)}}], replicates=2, seed_env="SEED",
                      concurrency=1, train_timeout_s=120)
    log = (tmp_path / "research.log").open("w")
    research = subprocess.Popen([*CLI, "--home", str(study.home), "research", str(spec), "--skip-check"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=study.root)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (study.home / "ledger.db").exists():
            assert research.poll() is None and time.monotonic() < deadline, (tmp_path / "research.log").read_text()
            time.sleep(0.1)
        with dashboard(study.home) as url, headless_chromium() as browser:
            browser.get(url)
            # The experiment list: the experiment, live, with one run in flight.
            _wait(browser, "const r = document.querySelector('#experiments tr[data-experiment]');"
                           " return r && r.querySelector('.runs-running').textContent === '1';",
                  "the experiment list never showed the running run")
            assert browser.find_element("css selector", "#experiments .runs-done").text == "0/2"
            browser.find_element("css selector", "#experiments a").click()

            _wait(browser, "return document.querySelector('td.cell[data-status=running]') !== null",
                  "no running cell in the arms × replicates grid")
            browser.execute_script("window.notReloaded = true;")
            shots = Path(os.environ.get("RATIOCINATOR_SCREENSHOTS", tmp_path))
            run_id = int(browser.find_element("css selector", "td.cell[data-status=running]").get_attribute("data-run"))
            _wait(browser, f"const c = document.getElementById('curves');"
                           f" return (c.data || []).some(t => t.meta === {run_id} && t.x.length > 0)",
                  "the running run's curve never appeared")
            before = _curve_points(browser, run_id)
            _wait(browser, f"const c = document.getElementById('curves');"
                           f" const t = (c.data || []).find(t => t.meta === {run_id});"
                           f" return t.x.length > {before} + 3",
                  "the live run's curve gained no points")
            assert browser.find_element("css selector", f"td.cell[data-run='{run_id}']").get_attribute(
                "data-status") == "running"  # the curve grew while its run was alive
            browser.save_screenshot(str(shots / "dashboard_live.png"))

            (gate / "go-0").touch()
            _wait(browser, f"const c = document.querySelector(\"td.cell[data-run='{run_id}']\");"
                           " return c && c.dataset.status === 'succeeded'",
                  "the finished run never showed as succeeded")
            assert browser.execute_script("return window.notReloaded === true")  # updated in place
            assert browser.find_element("css selector", f"td.cell[data-run='{run_id}']").text == "100"
            assert browser.find_element("css selector", "#fact-done b").text == "1/2"

            (gate / "go-1").touch()
            assert research.wait(timeout=WAIT_S) == 0, (tmp_path / "research.log").read_text()
            _wait(browser, "return document.querySelector('#fact-status b').textContent === 'completed'",
                  "the page never showed the experiment completed")
            _wait(browser, "return document.getElementById('paper-link') !== null", "no link to the paper")
            assert browser.execute_script("return window.notReloaded === true")
            browser.save_screenshot(str(shots / "dashboard_experiment.png"))
            _no_script_errors(browser)
            assert browser.execute_script("return document.getElementById('curves').layout.yaxis.title.text") == "score"
            paper = browser.find_element("id", "paper-link").get_attribute("href")
            browser.get(paper)
            assert "gated" in browser.page_source
    finally:
        for seed in (0, 1):
            (gate / f"go-{seed}").touch()
        if research.poll() is None:
            research.terminate()
            research.wait(timeout=60)
        log.close()


def test_autoresearch_session_shows_attempts_with_decision_reason_and_diff(study: Study, tmp_path: Path) -> None:
    ledger = Ledger(study.home / "ledger.db")
    store = Store(ledger)
    session = store.create_session(tag="apr19", repo=str(study.repo.path), branch="autoresearch/apr19",
                                   base_branch="main", base_commit="a" * 40, program_path="program.yaml",
                                   program_text="metric: {name: val_bpb, direction: lower}\n", program_sha256="0" * 64,
                                   protected={})
    decisions = [("baseline", 1.0, "the unchanged code"), ("keep", 0.9, "0.9 < 1.0 beyond the noise floor"),
                 ("discard", 0.95, "0.95 is worse than the best 0.9"), ("crash", None, "exit 1: ValueError")]
    for i, (status, metric, reason) in enumerate(decisions):
        attempt = store.add_attempt(session.id, worker=0, parent="a" * 40, baseline=i == 0,
                                    hypothesis=f"try lr 0.0{i + 1}",
                                    diff=f"--- a/train.py\n+++ b/train.py\n@@\n-lr = 0.1\n+lr = 0.0{i + 1}\n".encode())
        store.finish_attempt(attempt.id, status=status, reason=reason, metric=metric)
    ledger.close()
    with dashboard(study.home) as url, headless_chromium() as browser:
        browser.get(url)
        _wait(browser, "return document.querySelector('#sessions a') !== null", "no session in the list")
        browser.find_element("css selector", "#sessions a").click()
        _wait(browser, "return document.querySelectorAll('#attempts tbody tr').length === 4",
              "the attempts never showed")
        rows = browser.find_elements("css selector", "#attempts tbody tr")
        assert [r.find_elements("css selector", "td")[2].text for r in rows] == ["baseline", "keep", "discard", "crash"]
        assert "beyond the noise floor" in rows[1].text
        rows[1].find_element("css selector", "summary").click()
        assert "+lr = 0.02" in rows[1].find_element("css selector", "pre.diff").text
        chart = browser.execute_script("return document.getElementById('progress-chart').data.map(t => t.y)")
        assert chart[0] == [1.0, 0.9, 0.95] and chart[1] == [1.0, 0.9, 0.9, 0.9]  # attempts, and the best so far
        _no_script_errors(browser)
        shots = Path(os.environ.get("RATIOCINATOR_SCREENSHOTS", tmp_path))
        browser.save_screenshot(str(shots / "dashboard_session.png"))


def test_dashboard_without_its_extra_says_what_to_install(study: Study, tmp_path: Path) -> None:
    Ledger(study.home / "ledger.db").close()
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['uvicorn'] = None\n")  # as if not installed
    done = study.cli("dashboard", "--port", "0", env={"PYTHONPATH": str(blocker)})
    assert done.returncode == 2
    assert "pip install 'ratiocinator[dashboard]'" in done.stderr and "uvicorn" in done.stderr


def test_dashboard_without_a_ledger_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "--home", str(tmp_path / "nowhere"), "dashboard"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "no ledger at" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "nowhere").exists()  # read-only: nothing was created
