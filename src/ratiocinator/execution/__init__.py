"""Running the plan: executor, elastic capacity, metric parsing, failure diagnosis, progress."""
