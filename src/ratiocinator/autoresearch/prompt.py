"""The agent's prompt: the program's instructions, the results so far, the best, and the rules.

The agent is stateless between turns (a fresh coding-agent process or LLM call), so
everything it needs to choose the next experiment is written out every time: what has
been tried (kept, discarded, crashed, rejected) with its hypothesis, the current best
and which direction is better, what it may and may not touch, and how to answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from ratiocinator.autoresearch.agents import GIVE_UP_NAME, HYPOTHESIS_NAME, LOOP_DIR
from ratiocinator.autoresearch.program import LoadedProgram
from ratiocinator.autoresearch.store import Attempt

MAX_ROWS = 60


def build_prompt(loaded: LoadedProgram, *, attempts: Sequence[Attempt], best: Attempt, floor: float | None,
                 files: str | None) -> str:
    """The whole prompt for one turn; ``files`` is set for agents that cannot open files themselves (the LLM)."""
    program = loaded.program
    metric = program.metric
    better = "lower" if metric.lower_is_better else "higher"
    best_value = "n/a" if best.metric is None else f"{best.metric:.6f}"
    sections = [
        f"# Autoresearch {program.tag}: one experiment",
        (loaded.instructions.strip() or "Improve the metric with one focused change per attempt."),
        "## The metric\n"
        f"`{metric.name}` decides keep or discard: **{better} is better**. The current best is {best_value}"
        f" (commit {(best.commit_sha or best.parent_commit)[:7]}{'' if best.is_baseline else ': ' + best.hypothesis})."
        + _rule(program.k, floor, program.confidence),
        "## The rules\n"
        f"- You may edit only: {', '.join(f'`{p}`' for p in program.editable)}.\n"
        + (f"- Never touch: {', '.join(f'`{p}`' for p in program.protected)} (an edit there is rejected unrun).\n"
           if program.protected else "")
        + f"- Make ONE change. Do not commit, push or switch branches, and do not run the experiment: the loop commits,"
          f" runs `{program.run}` (budget {program.budget_s:g} s, killed at {program.hard_timeout_s:g} s) and"
          " decides.\n"
          "- Prefer simple changes: a tiny gain that adds a lot of code is not worth keeping.",
        "## Results so far\n" + _table(attempts, metric.name),
    ]
    measuring = [a for a in attempts if a.status == "running" and not a.is_baseline and a.commit_sha]
    if measuring:
        sections.append("## Being measured now\nThese attempts are running; their results are not in yet, so do not"
                        " repeat them:\n" + "\n".join(f"- #{a.iteration}: {a.hypothesis}" for a in measuring))
    if files is not None:
        sections.append("## The editable files\n" + (files or "(none tracked yet)"))
        sections.append("## Your reply\nOne JSON object: `hypothesis` (one sentence: the change and why it should"
                        " help), `diff` (a unified diff against the files above, `a/` and `b/` paths from the"
                        " repository root), and `give_up` (true only if nothing is left worth trying).")
    else:
        sections.append(
            "## Your reply\n"
            f"Edit the files in place. Write your one-sentence hypothesis (the change and why it should help) to"
            f" `{LOOP_DIR}/{HYPOTHESIS_NAME}`, or end your reply with a line `HYPOTHESIS: <one sentence>`."
            f" If nothing is left worth trying, create `{LOOP_DIR}/{GIVE_UP_NAME}` with the reason instead of editing."
        )
    return "\n\n".join(sections) + "\n"


def _rule(k: int, floor: float | None, confidence: float) -> str:
    if k <= 1:
        return " A change is kept only if its single run is strictly better than the best."
    noise = "" if floor is None else f" (the baseline's run-to-run noise is ±{floor:.6f})"
    return (f" Runs are noisy{noise}: a change that looks better is re-run to {k} runs and kept only if its mean"
            f" improvement exceeds the noise and is significant at {confidence:.0%} confidence.")


def _table(attempts: Sequence[Attempt], name: str) -> str:
    done = [a for a in attempts if a.status != "running"]
    if not done:
        return "(nothing yet)"
    shown = done[-MAX_ROWS:]
    rows = [f"| # | status | {name} | hypothesis |", "| --- | --- | --- | --- |"]
    if len(done) > len(shown):
        rows.append(f"| … | {len(done) - len(shown)} earlier attempts not shown | | |")
    for a in shown:
        value = "" if a.metric is None else f"{a.metric:.6f}"
        note = a.hypothesis if a.status not in ("crash", "violation", "interrupted") else f"{a.hypothesis} — {a.reason}"
        if a.failure and a.evidence.get("reason") and a.evidence["reason"] != a.reason:
            note += f" [{a.failure}: {a.evidence['reason']}]"  # the engine's class and what decided it
        rows.append(f"| {a.iteration} | {a.status} | {value} |"
                    f" {'baseline' if a.is_baseline else note.replace('|', '/')} |")
    return "\n".join(rows)
