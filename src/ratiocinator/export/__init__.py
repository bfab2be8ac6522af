"""Hand an experiment to the tools researchers already use: every streamed metric point as a
long table (CSV or Parquet, `series`) and MLflow runs (`mlflow_export`).

These read the ledger and never write to it; the run-level exports that come with every paper
(runs.csv, runs.json, results.tsv) live beside the paper in `ratiocinator.report.exports`.
"""
