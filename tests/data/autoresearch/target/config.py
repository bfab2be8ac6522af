"""Model configuration: the only file the agent may edit."""

# ---- depth --------------------------------------------------------------
# More layers help, up to a point (see evaluate.py).

DEPTH = 4

# ---- width --------------------------------------------------------------
# Wider layers help, and cost memory.

WIDTH = 64

# ---- notes --------------------------------------------------------------
# A free-form note: changes nothing real, only which seed-noise draw a run gets.

NOTE = "baseline"

# ---- extras -------------------------------------------------------------
# Below this line: experiments.

EXTRAS = ()
