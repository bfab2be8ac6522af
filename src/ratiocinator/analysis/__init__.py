"""Statistics over the ledger: per-arm summaries, tests, effect sizes, the noise floor."""
