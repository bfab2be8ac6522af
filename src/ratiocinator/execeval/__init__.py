"""Execution-aware evaluation of generated code, in a sandbox."""
