"""The data's two moments in an experiment: fetched and checked before anything is rented, then staged
on each host while its workspace is prepared, billed as ``staging`` and recorded in the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from ratiocinator.backends.base import Backend, Host, Workspace
from ratiocinator.data.local_copy import LocalCopy, local_copy
from ratiocinator.data.provenance import data_record, describe, human_size, refuse_changed_data
from ratiocinator.errors import BudgetError
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.budget import Budget, run_cost, run_worst_case
from ratiocinator.store.ledger import Ledger


async def fetch_before_renting(loaded: LoadedSpec, home: Path, ledger: Ledger, experiment_id: str,
                               say: Callable[[str], None]) -> LocalCopy | None:
    """This machine's copy of the data, fetched and checked before any host is acquired (a wrong sha256 or
    an unreachable URL costs nothing), and refused when it is not what this experiment's runs read."""
    if loaded.spec.data.source == "none":
        refuse_changed_data(ledger, experiment_id, None)
        return None
    say(f"data: {loaded.spec.data.source} source, fetching and checksumming on this machine")
    copy = await asyncio.to_thread(local_copy, loaded, home)
    assert copy is not None
    refuse_changed_data(ledger, experiment_id, copy)
    say(f"data: {len(copy.manifest.files)} file(s), {human_size(copy.size)}, tree hash {copy.tree_hash[:12]}")
    return copy


async def record_staging(copy: LocalCopy | None, loaded: LoadedSpec, backend: Backend, host: Host, ledger: Ledger,
                         budget: Budget, preparing: Awaitable[Workspace]) -> Workspace:
    """Await the workspace (which stages the data on each host); its staging time is charged at the host's
    price as ``staging`` (rented instances bill it in their own lifetime), and the data is recorded."""
    if copy is None:
        return await preparing
    price, timeout_s = host.price_per_hour, loaded.spec.download_timeout_s
    charge = None
    if price > 0 and backend.elastic() is None:
        worst = run_worst_case(price, timeout_s)
        charge = budget.reserve(worst, kind="staging", note=f"staging the data: ${price:g}/h × {timeout_s:g}s")
        if charge is None:
            raise BudgetError(budget.refusal("staging the data on the hosts", worst),
                              hint="raise max_dollars, or lower download_timeout_s (it bounds the staging)")
    staged_s = 0.0
    try:
        workspace = await preparing
        staged_s = max(workspace.staging_s.values(), default=0.0)  # the hosts stage side by side
    finally:
        if charge is not None:
            budget.settle(charge, run_cost(price, staged_s, timeout_s))
    record = data_record(copy, workspace.staging_s)
    ledger.record_data(budget.experiment_id, record, describe(record))
    return workspace
