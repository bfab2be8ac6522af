"""Is the code ready to spend money on: static checks, smoke runs and a verified LLM review."""
