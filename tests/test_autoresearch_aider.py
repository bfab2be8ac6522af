"""A real coding agent in the loop: aider, run by `agent.kind: command`, against a loopback
OpenAI-compatible server that plays a scripted model.

aider pins many exact dependency versions, so it lives in its own venv (``make test`` creates
``.venv-aider``; ``RATIOCINATOR_AIDER`` names another aider). Without it the test skips, saying
why, unless ``RATIOCINATOR_REQUIRE_AIDER=1`` (CI) makes that a failure. The command line below is
the one docs/autoresearch.md gives as tested.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llmserver import LlmServer, Reply
from test_autoresearch import TARGET, Lab, new_lab

ROOT = Path(__file__).resolve().parent.parent
AIDER_FLAGS = ("--model openai/scripted-model --edit-format whole --no-stream --yes-always --no-auto-commits"
               " --no-dirty-commits --no-gitignore --no-auto-lint --map-tokens 0 --no-check-update"
               " --analytics-disable --no-show-model-warnings --no-pretty --no-fancy-input"
               " --no-restore-chat-history --chat-history-file .autoresearch/aider.chat.md"
               " --input-history-file .autoresearch/aider.input --llm-history-file .autoresearch/aider.llm.md")


def aider_binary() -> str:
    found = os.environ.get("RATIOCINATOR_AIDER") or str(ROOT / ".venv-aider" / "bin" / "aider")
    if os.access(found, os.X_OK) or shutil.which(found):
        return found
    why = f"aider not found at {found}"
    if os.environ.get("RATIOCINATOR_REQUIRE_AIDER") == "1":
        pytest.fail(f"{why}, and RATIOCINATOR_REQUIRE_AIDER=1: run `make .venv-aider/bin/aider`")
    pytest.skip(f"{why}: `make .venv-aider/bin/aider` installs it (its own venv)")


def whole_file(hypothesis: str, edits: dict[str, str]) -> str:
    """A model reply in aider's `whole` edit format: the new config.py, after a hypothesis line."""
    text = (TARGET / "config.py").read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    return f"HYPOTHESIS: {hypothesis}\n\nconfig.py\n```python\n{text}```\n"


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


@pytest.mark.subprocess
def test_aider_edits_are_committed_run_and_kept_or_discarded(lab: Lab) -> None:
    aider = aider_binary()
    with LlmServer() as server:
        server.script(
            Reply(whole_file("six layers fit the data better than four", {"DEPTH = 4": "DEPTH = 6"})),
            Reply(whole_file("halving the width trains faster at no loss", {"WIDTH = 64": "WIDTH = 32"})),
        )
        program = lab.program("aider", max_iterations=2, agent={
            "kind": "command", "timeout_s": 300,
            "command": f"{aider} config.py --message-file {{prompt_file}} {AIDER_FLAGS}"})
        outcome = lab.run(program, OPENAI_API_BASE=server.base_url("openai"), OPENAI_API_KEY="sk-scripted",
                          LITELLM_LOCAL_MODEL_COST_MAP="True", HOME=str(lab.root / "aider-home"))
        requests = list(server.requests)
    assert outcome.exit_code == 0 and "max_iterations reached (2)" in outcome.reason, outcome.reason
    assert len(requests) == 2  # one model call per agent turn
    first = "\n".join(str(m.get("content")) for m in requests[0].body["messages"])
    assert "one-sentence hypothesis" in first and "DEPTH = 4" in first  # our prompt, and the file aider added

    attempts = lab.attempts("aider")
    assert [(a.status, a.hypothesis) for a in attempts] == [
        ("baseline", "baseline"),
        ("keep", "six layers fit the data better than four"),
        ("discard", "halving the width trains faster at no loss")]
    kept, discarded = attempts[1], attempts[2]
    assert b"-DEPTH = 4\n+DEPTH = 6" in kept.diff and b"-WIDTH = 64\n+WIDTH = 32" in discarded.diff
    assert lab.kept_history("aider") == [kept.commit_sha]  # the edit was committed by the loop, not by aider
    assert lab.repo.git("show", "autoresearch/aider:config.py").count("DEPTH = 6") == 1
    assert kept.metric is not None and discarded.metric is not None and discarded.metric > kept.metric
    assert "\tkeep\tsix layers fit the data better than four" in lab.results("aider")
