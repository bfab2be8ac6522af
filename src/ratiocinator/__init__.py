"""Ratiocinator: an autonomous ML-research pipeline.

A research spec becomes planned experiment arms, budgeted runs recorded in a SQLite
ledger, and a report whose every number traces back to a recorded run.
"""

__version__ = "0.1.0"
