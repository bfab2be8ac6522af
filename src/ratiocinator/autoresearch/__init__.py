"""Autoresearch: the keep/discard loop over an agent's code edits — noise-aware, tamper-proof,
parallel, resumable, and losing nothing.

``ratiocinator autoresearch PROGRAM.yaml`` runs a session (see `loop`);
``ratiocinator autoresearch-log PROGRAM.yaml`` lists its attempts and recreates any of them
(see `log`). The program file is described in `program`.
"""

from __future__ import annotations

from ratiocinator.autoresearch.loop import AutoResearch, Outcome
from ratiocinator.autoresearch.program import LoadedProgram, Program, load_program

__all__ = ["AutoResearch", "LoadedProgram", "Outcome", "Program", "load_program"]
