"""The live web dashboard (``ratiocinator dashboard``): a read-only view of a home's ledger in the browser.

Experiments with their status, spend and budget; per experiment the arms × replicates grid, the
goal per arm with confidence intervals, learning curves streamed while runs are alive, failures
with their evidence, readiness reviews, the planner's decisions and the paper; autoresearch
sessions with their progress and every attempt's diff. Served by uvicorn on 127.0.0.1, updated by
server-sent events, charted with the plotly.js that ships inside the ``plotly`` package.
"""
