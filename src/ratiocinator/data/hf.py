"""A Hugging Face dataset or model repository at a revision (``source: hf``), through ``huggingface_hub``
(the optional extra ``ratiocinator[hf]``) into the home's Hub cache.

The revision (a branch, a tag or a commit) is resolved to its commit on every start, and the
commit is what the ledger records: files already fetched for it are not fetched again, and a
branch that moved under a resumed experiment shows as changed data. The token is read only
from ``HF_TOKEN`` and only when the spec's ``pass_env`` names it, so a study never sends a
credential its author did not pass on purpose; the token never reaches the ledger.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratiocinator.errors import DataError
from ratiocinator.spec.models import LoadedSpec

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_VARIABLE = "HF_TOKEN"


@dataclass(frozen=True)
class Snapshot:
    path: Path  # the files of the commit (links into the Hub cache's blobs)
    commit: str
    resolved: str  # "datasets/org/name@<commit>" on the endpoint


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise DataError("data.source 'hf' needs the huggingface_hub package, which is not installed",
                        hint="pip install 'ratiocinator[hf]'") from None
    return huggingface_hub


def token(loaded: LoadedSpec) -> str | bool:
    """``HF_TOKEN`` when the spec passes it on purpose (``pass_env``), else False: no implicit login."""
    passed = any(fnmatch.fnmatchcase(TOKEN_VARIABLE, p) for p in loaded.spec.pass_env)
    value = os.environ.get(TOKEN_VARIABLE) if passed else None
    return value or False


def endpoint(loaded: LoadedSpec) -> str:
    return (loaded.spec.data.endpoint or DEFAULT_ENDPOINT).rstrip("/")


def _where(loaded: LoadedSpec) -> str:
    data = loaded.spec.data
    return f"{loaded.where('data', 'repo')}: {data.repo_type} {data.repo}@{data.revision}"


def _refusal(loaded: LoadedSpec, exc: Exception) -> DataError:
    """A Hub error as something the user can act on."""
    errors = _hub().errors
    name = type(exc).__name__
    if isinstance(exc, errors.RevisionNotFoundError):
        return DataError(f"{_where(loaded)}: the revision does not exist",
                         hint="check data.revision (a branch, a tag or a commit of the repository)")
    if isinstance(exc, errors.GatedRepoError | errors.RepositoryNotFoundError):
        return DataError(f"{_where(loaded)}: the Hub does not show this repository ({name}): it is private or gated,"
                         " or it does not exist",
                         hint=f"check data.repo and data.repo_type; for a private or gated one, export {TOKEN_VARIABLE}"
                              f" and name it in the spec's pass_env")
    return DataError(f"{_where(loaded)}: the Hub at {endpoint(loaded)} could not be read: {name}: {exc}",
                     hint="check the network and data.endpoint; run again to continue a partial download")


def resolve(loaded: LoadedSpec, *, timeout_s: float = 15.0) -> tuple[str, int | None, int]:
    """(commit, bytes, files) of the revision, from the Hub's API; nothing is downloaded."""
    hub = _hub()
    data = loaded.spec.data
    api = hub.HfApi(endpoint=endpoint(loaded))
    try:
        info = api.repo_info(data.repo, revision=data.revision, repo_type=data.repo_type, timeout=timeout_s,
                             token=token(loaded))
        entries = [e for e in api.list_repo_tree(data.repo, revision=info.sha, repo_type=data.repo_type,
                                                 recursive=True, token=token(loaded))
                   if isinstance(e, hub.hf_api.RepoFile)]
    except (hub.errors.HfHubHTTPError, hub.errors.RevisionNotFoundError, hub.errors.RepositoryNotFoundError,
            OSError) as exc:
        raise _refusal(loaded, exc) from None
    sizes = [e.size for e in entries]
    return str(info.sha), (sum(sizes) if all(s is not None for s in sizes) else None), len(entries)


def snapshot(loaded: LoadedSpec, cache: Path, deadline_s: float, *, refresh: bool = True) -> Snapshot:
    """The revision's files in ``cache`` (the Hub's own cache layout), fetched where missing; without
    ``refresh``, the commit the cache last resolved the revision to, when it has one."""
    hub = _hub()
    data = loaded.spec.data
    options = {"repo_type": data.repo_type, "revision": data.revision, "cache_dir": cache,
               "endpoint": endpoint(loaded), "token": token(loaded)}
    if not refresh:
        try:
            return _snapshot(loaded, hub.snapshot_download(data.repo, local_files_only=True, **options))
        except hub.errors.LocalEntryNotFoundError:
            pass  # nothing here yet: fetch it
    try:
        path = hub.snapshot_download(data.repo, etag_timeout=min(deadline_s, 60), **options)
    except (hub.errors.HfHubHTTPError, hub.errors.RevisionNotFoundError, hub.errors.RepositoryNotFoundError,
            hub.errors.LocalEntryNotFoundError, OSError) as exc:
        raise _refusal(loaded, exc) from None
    return _snapshot(loaded, path)


def _snapshot(loaded: LoadedSpec, path: str) -> Snapshot:
    data = loaded.spec.data
    commit = Path(path).name  # the Hub cache names a snapshot by its commit
    return Snapshot(Path(path), commit, f"{endpoint(loaded)}/{'datasets/' if data.repo_type == 'dataset' else ''}"
                                        f"{data.repo}@{commit}")
