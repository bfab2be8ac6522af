"""``ratiocinator verify``: recompute every number of a report from the ledger.

A report directory holds ``facts.json`` (each fact's key, text and runs, and how
often each document cites it) beside the rendered papers. Verification rebuilds the
facts from the ledger with the same code that wrote them and checks three things:
the recorded facts still hold, every number the documents display equals its
recomputed text, and no cited number was dropped or added by hand. Any difference
is a mismatch: an edited paper, or a ledger that moved on since the report (stale).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ratiocinator.errors import UsageError
from ratiocinator.report.document import fact_occurrences
from ratiocinator.report.facts import FactBook
from ratiocinator.report.paper import build_paper
from ratiocinator.report.publish import DOCUMENTS, FACTS_FILE
from ratiocinator.store.ledger import Ledger


@dataclass
class Verification:
    experiment_id: str  # or "autoresearch session TAG"
    facts: int = 0
    citations: int = 0
    documents: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def read_facts(report_dir: Path) -> dict:
    path = Path(report_dir) / FACTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{report_dir} is not a report directory: {FACTS_FILE} is missing",
                         hint="pass the directory `ratiocinator report EXPERIMENT` printed") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} cannot be read: {exc}",
                         hint="rewrite the report with `ratiocinator report EXPERIMENT`") from None
    from ratiocinator.autoresearch.session_report import SESSION_KEY  # the autoresearch package loads on demand

    if not isinstance(data, dict) or not isinstance(data.get("facts"), list) or (
            "experiment_id" not in data and SESSION_KEY not in data):
        raise UsageError(f"{path} is not a facts file written by ratiocinator")
    return data


def _rebuilt(ledger: Ledger, recorded: dict) -> tuple[str, FactBook, dict[str, str]]:
    """(what the report is of, its facts as the ledger gives them now, its documents and their formats)."""
    from ratiocinator.autoresearch.session_report import DOCUMENTS as SESSION_DOCUMENTS
    from ratiocinator.autoresearch.session_report import SESSION_KEY, rebuilt_book
    from ratiocinator.autoresearch.store import Store

    if SESSION_KEY in recorded:
        tag = recorded[SESSION_KEY]
        book = rebuilt_book(Store(ledger), tag)
        if book is None:
            raise UsageError(f"the ledger at {ledger.path} has no autoresearch session '{tag}'",
                             hint="pass --home with the directory the session ran in")
        return f"autoresearch session {tag}", book, SESSION_DOCUMENTS
    return recorded["experiment_id"], build_paper(ledger, recorded["experiment_id"], figures=False).book, DOCUMENTS


def verify_report(ledger: Ledger, report_dir: Path) -> Verification:
    report_dir = Path(report_dir)
    recorded = read_facts(report_dir)
    subject, book, documents = _rebuilt(ledger, recorded)
    result = Verification(subject)
    by_id = {}
    for entry in recorded["facts"]:
        key, fid = entry.get("key"), entry.get("id")
        by_id[fid] = entry
        now = book.facts.get(key)
        if now is None:
            result.mismatches.append(f"{fid} ({key}): the ledger no longer yields this number (report shows"
                                     f" {entry.get('text')})")
        elif now.text != entry.get("text"):
            result.mismatches.append(f"{fid} ({key}): recorded {entry.get('text')}, the ledger gives {now.text}")
        elif list(now.run_ids) != entry.get("run_ids"):
            result.mismatches.append(f"{fid} ({key}): recorded runs differ from the ledger's")
    recorded_keys = {e.get("key") for e in recorded["facts"]}
    fresh = [f.key for f in book if f.key not in recorded_keys]
    if fresh:
        result.mismatches.append(f"the ledger now yields {len(fresh)} number(s) the report lacks (it is stale), e.g."
                                 f" {fresh[0]}")
    result.facts = len(recorded["facts"])

    for name, fmt in documents.items():
        path = report_dir / name
        expected_counts: dict[str, int] = recorded.get("documents", {}).get(name, {})
        if not path.exists():
            result.mismatches.append(f"{name}: missing")
            continue
        result.documents.append(name)
        counts: dict[str, int] = {}
        for fid, shown in fact_occurrences(fmt, path.read_text(encoding="utf-8", errors="replace")):
            counts[fid] = counts.get(fid, 0) + 1
            result.citations += 1
            entry = by_id.get(fid)
            if entry is None:
                result.mismatches.append(f"{name}: cites {fid}, which is not a fact of this report")
                continue
            now = book.facts.get(entry["key"])
            expected = now.text if now is not None else entry.get("text")
            if shown != expected:
                result.mismatches.append(f"{name}: {fid} ({entry['label']}) shows {shown}, the ledger gives {expected}")
        for fid in sorted(set(counts) | set(expected_counts), key=lambda f: int(f[1:]) if f[1:].isdigit() else 0):
            if counts.get(fid, 0) != expected_counts.get(fid, 0):
                result.mismatches.append(
                    f"{name}: {fid} is cited {counts.get(fid, 0)} time(s), the report was written with "
                    f"{expected_counts.get(fid, 0)} (a traced number was removed, untagged or added by hand)"
                )
    return result
