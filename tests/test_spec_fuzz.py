"""Whatever a spec or program file holds, loading it ends in data or in the project's own user
error, in bounded time and memory: seeded mutations of real specs, plus the hostile inputs that
once crashed the loader (recursive aliases, billion laughs, python tags, 4,301-digit integers,
unhashable keys, bad timestamps, keys named like pydantic's union tags, NUL characters).
"""

from __future__ import annotations

import random
import re
import resource
import time
from pathlib import Path

import pytest

from ratiocinator.autoresearch.program import load_program
from ratiocinator.errors import SpecError
from ratiocinator.spec.models import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = [ROOT / "examples" / "quickstart" / "quickstart.yaml", ROOT / "specs" / "gnn_generation.yaml"]
PROGRAM = """\
repo: repo
tag: fuzz
editable: [config.py]
protected: [prepare.py, evaluate.py]
run: python train.py > run.log 2>&1
log_file: run.log
metric: {name: val_bpb, direction: lower}
secondary_metrics: [peak_vram_mb]
budget_s: 1
timeout_s: 2
agent: {kind: patches, patches: patches}
"""
LAUGHS = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 11))
HOSTILE = [
    "a: &a [*a]",
    "x: " + "[" * 1000 + "]" * 1000,
    "x: !!python/object/apply:os.system [\"true\"]",
    "x: " + "1" * 4301,
    "? [a]\n: 1",
    "a: !!timestamp x",
    "int: 1",
    "a[b: 1",
    "str: x",
    "function-after[x]: 1",
    LAUGHS,
    'repo_url: "/tmp/\\0x"',
    'name: "a1\\n"',
    "arms: [{name: \"a\\n\"}]",
    "arms: [{name: a, env: {X: " + "y" * 200_000 + "}}]",
    "factors: {X: [" + ", ".join(["1"] * 3) + "]}",
    "env: {\"A\\n\": 1}",
    "x: !!binary AAAA",
    "x: !!set {a, b}",
    "x: !!omap [a: 1]",
    "x: !!float nan",
    "x: .inf",
    "x: &x 1\ny: *x\nz: *missing",
    "- a\n- b",
    "just a string",
    "",
    "\t\tx: 1",
    "x: 'unterminated",
    "x: {a: 1, a: 2}",
    "%YAML 1.1\n---\nx: 1\n---\ny: 2",
    "x: 0o777777777777777777777777777777",
    "x: 1e999999",
    "max_dollars: -1e400",
    "replicates: 99999999999999999999999999",
    "x: " + "a" * 70_000,
    "\ufeffname: x",
    "name: \u202e\u0000",
]


def _mutate(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    kind = rng.randrange(7)
    if kind == 0:  # a hostile snippet at a random line
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(HOSTILE))
    elif kind == 1 and lines:  # drop a line
        del lines[rng.randrange(len(lines))]
    elif kind == 2 and lines:  # repeat a line
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif kind == 3 and lines:  # shift a line's indentation
        i = rng.randrange(len(lines))
        lines[i] = rng.choice(["", "  ", "    ", "\t", " - "]) + lines[i].lstrip()
    elif kind == 4 and lines:  # replace a value by a hostile one
        i = rng.randrange(len(lines))
        if ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            snippet = rng.choice(HOSTILE)
            lines[i] = f"{head}: {(snippet.splitlines() or [''])[0] if rng.random() < 0.5 else snippet}"
    text = "\n".join(lines) + "\n"
    if kind == 5 and text:  # characters flipped
        chars = list(text)
        for _ in range(rng.randint(1, 8)):
            chars[rng.randrange(len(chars))] = rng.choice(":-[]{}&*!|>'\"#%@`,?\t\n\\ \x00\u2028")
        text = "".join(chars)
    elif kind == 6:  # the whole document replaced
        text = rng.choice(HOSTILE)
    return text


def _fuzz(loader: object, bases: list[str], n: int, tmp_path: Path, seed: int) -> tuple[int, int, float]:
    """Accepted and refused counts, and the most CPU seconds one input took (CPU, not wall time: the bound
    is on the loader's own work, which a machine busy with other processes does not inflate)."""
    rng = random.Random(seed)
    accepted = refused = 0
    slowest = 0.0
    path = tmp_path / "input.yaml"
    for i in range(n):
        text = _mutate(rng, rng.choice(bases))
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        started = time.process_time()
        try:
            loader(path)  # type: ignore[operator]  # load_spec or load_program
            accepted += 1
        except SpecError:
            refused += 1
        except BaseException as exc:  # noqa: BLE001 - the point: nothing else may escape
            (tmp_path / f"crash-{i}.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
            pytest.fail(f"mutation {i} (seed {seed}) raised {type(exc).__name__}: {str(exc)[:300]}; input saved as"
                        f" crash-{i}.yaml")
        slowest = max(slowest, time.process_time() - started)
    return accepted, refused, slowest


def test_the_hostile_inputs_that_crashed_the_loader_are_user_errors(tmp_path: Path) -> None:
    base = SPECS[0].read_text()
    for i, snippet in enumerate(HOSTILE):
        for text in (snippet, base + snippet + "\n"):
            path = tmp_path / f"hostile-{i}.yaml"
            path.write_text(text)
            started = time.process_time()
            try:
                load_spec(path)
            except SpecError as exc:
                assert str(path) in exc.message  # where
                assert "Traceback" not in str(exc)
            assert time.process_time() - started < 5, snippet[:60]


def test_a_thousand_deep_list_and_a_billion_laughs_are_refused_with_their_reason(tmp_path: Path) -> None:
    cases = {"x: " + "[" * 1000 + "]" * 1000: "nests too deeply", LAUGHS: "expands to more than",
             "a: &a [*a]": "recursive alias", "x: " + "1" * 4301: ":1: cannot read this value",
             "int: 1\nname: x": "unknown key 'int'", "a[b: 1\nname: x": "unknown key 'a[b'",
             'repo_url: "a\\0b"': ":1: 'repo_url' holds a NUL character", "a: !!timestamp x": ":1: cannot read"}
    for text, reason in cases.items():
        path = tmp_path / "case.yaml"
        path.write_text(text)
        with pytest.raises(SpecError, match=re.escape(reason)):
            load_spec(path)


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_specs_load_or_are_refused_never_crash(tmp_path: Path, seed: int) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accepted, refused, slowest = _fuzz(load_spec, [p.read_text() for p in SPECS], 1000, tmp_path, seed)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert refused > 0 and accepted + refused == 1000
    assert slowest < 5.0 and grown_mb < 300, (slowest, grown_mb)


def test_mutated_autoresearch_programs_load_or_are_refused_never_crash(tmp_path: Path) -> None:
    accepted, refused, slowest = _fuzz(load_program, [PROGRAM], 500, tmp_path, 3)
    assert refused > 0 and accepted + refused == 500 and slowest < 5.0
