"""The researcher's repository: mirror, checkout, LFS, deps, and the knobs its runner reads."""
