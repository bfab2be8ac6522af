"""The autoresearch report's cost section: what each kept improvement cost, every dollar a traced fact.

A session is written into a real ledger with known charges at known times (runs and LLM turns
of attempts, LLM turns that made no attempt, a rented instance, an open reservation), and the
report's numbers are checked against the same sums done by hand, then rebuilt by verify.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratiocinator.autoresearch.results import write_outputs
from ratiocinator.autoresearch.session_report import session_program
from ratiocinator.autoresearch.store import Store
from ratiocinator.report.verify import verify_report
from ratiocinator.store import instances as inst
from ratiocinator.store.ledger import Ledger
from test_autoresearch import shown_text

PROGRAM = ("repo: repo\ntag: {tag}\neditable: [train.py]\nrun: python train.py\n"
           "metric: {{name: val_bpb, direction: lower}}\nbudget_s: 300\nmax_dollars: 5\nagent: {agent}\n")
START = 1_000_000.0  # the session's start; every time below is seconds after it


def _charge(store: Store, session_id: int, kind: str, amount: float, at: float, attempt_id: int | None = None) -> int:
    charge = store.reserve(session_id, amount=amount, limit=None, kind=kind, attempt_id=attempt_id)
    assert charge is not None
    store.settle(charge, amount)
    store.db.execute("UPDATE ar_charges SET settled_at = ? WHERE id = ?", (START + at, charge))
    return charge


def _session(store: Store, tag: str, agent: str) -> int:
    session = store.create_session(tag=tag, repo="/src/nanochat", branch=f"autoresearch/{tag}", base_branch="main",
                                   base_commit="c0ffee1234567890", program_path=f"{tag}.yaml",
                                   program_text=PROGRAM.format(tag=tag, agent=agent), program_sha256="0" * 64,
                                   protected={})
    store.db.execute("UPDATE ar_sessions SET created_at = ? WHERE id = ?", (START, session.id))
    return session.id


def _attempt(store: Store, session_id: int, status: str, metric: float | None, ended: float, *,
             charges: tuple[tuple[str, float], ...] = (), baseline: bool = False) -> int:
    a = store.add_attempt(session_id, worker=0, parent="c0ffee1234567890", baseline=baseline,
                          hypothesis="" if baseline else f"change ending at {ended:g} s")
    for kind, amount in charges:
        _charge(store, session_id, kind, amount, ended, attempt_id=a.id)
    best = status in ("baseline", "keep")
    store.finish_attempt(a.id, status=status, reason=f"{status} by hand", best_of=session_id if best else None,
                         values=[metric] if metric is not None else [], metric=metric,
                         commit_sha=f"{int(ended):07d}beef" if metric is not None else None)
    store.db.execute("UPDATE ar_attempts SET ended_at = ? WHERE id = ?", (START + ended, a.id))
    return a.id


def costed_session(home: Path) -> tuple[Path, dict[str, int]]:
    """A session with known money, written the way the loop writes it; returns its directory and attempt ids.

    Runs cost $0.10 ($0.05 for the crash), each attempt's LLM turn $0.02, two turns made no attempt
    ($0.03 at 25 s, $0.01 at 65 s), one instance cost $1.00 over its 100 s ($0.01 a second), and
    an LLM turn of $0.05 is still reserved.
    """
    store = Store(Ledger(home / "ledger.db"))
    sid = _session(store, "paid", "{kind: llm}")
    run, turn = ("compute", 0.10), ("llm", 0.02)
    ids = {"baseline": _attempt(store, sid, "baseline", 1.00, 10, charges=(run,), baseline=True),
           "discard1": _attempt(store, sid, "discard", 1.01, 20, charges=(turn, run))}
    _charge(store, sid, "llm", 0.03, 25)
    ids["keep2"] = _attempt(store, sid, "keep", 0.98, 30, charges=(turn, run))
    ids["crash3"] = _attempt(store, sid, "crash", None, 40, charges=(turn, ("compute", 0.05)))
    ids["keep4"] = _attempt(store, sid, "keep", 0.97, 50, charges=(turn, run))
    ids["discard5"] = _attempt(store, sid, "discard", 0.99, 60, charges=(turn, run))
    _charge(store, sid, "llm", 0.01, 65)
    instance_charge = _charge(store, sid, "instance", 1.00, 100)
    row = inst.record_requested(store.ledger, experiment_id=None, provider="vast", ar_session_id=sid,
                                offer={"gpu_name": "RTX_4090", "dph_total": 36.0}, deadline=START + 200,
                                charges=[instance_charge])
    inst.update(store.ledger, row.id, provider_id="4242", state="destroyed", created_at=START,
                destroyed_at=START + 100, cost=1.00, cost_source="lifetime x price")
    assert store.reserve(sid, amount=0.05, limit=None, kind="llm") is not None
    store.update_session(sid, status="done", reason="max_iterations reached")
    directory = _write(home, store, sid)
    store.close()
    return directory, ids


def _write(home: Path, store: Store, session_id: int) -> Path:
    session = store.session(session_id)
    directory = home / "autoresearch" / session.tag
    directory.mkdir(parents=True)
    spent, _ = store.money(session_id)
    write_outputs(directory, session, store.attempts(session_id), session_program(session), floor=None,
                  spent=spent, ledger=home / "ledger.db")
    return directory


def _facts(directory: Path) -> dict[str, dict[str, object]]:
    return {f["key"]: f for f in json.loads((directory / "facts.json").read_text())["facts"]}


def test_each_kept_improvement_is_charged_its_stretch_as_computed_by_hand(tmp_path: Path) -> None:
    directory, ids = costed_session(tmp_path)
    facts = _facts(directory)
    keep2, keep4 = f"keep[{ids['keep2']}]", f"keep[{ids['keep4']}]"
    # Stretches end at the baseline (10 s), keep #2 (30 s) and keep #4 (50 s); the instance's $1.00 over
    # 100 s falls $0.10, $0.20, $0.20 and $0.50 into them.
    by_hand = {
        "baseline": (1, 0.10, 0.00, 0.10, 0.20),
        keep2: (2, 0.12 + 0.12, 0.03, 0.20, 0.47),  # discard #1 and keep #2, and the empty turn at 25 s
        keep4: (2, 0.07 + 0.12, 0.00, 0.20, 0.39),  # crash #3 and keep #4
        "after_last_keep": (1, 0.12, 0.01, 0.50, 0.63),  # discard #5, the empty turn at 65 s, the last 50 s
    }
    for stretch, (attempts, paid, empty_turns, rented, total) in by_hand.items():
        key = f"cost.{stretch}"
        assert facts[f"{key}.attempts"]["value"] == attempts
        for part, dollars in (("attempts_usd", paid), ("llm_turns_usd", empty_turns),
                              ("instances_usd", rented), ("total_usd", total)):
            assert facts[f"{key}.{part}"]["value"] == pytest.approx(dollars), f"{key}.{part}"
    assert facts[f"cost.{keep2}.total_usd"]["run_ids"] == [ids["discard1"], ids["keep2"]]
    # $0.47 for 1.00 -> 0.98, $0.39 for 0.98 -> 0.97: dollars per unit of val_bpb.
    assert facts[f"cost.{keep2}.per_unit"]["value"] == pytest.approx(0.47 / 0.02)
    assert facts[f"cost.{keep4}.per_unit"]["text"] == "$39.00"
    assert facts[f"cost.{keep4}.per_unit"]["run_ids"] == sorted([ids["crash3"], ids["keep4"], ids["keep2"]])
    assert facts["spent"]["value"] == pytest.approx(sum(t[-1] for t in by_hand.values())) == pytest.approx(1.69)
    assert facts["reserved"]["text"] == "$0.05"

    shown = shown_text((directory / "report.md").read_text())
    assert "Spent $1.69 of a 5 dollar limit (settled charges); $0.05 is still reserved." in shown
    assert ("| Stretch | Commit | val\\_bpb | Attempts | Runs + LLM | Empty turns | Instances | Total |"
            " $/unit |") in shown
    assert "| keep #2 | 0000030 | 1.000000 → 0.980000 | 2 | $0.24 | $0.03 | $0.20 | $0.47 | $23.50 |" in shown
    assert "| after keep #4 | — | — | 1 | $0.12 | $0.01 | $0.50 | $0.63 | — |" in shown
    assert shown.index("## Cost") < shown.index("## Every attempt")

    result = verify_report(Ledger(tmp_path / "ledger.db"), directory)
    assert result.ok, result.mismatches
    html = (directory / "report.html").read_text()
    forged = f'">{facts[f"cost.{keep4}.instances_usd"]["text"]}</a>'
    assert forged in html
    (directory / "report.html").write_text(html.replace(forged, '">$0.02</a>', 1))
    assert any("shows $0.02" in m for m in verify_report(Ledger(tmp_path / "ledger.db"), directory).mismatches)


def test_a_session_that_spent_nothing_gets_a_note_instead_of_a_table_of_zeros(tmp_path: Path) -> None:
    store = Store(Ledger(tmp_path / "ledger.db"))
    sid = _session(store, "free", "{kind: command, command: 'true'}")
    _attempt(store, sid, "baseline", 1.00, 10, baseline=True)
    _attempt(store, sid, "keep", 0.98, 20)
    _attempt(store, sid, "discard", 0.99, 30)
    directory = _write(tmp_path, store, sid)
    store.close()
    shown = shown_text((directory / "report.md").read_text())
    assert "## Cost" not in shown
    assert "Cost: none. The runs were free, no LLM turn was paid for and nothing was rented" in shown
    assert not [key for key in _facts(directory) if key.startswith("cost.")]
    assert verify_report(Ledger(tmp_path / "ledger.db"), directory).ok
