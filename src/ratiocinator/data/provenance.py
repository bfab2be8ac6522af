"""What the ledger keeps about the data, and the rule that a resumed experiment reads the same data.

A resumed experiment whose finished runs read one dataset must not add runs that read
another: their results would be pooled as if they were one study. So when the data's tree
hash differs from the one recorded, the start is refused, naming both.
"""

from __future__ import annotations

from ratiocinator.data.local_copy import LocalCopy
from ratiocinator.errors import DataError
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.records import DataRecord

DIRECTORIES = ("local", "rsync", "hf")  # sources whose checksum is a tree hash, not a file's sha256


def human_size(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def refuse_changed_data(ledger: Ledger, experiment_id: str, copy: LocalCopy | None) -> None:
    """A `DataError` when runs of this experiment already read data with another tree hash."""
    earlier = ledger.data_records(experiment_id)
    if not earlier or not ledger.runs(experiment_id):
        return
    before = earlier[-1]
    now = copy.tree_hash if copy is not None else None
    if now == before.tree_hash:
        return
    sources = ", ".join(s["resolved"] for s in before.sources) or "the spec's data"
    current = "no data" if copy is None else (f"tree hash {now} ({human_size(copy.size)},"
                                              f" {len(copy.manifest.files)} files)")
    raise DataError(
        f"the data changed since this experiment's runs read it: they read {sources} with tree hash"
        f" {before.tree_hash} ({human_size(before.size)}, {before.files} files), and it now has"
        f" {current};"
        " mixing the two would pool results from different datasets",
        hint="restore the data the runs read, or start a new experiment on the new data with `research --new`")


def data_record(copy: LocalCopy, staging_s: dict[str, float]) -> DataRecord:
    return DataRecord(copy.tree_hash, copy.size, len(copy.manifest.files), [s.to_json() for s in copy.sources],
                      staging_s)


def describe(record: DataRecord) -> str:
    """One line for the paper and `check`: what the runs read, with its checksums."""
    if len(record.sources) == 1 and record.sources[0]["kind"] in DIRECTORIES:
        source = record.sources[0]
        where = {"local": "local directory", "rsync": "rsync directory", "hf": "Hugging Face"}[source["kind"]]
        return (f"{where} {source['resolved']}: {record.files} files, {human_size(record.size)},"
                f" tree hash {record.tree_hash}")
    parts = []
    for s in record.sources:
        moved = f" (redirected to {s['resolved']})" if s["resolved"] != s["location"] else ""
        checksum = "tree hash" if s["kind"] in DIRECTORIES else "sha256"
        parts.append(f"{s['location']}{moved}: {human_size(s['size'])}, {checksum} {s['sha256']}")
    return (f"{'; '.join(parts)}; the runs' directory: {record.files} files, {human_size(record.size)},"
            f" tree hash {record.tree_hash}")


def describe_copy(copy: LocalCopy) -> str:
    return describe(data_record(copy, {}))
