"""Stated hypotheses get verdicts from planted results: supported, contradicted, or inconclusive.

Each test plants values in a real ledger (tests/planted.py), writes the report and reads
the verdicts from the paper and its facts, as a reviewer and `verify` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from planted import PlantedStudy, spec_text
from ratiocinator.analysis.hypotheses import Status
from ratiocinator.errors import SpecError
from ratiocinator.report.paper import build_paper
from ratiocinator.report.publish import write_report
from ratiocinator.report.verify import verify_report
from ratiocinator.spec.models import load_spec
from ratiocinator.store.records import ReadinessRecord

RNG_SEED = 7


def grid_study(home: Path, factors: dict[str, list[str]], baseline: dict[str, str], **spec: object) -> PlantedStudy:
    planned = PlantedStudy.grid(**factors)
    base = next(a.name for a in planned if a.factors == baseline)
    return PlantedStudy(home, planned, baseline_arm=base, arms=None, factors=factors, baseline=baseline, **spec)


def verdicts(study: PlantedStudy) -> dict[str, Status]:
    paper = build_paper(study.ledger, study.id, figures=False)
    return {j.id: j.status for j in paper.judgements}


def test_overfitting_interaction_and_a_null_get_the_verdicts_the_plant_implies(tmp_path: Path) -> None:
    """CAP raises train accuracy and lowers validation accuracy more at each level; NOISE does nothing."""
    rng = np.random.default_rng(RNG_SEED)
    hypotheses = [
        {"id": "H1", "statement": "The train-validation gap grows with capacity.",
         "expect": {"gap": ["train_acc", "acc"], "grows_with": "CAP"}},
        {"id": "H2", "statement": "NOISE changes accuracy.", "expect": {"factor": "NOISE"}},
        {"id": "H3", "statement": "The largest capacity is best.", "expect": {"factor": "CAP", "best": "4"}},
        {"id": "H4", "statement": "Training accuracy is above validation accuracy.",
         "expect": {"metric": "train_acc", "above": "acc"}},
        {"id": "H5", "statement": "NOISE=1 beats the baseline.",
         "expect": {"arm": {"CAP": "1", "NOISE": "1"}, "beats": "baseline"}},
        {"id": "H6", "statement": "CAP=1 beats CAP=4, pooled over NOISE.", "expect": {"arm": {"CAP": "1"},
                                                                                     "beats": {"CAP": "4"}}},
    ]
    study = grid_study(tmp_path, {"CAP": ["1", "2", "4"], "NOISE": ["0", "1"]}, {"CAP": "1", "NOISE": "0"},
                       goal_metric="acc", hypotheses=hypotheses, replicates=6)
    for arm in study.arm_ids:
        cap = int(arm.split("CAP=")[1].split(",")[0])
        for _ in range(6):
            val = 0.80 - 0.03 * np.log2(cap) + 0.005 * rng.standard_normal()
            train = 0.82 + 0.04 * np.log2(cap) + 0.005 * rng.standard_normal()
            study.run(arm, final={"acc": val, "train_acc": train})
    got = verdicts(study)
    assert got["H1"] is Status.SUPPORTED  # the planted overfitting
    assert got["H2"] is Status.INCONCLUSIVE  # the planted null: no effect is never "contradicted"
    assert got["H3"] is Status.CONTRADICTED  # CAP=1 is clearly best, not CAP=4
    assert got["H4"] is Status.SUPPORTED
    assert got["H5"] is Status.INCONCLUSIVE  # the same capacity, noise only: a null
    assert got["H6"] is Status.SUPPORTED

    files = write_report(study.ledger, study.id, study.report_dir, pdf=False)
    md = files.md.read_text()
    abstract = md.split("## Hypotheses")[0]
    for hid, status in got.items():
        assert f"{hid} (" in abstract and f"is {status.value}" in abstract
    assert "## Conclusion" in md and "The evidence supports H1" in md and "The evidence contradicts H3" in md
    facts = {f["key"]: f for f in json.loads(files.facts.read_text())["facts"]}
    gap = facts["hyp[H1].diff"]
    assert float(gap["text"]) == pytest.approx(0.07 * 2, rel=0.15)  # (0.04 + 0.03) × log2(4)
    assert gap["run_ids"]  # the verdict's numbers are traced to the runs they came from
    assert verify_report(study.ledger, study.report_dir).ok


def test_a_planted_interaction_is_the_abstracts_main_caveat(tmp_path: Path) -> None:
    rng = np.random.default_rng(RNG_SEED)
    study = grid_study(tmp_path, {"A": ["0", "1"], "B": ["0", "1"]}, {"A": "0", "B": "0"}, goal_metric="acc",
                       hypotheses=[{"id": "H1", "statement": "A and B interact.",
                                    "expect": {"interaction": ["A", "B"]}}])
    cells = {"A=0,B=0": 0.70, "A=0,B=1": 0.80, "A=1,B=0": 0.80, "A=1,B=1": 0.70}  # a pure crossover
    study.plant({arm: list(mean + 0.01 * rng.standard_normal(5)) for arm, mean in cells.items()})
    assert verdicts(study)["H1"] is Status.SUPPORTED
    md = write_report(study.ledger, study.id, study.report_dir, pdf=False).md.read_text()
    abstract = md.split("## Hypotheses")[0]
    assert "Main caveat: the effect of A depends on B (interaction Holm-adjusted p =" in abstract


def test_without_stated_hypotheses_the_paper_says_so_and_still_concludes(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base")
    study.plant({"base": [0.71, 0.74, 0.69], "fast": [0.81, 0.86, 0.83]})
    md = write_report(study.ledger, study.id, study.report_dir, pdf=False).md.read_text()
    assert "The spec states no hypotheses" in md and "## Conclusion" in md
    assert "H1:" not in md  # the per-arm comparisons are not dressed up as hypotheses


def test_a_study_whose_runner_reads_no_seed_never_claims_shared_seeds(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base")
    seed = {"name": "seed", "status": "warning", "summary": "runs are not seeded; replicates measure run-to-run noise;"
            " no run can be reproduced exactly (the runner reads neither RATIOCINATOR_SEED)", "evidence": []}
    study.ledger.record_readiness(study.id, ReadinessRecord("c0ffee1234", skipped=False, is_code_ready=True,
                                                            checks=[seed]), "ready")
    study.plant({"base": [0.71, 0.74, 0.69], "fast": [0.81, 0.86, 0.83]})
    files = write_report(study.ledger, study.id, study.report_dir, pdf=False)
    text = files.md.read_text() + files.html.read_text() + (study.report_dir / "appendix.md").read_text()
    assert "Seeds are shared" not in text and "seed r in every arm" not in text
    assert "Unseeded runs: the runner reads neither the seed knob nor RATIOCINATOR_SEED" in text
    assert "RATIOCINATOR_SEED=$SEED" not in text  # no reproduction step pretends a seed matters


def test_the_report_names_no_absolute_local_path(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base",
                         repo_url="../code")
    study.run("base", final={"acc": 0.5}, status="failed", failure="runtime_error", stderr="Traceback: boom\n")
    study.plant({"base": [0.71, 0.74], "fast": [0.81, 0.86]})
    files = write_report(study.ledger, study.id, study.report_dir, pdf=False)
    for name in ("paper.md", "appendix.md"):
        text = (study.report_dir / name).read_text()
        assert str(tmp_path) not in text, name
    assert "../code (relative to the spec file)" in files.md.read_text()

    study.ledger.event(study.id, "code", "commit c0ffee1234", commit="c0ffee1234", repo=str(tmp_path / "code"),
                       remote="https://example.org/lab/code.git")
    md = write_report(study.ledger, study.id, study.report_dir, pdf=False).md.read_text()
    assert "remote https://example.org/lab/code.git" in md and "git clone https://example.org/lab/code.git" in md
    assert str(tmp_path) not in md


def test_a_free_study_has_no_cost_section_and_constant_metrics_are_a_note(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base",
                         hardware={"num_gpus": 0, "price_per_hour": 0}, max_dollars=0)
    for arm, values in (("base", [0.71, 0.74, 0.69]), ("fast", [0.81, 0.86, 0.83])):
        for v in values:
            study.run(arm, final={"acc": v, "epochs": 40.0, "loss": 1 - v}, cost=None)
    files = write_report(study.ledger, study.id, study.report_dir, pdf=False)
    md = files.md.read_text()
    assert "## Cost" not in md and "Cost: none." in md
    assert not (study.report_dir / "fig_cost.png").exists()
    assert "The runs also reported epochs, loss;" in md  # named in the main text, tabulated in the appendix
    appendix = (study.report_dir / "appendix.md").read_text()
    assert "| Arm | loss |" in appendix and "so not tabulated (6 runs): epochs = [40]" in appendix
    assert "± [0]" not in md and "± [0]" not in appendix


@pytest.mark.parametrize(("expect", "message"), [
    ({"factor": "DEPTH"}, "DEPTH is not a factor"),
    ({"factor": "LR", "best": 9}, "LR=9 is not one of its levels"),
    ({"interaction": ["LR", "LR"]}, "an interaction needs two different factors"),
    ({"metric": "acc", "above": "a", "below": "b"}, "give exactly one of above: METRIC or below: METRIC"),
    ({"colour": "red"}, "expect needs one of"),
])
def test_a_bad_hypothesis_is_a_spec_error_naming_it(tmp_path: Path, expect: dict, message: str) -> None:
    data = yaml.safe_load(spec_text(arms=None, factors={"LR": [0.1, 0.3]}))
    data["hypotheses"] = [{"id": "H1", "statement": "s", "expect": expect}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert message in str(caught.value) and "hypotheses" in str(caught.value)


def test_a_one_level_factor_is_a_note_not_an_analysis(tmp_path: Path) -> None:
    rng = np.random.default_rng(RNG_SEED)
    study = grid_study(tmp_path, {"LR": ["1", "2"], "OPT": ["adam"]}, {"LR": "1", "OPT": "adam"}, goal_metric="acc")
    study.plant({arm: list(0.7 + 0.01 * rng.standard_normal(3)) for arm in study.arm_ids})
    files = write_report(study.ledger, study.id, study.report_dir, pdf=False)
    md = files.md.read_text()
    assert "Factor OPT has a single level (adam) in every arm: a constant" in md
    assert "| OPT | adam |" not in md and "| LR | 2 |" in md
    assert verify_report(study.ledger, study.report_dir).ok


def test_hypotheses_the_runs_cannot_test_are_inconclusive_with_the_reason(tmp_path: Path) -> None:
    hypotheses = [
        {"id": "H1", "statement": "Loss is below accuracy.", "expect": {"metric": "loss", "below": "acc"}},
        {"id": "H2", "statement": "LR and OPT interact.", "expect": {"interaction": ["LR", "OPT"]}},
        {"id": "H3", "statement": "The gap grows with LR.",
         "expect": {"gap": ["train_acc", "acc"], "grows_with": "LR"}},
        {"id": "H4", "statement": "Fast beats slow.", "expect": {"arm": {"LR": "9"}, "beats": "baseline"}},
    ]
    study = grid_study(tmp_path, {"LR": ["1", "2"], "OPT": ["a", "b"]}, {"LR": "1", "OPT": "a"}, goal_metric="acc",
                       hypotheses=hypotheses, design="ablation")
    for arm in study.arm_ids:
        study.run(arm, final={"acc": 0.7})  # one run per arm: no spread, no test
    paper = build_paper(study.ledger, study.id, figures=False)
    because = {j.id: "".join(p if isinstance(p, str) else "#" for p in j.because) for j in paper.judgements}
    assert {j.status for j in paper.judgements} == {Status.INCONCLUSIVE}
    assert "No succeeded run reported loss" in because["H1"]
    assert "interaction" in because["H2"] or "analysis of variance" in because["H2"]
    assert "train_acc" in because["H3"]
    assert "No arm of this study matches" in because["H4"]
    write_report(study.ledger, study.id, study.report_dir, pdf=False)
    assert verify_report(study.ledger, study.report_dir).ok
