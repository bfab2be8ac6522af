"""Loaded at start-up by a child interpreter of the tests (see tests/without_extras.py): the packages
named in RATIOCINATOR_TEST_BLOCK import as if they were not installed."""

import os
import sys

_BLOCKED = frozenset(filter(None, os.environ.get("RATIOCINATOR_TEST_BLOCK", "").split(",")))


class _NotInstalled:
    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _NotInstalled())
