"""Renting GPUs on Vast.ai: the backend, its REST client, and the reaper."""
