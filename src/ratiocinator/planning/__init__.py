"""What to run: the plan (arms x replicates), the planner seam, Optuna search and the LLM planner."""
