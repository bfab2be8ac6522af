"""Knob discovery on small real checkouts built in tmp_path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ratiocinator.cli import app
from ratiocinator.errors import PlanError
from ratiocinator.repo.knobs import Knob, KnobReport, discover_knobs


def repo(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def scan(tmp_path: Path, files: dict[str, str], runner: str = "run.sh") -> KnobReport:
    return discover_knobs(repo(tmp_path, files), runner)


# --- shell patterns ---------------------------------------------------------------------


def test_shell_expansion_forms_and_defaults(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        echo ${A:-1} ${B-two} ${C:=3} ${D} $E "${F:-"quoted value"}" ${G:-'single'}
        : "${H:=x}"
        echo ${I:-}
    """})
    defaults = {name: knob.default for name, knob in report.knobs.items()}
    assert defaults == {"A": "1", "B": "two", "C": "3", "D": None, "E": None,
                        "F": "quoted value", "G": "single", "H": "x", "I": ""}
    assert report.knobs["A"] == Knob("A", "env", "1", ("run.sh:1",))
    assert report.knobs["H"].sources == ("run.sh:2",)
    assert list(report.knobs) == sorted(report.knobs)
    assert report.files == ("run.sh",)


def test_unconditional_assignment_is_not_a_knob(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        EPOCHS=10
        readonly MODE=fast
        echo "$EPOCHS" ${MODE}
    """})
    assert report.knobs == {}


def test_self_defaulting_assignments_are_knobs(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        LR=${LR:-0.1}
        export BATCH="${BATCH:-32}"
        WD=0.5
        WD=${WD:-0.01}
        echo $LR $BATCH $WD
    """})
    assert report.knobs["LR"] == Knob("LR", "env", "0.1", ("run.sh:1", "run.sh:5"))
    assert report.knobs["BATCH"].default == "32"
    assert "WD" not in report.knobs  # overwritten before the self-default reads it


def test_reads_before_or_around_conditional_assignments_count(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        echo "$SEEN_FIRST"
        SEEN_FIRST=1
        [ -z "${MAYBE:-}" ] && MAYBE=1
        if [ "$MODE" = fast ]; then STEPS=1; fi
        echo $MAYBE $STEPS
    """})
    assert report.knobs["SEEN_FIRST"].sources == ("run.sh:1",)
    assert report.knobs["MAYBE"].sources == ("run.sh:3", "run.sh:5")
    assert report.knobs["STEPS"].sources == ("run.sh:5",)
    assert "MODE" in report.knobs


def test_loop_read_local_and_system_names_are_skipped(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        for seed in 1 2 3; do echo "$seed"; done
        while read -r line other; do echo $line $other; done < list.txt
        read -p "ok? " answer; echo $answer
        f() { local tmp=1 scratch; echo "$tmp $scratch"; }
        echo $HOME $PATH $PWD $USER $LANG $LC_ALL $BASH_SOURCE $RANDOM $IFS $TMPDIR $PS1
        echo $REAL
    """})
    assert set(report.knobs) == {"REAL"}


def test_comments_single_quotes_escapes_and_special_parameters(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        # echo $IN_COMMENT, don't count this
        echo '$IN_SINGLE ${ALSO}' \\$ESCAPED $$ $1 $@ $# $? $! ${10} "it's $KEPT" # $TRAILING
        echo a#b ${#LENGTH} ${CUT#prefix}
    """})
    assert set(report.knobs) == {"KEPT", "LENGTH", "CUT"}


def test_here_documents_expand_unless_quoted(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        cat > cfg.json <<EOF
        {"lr": "${LR:-0.1}", "note": "don't"}
        EOF
        cat <<'RAW'
        $NOT_READ
        RAW
        echo $AFTER
    """})
    assert report.knobs["LR"].sources == ("run.sh:2",)
    assert set(report.knobs) == {"LR", "AFTER"}


def test_shell_indirect_expansion_is_dynamic(tmp_path):
    report = scan(tmp_path, {"run.sh": """
        name=LR
        echo ${!name}
        echo ${!arr[@]}
    """})
    assert report.dynamic == ("run.sh:2",)


# --- following what a shell runner runs --------------------------------------------------


def test_follows_python_invocations(tmp_path):
    report = scan(tmp_path, {
        "scripts/run.sh": """
            python -u train.py --epochs 3
            python3.11 -W ignore scripts_local.py
            uv run --with rich python tools/eval.py
            CUDA=1 exec python3 -B "$(dirname "$0")/beside.py"
        """,
        "train.py": "import os\nos.environ['TRAIN']\n",
        "scripts/scripts_local.py": "import os\nos.environ['BESIDE_SCRIPT']\n",
        "tools/eval.py": "import os\nos.environ['EVAL']\n",
        "scripts/beside.py": "import os\nos.environ['DIRNAME']\n",
        "unused.py": "import os\nos.environ['UNUSED']\n",
    }, runner="scripts/run.sh")
    assert set(report.knobs) == {"TRAIN", "BESIDE_SCRIPT", "EVAL", "DIRNAME"}
    assert report.knobs["TRAIN"].sources == ("train.py:2",)
    assert report.files[0] == "scripts/run.sh"


def test_follows_cd_and_script_dir_variables(tmp_path):
    report = scan(tmp_path, {
        "scripts/run.sh": """
            ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
            python "$ROOT/experiments/a.py"
            cd experiments && python b.py
            python "$REMOTE_CHECKOUT/c.py"
        """,
        "experiments/a.py": "import os\nos.getenv('A')\n",
        "experiments/b.py": "import os\nos.getenv('B')\n",
        "c.py": "import os\nos.getenv('C')\n",
    }, runner="scripts/run.sh")
    assert {"A", "B", "C"} <= set(report.knobs)
    assert "experiments/b.py" in report.files


def test_script_dir_wins_over_the_current_directory(tmp_path):
    report = scan(tmp_path, {
        "scripts/run.sh": 'cd sub\npython "$(dirname "$0")/x.py"\npython x.py\n',
        "scripts/x.py": "import os\nos.environ['BESIDE_RUNNER']\n",
        "sub/x.py": "import os\nos.environ['IN_SUB']\n",
    }, runner="scripts/run.sh")
    assert report.files == ("scripts/run.sh", "scripts/x.py", "sub/x.py")


def test_follows_python_modules(tmp_path):
    report = scan(tmp_path, {
        "run.sh": "python -um pkg.train\npython -m tool --fast\npython -Werror -OO -X dev plain.py\n",
        "plain.py": "import os\nos.environ['PLAIN']\n",
        "pkg/__init__.py": "",
        "pkg/train.py": "import os\nos.environ['MODULE']\n",
        "tool/__init__.py": "",
        "tool/__main__.py": "import os\nos.environ['MAIN']\n",
    })
    assert set(report.knobs) == {"MODULE", "MAIN", "PLAIN"}
    assert {"pkg/train.py", "tool/__main__.py"} <= set(report.files)


def test_follows_nested_shell_scripts(tmp_path):
    report = scan(tmp_path, {
        "run.sh": "bash -e a.sh\n./b.sh\nsource c.sh\n. d.sh\n",
        "a.sh": "echo $A\n",
        "b.sh": "#!/bin/sh\necho $B\n",
        "c.sh": "echo $C\n",
        "d.sh": "echo $D\n",
    })
    assert set(report.knobs) == {"A", "B", "C", "D"}
    assert report.files == ("run.sh", "a.sh", "b.sh", "c.sh", "d.sh")


def test_shell_cycles_are_scanned_once(tmp_path):
    report = scan(tmp_path, {
        "run.sh": "echo $A\nsource other.sh\nbash run.sh\n",
        "other.sh": "echo $B\n. ./run.sh\n",
    })
    assert report.files == ("run.sh", "other.sh")
    assert set(report.knobs) == {"A", "B"}


def test_names_the_runner_overwrites_are_hidden_from_what_it_runs(tmp_path):
    report = scan(tmp_path, {
        "run.sh": """
            export EPOCHS=10
            LR=${LR:-0.1}
            GPU=0 python train.py
        """,
        "train.py": """
            import os
            os.environ["EPOCHS"], os.environ["LR"], os.environ["GPU"], os.environ["SEED"]
        """,
    })
    assert set(report.knobs) == {"LR", "SEED"}
    assert report.knobs["LR"].sources == ("run.sh:2", "train.py:2")


# --- Python patterns --------------------------------------------------------------------


def test_python_env_reads_and_defaults(tmp_path):
    report = scan(tmp_path, {"train.py": """
        import os
        import os as o
        from os import environ, getenv
        from os import environ as env_alias

        a = os.environ["A"]
        b = os.environ.get("B", "0.1")
        c = os.getenv("C", 3)
        d = environ.get("D")
        e = getenv("E", default="e")
        f = "F" in os.environ
        g = os.environ.setdefault("G", -1.5)
        h = o.environ["H"]
        i = env_alias["I"]
        j = os.getenv("J", str(7))
        os.environ["WRITTEN"] = "not a read"
    """}, runner="train.py")
    defaults = {name: knob.default for name, knob in report.knobs.items()}
    assert defaults == {"A": None, "B": "0.1", "C": "3", "D": None, "E": "e", "F": None,
                        "G": "-1.5", "H": None, "I": None, "J": None}
    assert report.knobs["H"].sources == ("train.py:13",)
    assert report.env_names() == frozenset(defaults)


def test_python_dynamic_reads(tmp_path):
    report = scan(tmp_path, {"train.py": """
        import os
        name = "X"
        os.environ[name]
        os.getenv(f"X_{name}")
        for key in os.environ:
            pass
        picked = {k: v for k, v in os.environ.items() if k.startswith("HP_")}
        child = dict(os.environ)
        copied = os.environ.copy()
        merged = {**os.environ, "A": "1"}
    """}, runner="train.py")
    assert report.dynamic == ("train.py:3", "train.py:4", "train.py:5", "train.py:7")
    assert report.knobs == {}


def test_argparse_flags(tmp_path):
    report = scan(tmp_path, {"train.py": """
        import argparse, os
        parser = argparse.ArgumentParser()
        parser.add_argument("data")
        parser.add_argument("-l", "--lr", "--learning-rate", type=float, default=0.1)
        group = parser.add_argument_group("model")
        group.add_argument("--layers", type=int, default=[64, 64])
        sub = parser.add_subparsers().add_parser("eval")
        sub.add_argument("-q", action="store_true")
        parser.add_argument("--wd", default=os.environ.get("WD", "0.01"))
    """}, runner="train.py")
    assert report.knobs["--lr"] == Knob("--lr", "arg", "0.1", ("train.py:4",))
    assert report.knobs["--layers"].default == "[64, 64]"
    assert report.knobs["-q"].default is None
    assert report.knobs["--wd"].default is None
    assert report.knobs["WD"] == Knob("WD", "env", "0.01", ("train.py:9",))
    assert report.arg_flags() == {"--lr", "-l", "--learning-rate", "--layers", "-q", "--wd"}
    assert report.env_names() == {"WD"}
    assert "data" not in report.knobs


# --- following Python imports -----------------------------------------------------------


def test_follows_local_imports(tmp_path):
    report = scan(tmp_path, {
        "train.py": """
            import numpy
            import pkg.models
            from pkg import data
            from helpers import util
            from lib import found_in_src
        """,
        "pkg/__init__.py": "import os\nos.getenv('PKG_INIT')\n",
        "pkg/models.py": "from .layers import Dense\nfrom . import losses\n",
        "pkg/layers.py": "import os\nDense = os.getenv('LAYERS')\n",
        "pkg/losses.py": "import os\nos.getenv('LOSSES')\n",
        "pkg/data.py": "import os\nos.getenv('DATA')\n",
        "helpers/util.py": "import os\nos.getenv('NAMESPACE_PKG')\n",
        "src/lib/__init__.py": "",
        "src/lib/found_in_src.py": "import os\nos.getenv('SRC')\n",
    }, runner="train.py")
    assert set(report.knobs) == {"PKG_INIT", "LAYERS", "LOSSES", "DATA", "NAMESPACE_PKG", "SRC"}
    assert report.files[:2] == ("train.py", "pkg/__init__.py")


def test_never_scans_outside_the_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    repo(tmp_path, {
        "outside.py": "import os\nos.getenv('OUTSIDE')\n",
        "checkout/sub/train.py": "import outside\nfrom .. import outside\n",
        "checkout/run.sh": "python ../outside.py\npython sub/train.py\npython /etc/hostname.py\n",
    })
    (checkout / "linked.py").symlink_to(tmp_path / "outside.py")
    (checkout / "run2.sh").write_text("python linked.py\n")
    assert discover_knobs(checkout, "run.sh").knobs == {}
    assert discover_knobs(checkout, "run.sh").files == ("run.sh", "sub/train.py")
    assert discover_knobs(checkout, "run2.sh").files == ("run2.sh",)


def test_import_cycles_are_scanned_once(tmp_path):
    report = scan(tmp_path, {
        "a.py": "import b\nimport os\nos.getenv('A')\n",
        "b.py": "import a\nimport os\nos.getenv('B')\n",
    }, runner="a.py")
    assert report.files == ("a.py", "b.py")
    assert set(report.knobs) == {"A", "B"}


# --- merging, errors and limits ---------------------------------------------------------


def test_merge_unites_sources_and_keeps_the_first_default(tmp_path):
    report = scan(tmp_path, {
        "run.sh": "echo $LR\necho ${LR:-0.5}\npython train.py\n",
        "train.py": "import os\nos.getenv('LR', '0.1')\nos.getenv('LR')\n"
        + "\n" * 7 + "os.getenv('LR', '9')\n",
    })
    assert report.knobs["LR"] == Knob(
        "LR", "env", "0.5", ("run.sh:1", "run.sh:2", "train.py:2", "train.py:3", "train.py:11")
    )


def test_syntax_error_is_reported_and_the_rest_still_scanned(tmp_path):
    report = scan(tmp_path, {
        "run.sh": "python broken.py\npython good.py\necho $SHELL_KNOB\n",
        "broken.py": "import os\nos.getenv('NEVER'\n",
        "good.py": "import os\nos.getenv('GOOD')\n",
    })
    assert set(report.knobs) == {"GOOD", "SHELL_KNOB"}
    assert len(report.unreadable) == 1
    assert report.unreadable[0].startswith("broken.py: syntax error at line")
    assert report.files == ("run.sh", "good.py")


def test_oversized_files_are_skipped(tmp_path):
    report = scan(tmp_path, {
        "train.py": "import big\nimport os\nos.getenv('SMALL')\n",
        "big.py": "import os\nos.getenv('BIG')\n" + "#" * (2 * 1024 * 1024),
    }, runner="train.py")
    assert set(report.knobs) == {"SMALL"}
    assert report.unreadable == ("big.py: larger than 2 MB, not scanned",)


def test_file_count_is_capped(tmp_path):
    files = {"train.py": "".join(f"import m{i}\n" for i in range(505))}
    files |= {f"m{i}.py": f"import os\nos.getenv('K{i}')\n" for i in range(505)}
    report = scan(tmp_path, files, runner="train.py")
    assert len(report.files) == 500
    assert len(report.knobs) == 499
    assert len(report.unreadable) == 6
    assert all("500-file limit" in line for line in report.unreadable)


def test_missing_runner_raises_plan_error(tmp_path):
    with pytest.raises(PlanError) as caught:
        discover_knobs(tmp_path, "scripts/missing.sh")
    assert "scripts/missing.sh" in caught.value.message
    assert caught.value.hint and "relative to the repository root" in caught.value.hint
    repo(tmp_path, {"inside/run.sh": "echo $X\n", "elsewhere.sh": "echo $Y\n"})
    with pytest.raises(PlanError):
        discover_knobs(tmp_path / "inside", "../elsewhere.sh")


def test_python_shebang_runner_without_extension_is_python(tmp_path):
    files = {"run": "#!/usr/bin/env python3\nimport os\nos.environ['PY']\n"}
    report = scan(tmp_path, files, runner="run")
    assert set(report.knobs) == {"PY"}


def test_result_is_deterministic(tmp_path):
    files = {
        "run.sh": "echo ${B:-1} $A\npython x.py\nbash y.sh\n",
        "x.py": "import os\nos.environ[os.getenv('N')]\nos.getenv('C')\n",
        "y.sh": "echo ${!R} $D\n",
    }
    first = scan(tmp_path, files)
    assert first == discover_knobs(tmp_path, "run.sh")
    assert first.dynamic == ("x.py:2", "y.sh:1")
    assert list(first.knobs) == ["A", "B", "C", "D", "N"]


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    repo(tmp_path, {"run.sh": "python locked.py\necho $A\n", "locked.py": "import os\n"})
    read_bytes = Path.read_bytes

    def refuse_locked(path: Path) -> bytes:
        if path.name == "locked.py":
            raise PermissionError(13, "Permission denied")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    report = discover_knobs(tmp_path, "run.sh")
    assert report.unreadable == ("locked.py: cannot be read (Permission denied)",)
    assert set(report.knobs) == {"A"}
    assert report.files == ("run.sh",)


def test_redirection_targets_are_not_commands(tmp_path):
    report = scan(tmp_path, {
        "run.sh": "exec > logs/old.sh 2>&1\n< inputs/args.sh xargs echo $A\n",
        "logs/old.sh": "echo $STALE\n",
        "inputs/args.sh": "echo $INPUT\n",
    })
    assert report.files == ("run.sh",)
    assert set(report.knobs) == {"A"}


def test_the_knobs_command_lists_the_runners_knobs_first_and_the_contracts_and_inherited_apart(study) -> None:
    study.commit({"run.sh": textwrap.dedent("""\
        #!/usr/bin/env bash
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
        echo "$RATIOCINATOR_SEED $RATIOCINATOR_OUT_DIR ${CUDA_VISIBLE_DEVICES:-}"
        python3 train.py --lr "${LR:-0.1}" --width "${WIDTH:-8}"
        """), "train.py": "import os\nDEPTH = int(os.environ.get('DEPTH', '2'))\n"})
    shown = CliRunner().invoke(app, ["--home", str(study.home), "knobs", str(study.spec())], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    mine, apart = shown.output.split("also read: the run contract's variables and inherited settings")
    listed = [line.split()[0] for line in mine.splitlines() if line.strip() and not line.startswith(("knob", "  "))]
    assert {"LR", "WIDTH", "DEPTH"} <= set(listed) and not any(n.startswith(("RATIOCINATOR_", "OMP_", "CUDA_"))
                                                                 for n in listed)
    rows = {line.split()[0]: line.split()[1:3] for line in apart.splitlines()[2:] if line.strip()}
    assert rows["RATIOCINATOR_SEED"] == ["run", "contract"] and rows["RATIOCINATOR_OUT_DIR"] == ["run", "contract"]
    assert rows["OMP_NUM_THREADS"][0] == "inherited" and rows["CUDA_VISIBLE_DEVICES"][0] == "inherited"
