"""The readiness review: is this code ready to spend money on? Decided by evidence.

``ratiocinator check SPEC`` and the start of ``research`` run the same review:

* static: the runner exists and can start; every Python file it reaches compiles and
  every shell script it reaches passes ``bash -n``; no placeholders; the requirements
  resolve; no Git LFS pointers; every arm's knobs are read by the code;
* smoke: each distinct arm once in trial mode (``RATIOCINATOR_TRIAL=1``), which must
  report the goal metric, finite (classified like any run);
* cross-arm: arms that differ but measure exactly the same flag the knob that changes
  nothing;
* an optional LLM review whose checkable claims are verified before they count.

The verdict is JSON ``{"is_code_ready", "code_issue", "checks": [...]}``; each check has a
status (passed, failed, warning, skipped), a summary and its evidence. Only failed
checks make the code not ready.
"""

from __future__ import annotations

import asyncio
import math
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ratiocinator.backends.base import Backend, Host, Workspace
from ratiocinator.check.smoke import SmokeOutcome, distinct_arms, run_smoke, unchanged_knobs
from ratiocinator.check.static import (
    Finding,
    lfs_pointer_findings,
    placeholders,
    python_syntax_errors,
    requirements_findings,
)
from ratiocinator.errors import RatiocinatorError
from ratiocinator.execution import contract
from ratiocinator.execution.failures import Failure
from ratiocinator.planning.plan import Plan, did_you_mean, find_ignored_knobs, runner_knobs
from ratiocinator.repo.knobs import KnobReport
from ratiocinator.repo.workspace import venv_base_python
from ratiocinator.spec.advice import absolute_deps_paths
from ratiocinator.spec.models import LoadedSpec

if TYPE_CHECKING:
    from ratiocinator.llm.config import LlmConfig
    from ratiocinator.llm.providers import Provider

Status = Literal["passed", "failed", "warning", "skipped"]
BLOCKS_SMOKE = ("runner", "syntax", "requirements", "knobs")
SHELL_CHECK_TIMEOUT_S = 30


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    summary: str
    evidence: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary, "evidence": list(self.evidence)}


@dataclass
class Readiness:
    checks: list[CheckResult] = field(default_factory=list)
    commit: str | None = None

    @property
    def is_code_ready(self) -> bool:
        return not any(c.status == "failed" for c in self.checks)

    @property
    def code_issue(self) -> str:
        return "; ".join(f"{c.name}: {c.summary}" for c in self.checks if c.status == "failed")

    def check(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"is_code_ready": self.is_code_ready, "code_issue": self.code_issue, "commit": self.commit,
                "checks": [c.to_json() for c in self.checks]}


def _findings(findings: Sequence[Finding]) -> tuple[dict[str, Any], ...]:
    return tuple(f.to_json() for f in findings)


def _shown(findings: Sequence[Finding], limit: int = 3) -> str:
    text = "; ".join(f"{f.where()}: {f.message}" if f.where() else f.message for f in findings[:limit])
    return text + (f" (and {len(findings) - limit} more)" if len(findings) > limit else "")


# -- static ------------------------------------------------------------------------------------


def static_checks(loaded: LoadedSpec, checkout: Path, knobs: KnobReport, plan: Plan,
                  env: Mapping[str, str] | None = None) -> list[CheckResult]:
    """Everything decidable without running the code."""
    spec = loaded.spec
    env = dict(os.environ if env is None else env)
    python_files = list(knobs.python_files)
    shell_files = [f for f in knobs.files if f not in python_files]
    checks = [runner_check(checkout, spec.runner_script, env)]

    syntax = python_syntax_errors(checkout, python_files) + shell_syntax_errors(checkout, shell_files)
    checks.append(CheckResult("syntax", "failed", _shown(syntax), _findings(syntax)) if syntax else CheckResult(
        "syntax", "passed",
        f"{len(python_files)} Python and {len(shell_files)} shell file(s) the runner reaches parse"))

    found = placeholders(checkout, python_files)
    blocking = [f for f in found if not _is_note(f)]
    notes = [f for f in found if _is_note(f)]
    if blocking:
        checks.append(CheckResult("placeholders", "failed", _shown(blocking), _findings(blocking + notes)))
    elif notes:
        checks.append(CheckResult("placeholders", "warning", f"TODO/FIXME notes in function bodies: {_shown(notes)}",
                                  _findings(notes)))
    else:
        checks.append(CheckResult("placeholders", "passed", "no stub bodies, omitted code or TODOs in function bodies"))

    if spec.deps.requirements is None:
        checks.append(CheckResult("requirements", "skipped", "the spec names no requirements file (deps.requirements)"))
    else:
        problems = requirements_findings(checkout, spec.deps.requirements, spec.deps.exclude_from_requirements,
                                         venv_base_python(), timeout_s=spec.download_timeout_s, env=env)
        unchecked = [p for p in problems if p.kind == "requirements_unchecked"]
        real = [p for p in problems if p.kind != "requirements_unchecked"]
        if real:
            checks.append(CheckResult("requirements", "failed", _shown(real), _findings(problems)))
        elif unchecked:
            checks.append(CheckResult("requirements", "warning", _shown(unchecked), _findings(unchecked)))
        else:
            checks.append(CheckResult("requirements", "passed", f"{spec.deps.requirements} resolves (pip dry run)"))

    misplaced = absolute_deps_paths(loaded)
    if misplaced:
        checks.append(CheckResult("deps_paths", "warning", misplaced[0].removeprefix("warning: ")
                                  + (f" (and {len(misplaced) - 1} more)" if len(misplaced) > 1 else ""),
                                  tuple({"message": m.removeprefix("warning: ")} for m in misplaced)))

    pointers = lfs_pointer_findings(checkout)
    checks.append(CheckResult("lfs", "failed", _shown(pointers), _findings(pointers)) if pointers else
                  CheckResult("lfs", "passed", "no Git LFS pointer files in the checkout"))

    ignored = find_ignored_knobs(loaded, plan, knobs)
    if ignored:
        names = runner_knobs(knobs)
        read = ", ".join(names) or "none"
        checks.append(CheckResult(
            "knobs", "failed",
            "; ".join(f"arm '{i.arm}' sets {i.knob}, which {spec.runner_script} never reads"
                      + did_you_mean(i.knob, names) for i in ignored[:3])
            + (f" (and {len(ignored) - 3} more)" if len(ignored) > 3 else ""),
            tuple({"arm": i.arm, "knob": i.knob, "where": i.where, "knobs_read": read} for i in ignored)))
    else:
        used = sorted({k for a in plan.arms for k in a.env})
        checks.append(CheckResult("knobs", "passed",
                                  f"every knob the arms set is read by the code ({', '.join(used) or 'no knobs set'})"))
    checks.append(seed_check(spec.seed_env, knobs))
    return checks


def seed_check(seed_env: str | None, knobs: KnobReport) -> CheckResult:
    """Whether replicates are seeded: the runner reads the spec's seed knob or RATIOCINATOR_SEED.

    Unseeded code is not wrong, but its replicates mean something else (run-to-run noise) and no run can be
    repeated exactly; the paper must say so rather than claim shared seeds.
    """
    wanted = [n for n in (seed_env, "RATIOCINATOR_SEED") if n]
    read = [n for n in wanted if n in knobs.env_names()]
    if read:
        return CheckResult("seed", "passed", f"the runner reads {' and '.join(read)}")
    return CheckResult("seed", "warning",
                       "runs are not seeded; replicates measure run-to-run noise; no run can be reproduced exactly"
                       f" (the runner reads neither {' nor '.join(wanted)})",
                       ({"knobs_read": sorted(knobs.knobs), "seed_variables": wanted},))


def _is_note(finding: Finding) -> bool:
    """A TODO/FIXME comment is a note to a reader; a stub body or omitted code is missing logic."""
    return finding.kind == "todo_note"


def runner_check(checkout: Path, runner_script: str, env: Mapping[str, str]) -> CheckResult:
    """The runner exists and can start: executable with an interpreter that exists, or run by file type."""
    path = checkout / runner_script
    if not path.is_file():
        return CheckResult("runner", "failed", f"{runner_script} does not exist at this commit",
                           ({"file": runner_script},))
    with open(path, "rb") as fh:
        first = fh.readline(512).decode("utf-8", "replace").rstrip("\n")
    if not os.access(path, os.X_OK):
        how = "python" if path.suffix == ".py" else "bash"
        return CheckResult("runner", "warning",
                           f"{runner_script} is not executable; it will be started as `{how} {runner_script}`",
                           ({"file": runner_script, "mode": oct(path.stat().st_mode & 0o777)},))
    if not first.startswith("#!"):
        return CheckResult("runner", "failed",
                           f"{runner_script} is executable but has no #! line, so the system cannot start it",
                           ({"file": runner_script, "line": 1, "excerpt": first[:200]},))
    words = shlex.split(first[2:].strip()) if first[2:].strip() else []
    if not words:
        return CheckResult("runner", "failed", f"{runner_script}: the #! line names no interpreter",
                           ({"file": runner_script, "line": 1, "excerpt": first},))
    interpreter = words[0]
    if os.path.basename(interpreter) == "env":
        name = next((w for w in words[1:] if not w.startswith("-") and "=" not in w), None)
        found = shutil.which(name, path=env.get("PATH")) if name else None
        if name and not found:
            return CheckResult("runner", "failed", f"{runner_script}: the #! line runs `{name}`, which is not on PATH",
                               ({"file": runner_script, "line": 1, "excerpt": first},))
    elif not os.access(interpreter, os.X_OK):
        return CheckResult("runner", "failed",
                           f"{runner_script}: the #! interpreter {interpreter} does not exist or is not executable",
                           ({"file": runner_script, "line": 1, "excerpt": first},))
    return CheckResult("runner", "passed", f"{runner_script} is executable ({first})")


def shell_syntax_errors(checkout: Path, files: Sequence[str]) -> list[Finding]:
    """``bash -n`` on every shell script the runner reaches: bash's own verdict, with its line."""
    bash = shutil.which("bash")
    if bash is None:
        return []
    findings = []
    for rel in files:
        try:
            done = subprocess.run([bash, "-n", str(checkout / rel)], capture_output=True, text=True,
                                  timeout=SHELL_CHECK_TIMEOUT_S, cwd=checkout)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            line_no = _bash_line(lines[0]) if lines else None
            findings.append(Finding("syntax_error", f"bash -n rejects {rel}: {lines[-1] if lines else 'syntax error'}",
                                    rel, line_no, _source_line(checkout / rel, line_no), tuple(lines[:5])))
    return findings


def _bash_line(message: str) -> int | None:
    parts = message.split(": line ", 1)
    if len(parts) == 2 and parts[1].split(":", 1)[0].isdigit():
        return int(parts[1].split(":", 1)[0])
    return None


def _source_line(path: Path, line: int | None) -> str:
    if line is None:
        return ""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[line - 1].strip()[:200] if 0 < line <= len(lines) else ""


# -- smoke and cross-arm ---------------------------------------------------------------------


def smoke_checks(outcomes: Sequence[SmokeOutcome], allow: Sequence[str], *,
                 timeout_s: float | None = None) -> list[CheckResult]:
    failed = [o for o in outcomes if not o.ok]
    evidence = tuple(
        {"arm": o.arm.name, "class": o.diagnosis.failure.value if o.diagnosis.failure else None,
         "reason": o.diagnosis.reason, "evidence": list(o.diagnosis.evidence), "log_dir": str(o.log_dir or ""),
         "duration_s": round(o.duration_s, 3)}
        for o in outcomes
    )
    timed_out = [o for o in failed if o.diagnosis.failure == Failure.TIMEOUT]
    if timed_out and timeout_s is not None:
        smoke = CheckResult("smoke", "failed", _unfinished(outcomes, timed_out, timeout_s), evidence)
    elif failed:
        first = failed[0]
        summary = (f"{len(failed)} of {len(outcomes)} arm(s) failed in trial mode; {first.arm.name}: "
                   f"{first.diagnosis.failure} — {first.diagnosis.reason}")
        smoke = CheckResult("smoke", "failed", summary, evidence)
    else:
        smoke = CheckResult("smoke", "passed",
                            f"all {len(outcomes)} distinct arm(s) reported the goal metric in trial mode",
                            evidence)
    unchanged = unchanged_knobs(outcomes, allow)
    compared = sum(o.ok for o in outcomes)
    if compared < 2:
        cross = CheckResult("cross_arm", "skipped", "fewer than two arms succeeded in trial mode; nothing to compare")
    elif unchanged:
        cross = CheckResult("cross_arm", "failed", "; ".join(u.message() for u in unchanged[:3]),
                            tuple({"knobs": list(u.knobs), "identical_arms": [list(p) for p in u.arms],
                                   "logs_identical": u.logs_identical, "points": u.points} for u in unchanged))
    else:
        cross = CheckResult("cross_arm", "passed",
                            f"every knob varied across the {compared} arms changed the measurements")
    return [smoke, cross]


def trial_check(knobs: KnobReport, loaded: LoadedSpec, arms: int, durations: Sequence[float],
                price_per_hour: float) -> CheckResult:
    """Whether the runner has a trial mode; without one every smoke run is a full run, paid before each review."""
    if contract.TRIAL in knobs.knobs:
        where = ", ".join(knobs.knobs[contract.TRIAL].sources[:2])
        return CheckResult("trial", "passed", f"the runner reads {contract.TRIAL} ({where}): smoke runs are short")
    limit = loaded.spec.check.smoke_timeout_s
    if durations:
        longest = max(durations)
        worst = min(longest, limit) * arms
        took = (f"ran into the {limit:g}s limit" if longest >= limit else f"took {longest:.1f}s")
        cost = f"the longest trial so far {took}, so the {arms} smoke run(s) cost about {worst:.0f}s"
    else:
        worst = limit * arms
        cost = f"the {arms} smoke run(s) may each run up to check.smoke_timeout_s ({limit:g}s), {worst:.0f}s in all"
    dollars = f" (${price_per_hour * worst / 3600:.4f})" if price_per_hour > 0 else ""
    return CheckResult(
        "trial", "warning",
        f"the runner never reads {contract.TRIAL}, so every smoke run is a full run: {cost}{dollars} per review;"
        f" when {contract.TRIAL}=1, make a run short (one epoch, a few batches) and still print the goal metric",
        ({"longest_trial_s": round(max(durations), 3) if durations else None, "arms": arms,
          "smoke_timeout_s": limit, "worst_case_s": round(worst, 3)},),
    )


def _unfinished(outcomes: Sequence[SmokeOutcome], timed_out: Sequence[SmokeOutcome], timeout_s: float) -> str:
    """Which arms the smoke phase could not finish within its per-run limit, and the cap that would let them."""
    names = ", ".join(o.arm.name for o in timed_out[:6]) + (f" (and {len(timed_out) - 6} more)"
                                                           if len(timed_out) > 6 else "")
    text = (f"{len(timed_out)} of {len(outcomes)} arm(s) could not finish within check.smoke_timeout_s"
            f" ({timeout_s:g}s): {names}")
    measuring = [o for o in timed_out if o.series]
    if measuring:
        text += f"; {len(measuring)} of them had printed metrics before the limit (the code runs, but long)"
    finished = [o for o in outcomes if o not in timed_out and o.diagnosis.failure is None]
    if finished:
        longest = max(o.duration_s for o in finished)
        text += (f"; the {len(finished)} that finished took up to {longest:.1f}s. To finish the others, raise the"
                 f" per-run cap (check.smoke_timeout_s: {math.ceil(timeout_s * 2):g}, say) or make trial mode"
                 " shorter for them")
    else:
        text += ("; none finished: make the runner's trial mode short (RATIOCINATOR_TRIAL=1: one epoch, a few"
                 " batches), or raise check.smoke_timeout_s")
    return text


# -- LLM review ----------------------------------------------------------------------------------


def llm_check(config: LlmConfig, provider: Callable[[], Provider], loaded: LoadedSpec, checkout: Path,
              files: Sequence[str]) -> CheckResult:
    """The model's review, merged only through claims the checkout confirms."""
    from ratiocinator.check.review import run_review
    from ratiocinator.llm.session import RecordingProvider

    spec = loaded.spec
    reviewer: Provider | None = None
    try:
        reviewer = provider()  # may raise: no key, no SDK
        outcome = run_review(reviewer, topic=spec.topic, goal=spec.goal_metric,
                             runner=spec.runner_script, checkout=checkout, files=files)
    except RatiocinatorError as exc:
        return CheckResult("llm_review", "warning", f"the LLM review could not run: {exc.message}",
                           ({"provider": config.provider, "model": config.model},))
    evidence = tuple(c.to_json() for c in outcome.claims) + (
        {"model": config.model, "model_says_ready": outcome.model_ready, "model_issue": outcome.model_issue,
         "cost_dollars": outcome.cost_dollars, "input_tokens": sum(c.input_tokens for c in outcome.completions),
         "output_tokens": sum(c.output_tokens for c in outcome.completions),
         **({"ledger_call_ids": reviewer.recorded} if isinstance(reviewer, RecordingProvider) else {})},)
    refuted = f"; {len(outcome.refuted)} claim(s) refuted by the checkout and dropped" if outcome.refuted else ""
    if outcome.confirmed:
        return CheckResult("llm_review", "failed",
                           "; ".join(c.evidence for c in outcome.confirmed[:3]) + refuted, evidence)
    if not outcome.model_ready and outcome.opinions:
        return CheckResult("llm_review", "warning",
                           f"{config.model} (unverified opinion): "
                           + "; ".join(c.claim.description for c in outcome.opinions[:3])
                           + refuted, evidence)
    verdict = "ready" if outcome.model_ready else "not ready, but none of its checkable claims held"
    return CheckResult("llm_review", "passed", f"{config.model} says {verdict}{refuted}", evidence)


# -- the whole review ------------------------------------------------------------------------------


async def review(
    *,
    loaded: LoadedSpec,
    checkout: Path,
    knobs: KnobReport,
    plan: Plan,
    backend: Backend | None,
    host: Host | None,
    workspace: Workspace | None,
    argv: tuple[str, ...],
    smoke_dir: Path,
    smoke: bool = True,
    smoke_off_reason: str = "disabled (--no-smoke)",
    llm_config: LlmConfig | None = None,
    llm_provider: Callable[[], Provider] | None = None,
    llm_off_reason: str = "no LLM configured (spec `llm:` or RATIOCINATOR_LLM_* variables)",
    extra_env: dict[str, str] | None = None,
    environ: Mapping[str, str] | None = None,  # the runners' environment
    commit: str | None = None,
    on_message: Callable[[str], None] | None = None,
) -> Readiness:
    """Static checks, then (unless they already fail) smoke runs, cross-arm comparison and the LLM."""
    environ = dict(os.environ if environ is None else environ)
    say = on_message or (lambda _m: None)
    run_env = {**environ, **(workspace.env if workspace else {})}
    result = Readiness(await asyncio.to_thread(static_checks, loaded, checkout, knobs, plan, run_env), commit)
    blocked = [c.name for c in result.checks if c.status == "failed" and c.name in BLOCKS_SMOKE]
    if not (smoke and loaded.spec.check.smoke):
        reason = "disabled (check.smoke: false in the spec)" if not loaded.spec.check.smoke else smoke_off_reason
        result.checks += [CheckResult("smoke", "skipped", reason), CheckResult("cross_arm", "skipped", "no smoke runs")]
    elif blocked:
        result.checks += [CheckResult("smoke", "skipped", f"fix the failed static checks first ({', '.join(blocked)})"),
                          CheckResult("cross_arm", "skipped", "no smoke runs")]
    elif backend is None or host is None or workspace is None:
        result.checks += [CheckResult("smoke", "skipped", "no host to run on"),
                          CheckResult("cross_arm", "skipped", "no smoke runs")]
    else:
        arms = distinct_arms(plan)
        say(f"smoke: {len(arms)} arm(s) in trial mode, at most {loaded.spec.check.smoke_timeout_s:g}s each")
        outcomes = await run_smoke(loaded=loaded, backend=backend, host=host, workspace=workspace, argv=argv, arms=arms,
                                   smoke_dir=smoke_dir, base_env=environ, extra_env=extra_env,
                                   on_done=lambda o: say(f"smoke {o.arm.name}: " + (
                                       "ok" if o.ok else f"{o.diagnosis.failure} — {o.diagnosis.reason}")))
        result.checks += smoke_checks(outcomes, loaded.spec.check.allow_unchanged_knobs,
                                      timeout_s=loaded.spec.check.smoke_timeout_s)
    smoked = next((c for c in result.checks if c.name == "smoke"), None)
    durations = [float(e["duration_s"]) for e in (smoked.evidence if smoked else ()) if "duration_s" in e]
    result.checks.append(trial_check(knobs, loaded, len(distinct_arms(plan)), durations,
                                     host.price_per_hour if host is not None else 0.0))
    if llm_config is None or llm_provider is None:
        result.checks.append(CheckResult("llm_review", "skipped", llm_off_reason))
    else:
        say(f"LLM review with {llm_config.model}")
        result.checks.append(await asyncio.to_thread(llm_check, llm_config, llm_provider, loaded, checkout,
                                                     list(knobs.files)))
    return result
