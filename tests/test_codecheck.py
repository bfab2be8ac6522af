"""Static code checks on small real checkouts in tmp_path; pip resolves offline against wheels built here."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from gitrepo import GitRepo
from ratiocinator.check.static import (
    Finding,
    lfs_pointer_findings,
    placeholders,
    python_syntax_errors,
    reached_python_files,
    requirements_findings,
)
from ratiocinator.errors import WorkspaceError
from ratiocinator.repo.knobs import discover_knobs
from ratiocinator.repo.workspace import LFS_POINTER_PREFIX


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content).lstrip("\n"))
    return root


def where(findings: list[Finding]) -> list[str]:
    return [finding.where() for finding in findings]


# --- syntax -----------------------------------------------------------------------------


def test_syntax_error_in_a_reached_module_is_found_at_its_line(tmp_path):
    write(tmp_path, {
        "run.sh": "set -e\npython train.py --epochs 1\n",
        "train.py": "import model\nmodel.fit()\n",
        "model.py": "def fit():\n    return 1\ndef broken(:\n    pass\n",
        "unused.py": "def also_broken(:\n",  # not reached, so not checked
    })
    files = reached_python_files(tmp_path, "run.sh")
    assert files == ["train.py", "model.py"]
    assert "model.py" not in discover_knobs(tmp_path, "run.sh").files  # why reached_python_files exists

    findings = python_syntax_errors(tmp_path, files)
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.kind, finding.where(), finding.excerpt) == ("syntax_error", "model.py:3", "def broken(:")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert finding.message.startswith(f"Python {version} cannot compile model.py: invalid syntax")
    assert "line 3, column 12" in finding.message


def test_valid_files_are_never_reported(tmp_path):
    write(tmp_path, {
        "latin.py": "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n".encode("latin-1"),
        "bom.py": b"\xef\xbb\xbfx = 1\r\ny = 2\r\n",
        "modern.py": """
            from __future__ import annotations
            import re
            pattern = re.compile("\\d+")  # an invalid escape warns, it is no error

            def kind(value: int | None) -> str:
                match value:
                    case None:
                        return "none"
                    case _:
                        return f"{value!r:>{4}}"

            async def main():
                async with open_thing() as thing:
                    await thing
        """,
        "empty.py": "",
    })
    assert python_syntax_errors(tmp_path, ["latin.py", "bom.py", "modern.py", "empty.py"]) == []


def test_errors_the_compiler_finds_after_parsing(tmp_path):
    write(tmp_path, {
        "outside.py": "x = 1\nreturn x\n",
        "late_future.py": "import os\nfrom __future__ import annotations\n",
        "indent.py": "def f():\nreturn 1\n",
        "tabs.py": b"if True:\n        x = 1\n\tx = 2\n",
        "nul.py": b"x = 1\ny = '\0'\n",
    })
    found = {f.file: f for f in python_syntax_errors(
        tmp_path, ["outside.py", "late_future.py", "indent.py", "tabs.py", "nul.py"])}
    assert found["outside.py"].where() == "outside.py:2" and "'return' outside function" in found["outside.py"].message
    assert found["late_future.py"].where() == "late_future.py:2"
    assert "IndentationError" in found["indent.py"].message and found["indent.py"].excerpt == "return 1"
    assert "TabError" in found["tabs.py"].message and found["tabs.py"].line == 3
    assert found["nul.py"].line == 2 and "null bytes" in found["nul.py"].message


def test_python_runner_is_itself_reached(tmp_path):
    write(tmp_path, {
        "train": "#!/usr/bin/env python3\nimport pkg.sub\n",
        "pkg/__init__.py": "",
        "pkg/sub.py": "x = (\n",
    })
    files = reached_python_files(tmp_path, "train")
    assert files == ["train", "pkg/__init__.py", "pkg/sub.py"]
    assert where(python_syntax_errors(tmp_path, files)) == ["pkg/sub.py:1"]


def test_unreadable_and_missing_files_are_skipped(tmp_path):
    assert python_syntax_errors(tmp_path, ["gone.py"]) == []
    assert placeholders(tmp_path, ["gone.py"]) == []


# --- placeholders -----------------------------------------------------------------------

STUBS = """
    import abc
    import typing
    from abc import ABC, abstractmethod
    from typing import Protocol, overload

    # TODO: split this module (a note at module level)
    todo_list = []  # the word in a name is no marker


    def train(model):
        pass


    def evaluate(model):
        \"\"\"Score the model.\"\"\"
        raise NotImplementedError("later")


    def export(model): ...


    def predict(model):
        raise NotImplementedError


    def documented_hook():
        \"\"\"A documented no-op is a choice, not a stub.\"\"\"


    class Base(ABC):
        # TODO: class-level note
        def __init__(self):
            pass

        @abstractmethod
        def step(self):
            ...

        @abc.abstractmethod
        def other(self):
            raise NotImplementedError

        def hook(self):
            pass


    class Child(Base):
        def hook(self):
            return 1


    class Reader(Protocol):
        def read(self) -> bytes:
            ...


    class Uninstantiable:
        def __init__(self):
            raise NotImplementedError


    @overload
    def parse(x: int) -> int: ...
    @typing.overload
    def parse(x: str) -> str: ...
    def parse(x):
        return x
"""


def test_stub_functions_are_found_and_intended_empty_bodies_are_not(tmp_path):
    write(tmp_path, {"stubs.py": STUBS})
    findings = placeholders(tmp_path, ["stubs.py"])
    assert {(f.line, f.message) for f in findings} == {
        (10, "function `train` has no implementation (body is only `pass`)"),
        (14, "function `evaluate` has no implementation (body is only `raise NotImplementedError`)"),
        (19, "function `export` has no implementation (body is only `...`)"),
        (22, "function `predict` has no implementation (body is only `raise NotImplementedError`)"),
        (58, "function `Uninstantiable.__init__` has no implementation (body is only `raise NotImplementedError`)"),
    }
    train = next(f for f in findings if f.line == 10)
    assert (train.kind, train.file, train.excerpt, train.evidence) == (
        "placeholder", "stubs.py", "def train(model):", ("line 11: pass",))
    assert next(f for f in findings if f.line == 19).evidence == ()  # one-line def: the excerpt shows it all


def test_overridden_base_methods_are_not_stubs_across_files(tmp_path):
    write(tmp_path, {
        "base.py": """
            class Model:
                def forward(self, x):
                    raise NotImplementedError

                def on_epoch_end(self):
                    pass

                def loss(self, x):
                    raise NotImplementedError
        """,
        "mid.py": "import base\nclass Middle(base.Model):\n    pass\n",
        "net.py": "from mid import Middle\nclass Net(Middle):\n    def forward(self, x):\n        return x\n",
    })
    findings = placeholders(tmp_path, ["base.py", "mid.py", "net.py"])
    assert [(f.where(), f.message) for f in findings] == [
        ("base.py:5", "function `Model.on_epoch_end` has no implementation (body is only `pass`)"),
        ("base.py:8", "function `Model.loss` has no implementation (body is only `raise NotImplementedError`)"),
    ]


def test_pyi_ellipsis_bodies_are_stubs_by_design(tmp_path):
    write(tmp_path, {"api.pyi": "def load(path: str) -> bytes: ...\n"})
    assert placeholders(tmp_path, ["api.pyi"]) == []


def test_todo_comments_count_only_inside_function_bodies(tmp_path):
    write(tmp_path, {"train.py": """
        # TODO: module note
        # FIXME module note too
        import os

        def train(steps):
            # TODO: warm-up schedule
            for _ in range(steps):
                loss = 1.0  # FIXME: real loss
                def inner():
                    return 2  # XXX nested
            x = 1
            # todo: lowercase at the start still marks
            # a list of todo items, lowercase mid-comment, does not

        # TODO: after the function, at module level
        TODO_COUNT = 3  # names are not comments
        def todo_helper():
            return "TODO in a string is data"
    """})
    findings = placeholders(tmp_path, ["train.py"])
    note = "comment in the body of function `{}`: check that the work it notes is done"
    assert [(f.line, f.message) for f in findings] == [
        (6, "TODO " + note.format("train")),
        (8, "FIXME " + note.format("train")),
        (10, "XXX " + note.format("train.inner")),
        (12, "TODO " + note.format("train")),
    ]
    assert findings[1].excerpt == "loss = 1.0  # FIXME: real loss"
    assert {f.kind for f in findings} == {"todo_note"}  # a note, not missing code


def test_omitted_code_phrases_in_comments_and_strings(tmp_path):
    write(tmp_path, {"model.py": """
        import torch

        class Net:
            def forward(self, x):
                x = self.encoder(x)
                # ... rest of the code ...
                return x

        def load():
            \"\"\"Load the weights.

            Details omitted for brevity.
            \"\"\"
            return None

        def setup():
            # ... (same as above)
            # Your code here
            banner = "rest of the implementation"
            return banner

        # the rest of the code expects float32 inputs
        y = 2  # same as above
        # fill in missing values with zeros
        # implement a faster kernel one day
        fill_in_value = 0
        message = "please fill in the form below"
        note = f"{y} steps omitted for brevity"
    """})
    findings = placeholders(tmp_path, ["model.py"])
    assert [(f.line, f.message) for f in findings] == [
        (6, 'a comment says code was left out ("rest of the code"): put the code back'),
        (12, 'a string says code was left out ("omitted for brevity"): put the code back'),
        (17, 'a comment says code was left out ("same as above"): put the code back'),
        (18, 'a comment says code was left out ("Your code here"): put the code back'),
        (19, 'a string says code was left out ("rest of the implementation"): put the code back'),
        (28, 'a string says code was left out ("omitted for brevity"): put the code back'),
    ]
    assert findings[1].excerpt == "Details omitted for brevity."


def test_files_that_do_not_parse_are_left_to_the_syntax_check(tmp_path):
    write(tmp_path, {"broken.py": "def f(:\n    pass  # TODO\n"})
    assert placeholders(tmp_path, ["broken.py"]) == []


# --- requirements -----------------------------------------------------------------------


def wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A minimal valid pure-Python wheel, so pip can resolve against a local folder offline."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": "",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: ratiocinator-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(directory / f"{module}-{version}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text.encode())}")
        archive.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict[str, str]:
    """pip sees only a local wheel folder: rcheck-alpha 1.0, rcheck-beta 1.0 needing alpha 2.0,
    and rcheck-gamma 1.0 to 1.9."""
    wheels = tmp_path_factory.mktemp("wheels")
    wheel(wheels, "rcheck-alpha", "1.0")
    wheel(wheels, "rcheck-beta", "1.0", ("rcheck-alpha==2.0",))
    for minor in range(10):
        wheel(wheels, "rcheck-gamma", f"1.{minor}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_CONFIG_FILE": os.devnull}


def check(root: Path, env: dict[str, str], text: str | None, exclude: tuple[str, ...] = (),
          timeout_s: float = 60, python: str = sys.executable) -> list[Finding]:
    if text is not None:
        write(root, {"requirements.txt": text})
    return requirements_findings(root, "requirements.txt", exclude, python, timeout_s=timeout_s, env=env)


@pytest.mark.subprocess
def test_resolvable_requirements_give_no_findings(tmp_path, offline_env):
    assert check(tmp_path, offline_env, "# pinned\nrcheck-alpha==1.0  # the only one\n") == []
    assert requirements_findings(tmp_path, None, (), sys.executable, timeout_s=5) == []


@pytest.mark.subprocess
def test_missing_package_is_named_at_its_line(tmp_path, offline_env):
    findings = check(tmp_path, offline_env, "rcheck-alpha\n\ndefinitely-missing-pkg==1.0\n")
    assert len(findings) == 1
    finding = findings[0]
    assert finding.kind == "unresolvable_requirement"
    assert finding.message == ("`definitely-missing-pkg==1.0` cannot be installed: "
                               "pip found no version of it in the package index")
    assert (finding.where(), finding.excerpt) == ("requirements.txt:3", "definitely-missing-pkg==1.0")
    assert any("No matching distribution found for definitely-missing-pkg==1.0" in line
               for line in finding.evidence)


@pytest.mark.subprocess
def test_version_that_does_not_exist_is_named(tmp_path, offline_env):
    [finding] = check(tmp_path, offline_env, "rcheck-alpha==9.9\n")
    assert finding.kind == "unresolvable_requirement" and finding.where() == "requirements.txt:1"
    assert finding.message == "`rcheck-alpha==9.9` cannot be installed: pip found only the versions 1.0"
    [many] = check(tmp_path, offline_env, "rcheck-gamma>=2\n")
    assert many.message == ("`rcheck-gamma>=2` cannot be installed: pip found only the versions "
                            "1.0, 1.1, 1.2, …, 1.7, 1.8, 1.9 (10 in all)")


@pytest.mark.subprocess
def test_unsatisfiable_dependency_points_at_the_requirement_that_needs_it(tmp_path, offline_env):
    [finding] = check(tmp_path, offline_env, "rcheck-beta\n")
    assert finding.message == ("`rcheck-alpha==2.0`, which `rcheck-beta` requires, cannot be installed: "
                               "pip found only the versions 1.0")
    assert finding.where() == "requirements.txt:1"


@pytest.mark.subprocess
def test_conflict_is_reported_with_pips_explanation(tmp_path, offline_env):
    write(tmp_path, {"requirements/base.txt": "rcheck-alpha==1.0\n"})
    [finding] = check(tmp_path, offline_env, "-r requirements/base.txt\nrcheck-beta \\\n  ; python_version > '3'\n")
    assert finding.kind == "unresolvable_requirement"
    assert finding.message == ("pip cannot install `rcheck-beta ; python_version > '3'` and rcheck-alpha==1.0 "
                               "together: no set of versions satisfies them all")
    assert finding.where() == "requirements.txt:2"  # a continuation is located at its first line
    assert "rcheck-beta 1.0 depends on rcheck-alpha==2.0" in finding.evidence
    assert "The user requested rcheck-alpha==1.0" in finding.evidence


@pytest.mark.subprocess
def test_excluded_requirements_are_not_checked(tmp_path, offline_env):
    text = "rcheck-alpha\nDefinitely_Missing.Pkg==1.0\n"
    assert check(tmp_path, offline_env, text, exclude=("definitely-missing-pkg",)) == []


@pytest.mark.subprocess
def test_unparseable_line_is_located_in_the_included_file(tmp_path, offline_env):
    write(tmp_path, {"extra.txt": "rcheck-alpha\nnot a requirement\n"})
    [finding] = check(tmp_path, offline_env, "# base\n-r extra.txt\n")
    assert finding.kind == "invalid_requirement"
    assert finding.message.startswith("pip cannot parse the requirement 'not a requirement'")
    assert (finding.where(), finding.excerpt) == ("extra.txt:2", "not a requirement")


@pytest.mark.subprocess
def test_other_pip_failures_quote_pip(tmp_path, offline_env):
    [finding] = check(tmp_path, offline_env, "-e ./nowhere\n")
    assert finding.kind == "requirements_error"
    assert finding.message.startswith("`pip install --dry-run -r requirements.txt` failed (exit 1): "
                                      "./nowhere is not a valid editable requirement")
    assert finding.evidence[0].startswith("ERROR: ./nowhere is not a valid editable requirement")


def test_missing_requirements_files(tmp_path, offline_env):
    [finding] = check(tmp_path, offline_env, None)
    assert finding.kind == "requirements_missing" and finding.file == "requirements.txt"
    [nested] = check(tmp_path, offline_env, "-r nowhere.txt\n")
    assert nested.kind == "requirements_missing" and "nowhere.txt" in nested.message


@pytest.mark.subprocess
def test_timeout_is_unchecked_not_unresolvable(tmp_path, offline_env):
    [finding] = check(tmp_path, offline_env, "rcheck-alpha\n", timeout_s=0.05)
    assert finding.kind == "requirements_unchecked"
    assert "did not finish" in finding.message and "unknown" in finding.message


@pytest.mark.subprocess
def test_unreachable_index_is_unchecked_not_unresolvable(tmp_path, offline_env):
    with socket.socket() as closed:  # bound, never listening: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {k: v for k, v in offline_env.items() if k not in ("PIP_NO_INDEX", "PIP_FIND_LINKS")}
        env |= {"PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple", "PIP_RETRIES": "1", "PIP_TIMEOUT": "5"}
        findings = check(tmp_path, env, "rcheck-alpha\n")
    assert [f.kind for f in findings] == ["requirements_unchecked"]
    assert "network errors" in findings[0].message and "`rcheck-alpha`" in findings[0].message
    assert any("Retrying" in line for line in findings[0].evidence)


def test_missing_interpreter_is_unchecked(tmp_path, offline_env):
    [finding] = check(tmp_path, offline_env, "rcheck-alpha\n", python=str(tmp_path / "no-python"))
    assert finding.kind == "requirements_unchecked" and "cannot run" in finding.message


# --- Git LFS and the finding type -------------------------------------------------------


def test_lfs_pointers_are_findings(tmp_path):
    repo = GitRepo(tmp_path / "repo")
    pointer = LFS_POINTER_PREFIX + b"\noid sha256:" + b"0" * 64 + b"\nsize 12345\n"
    repo.commit({"data/train.bin": pointer, "train.py": "print('hi')\n"})
    [finding] = lfs_pointer_findings(repo.path)
    assert (finding.kind, finding.where()) == ("lfs_pointer", "data/train.bin:1")
    assert "Git LFS pointer, not the real file content: run `git lfs pull`" in finding.message
    assert finding.excerpt == LFS_POINTER_PREFIX.decode()
    assert finding.evidence == ("oid sha256:" + "0" * 64, "size 12345")
    with pytest.raises(WorkspaceError):
        lfs_pointer_findings(tmp_path)  # not a git working tree


def test_finding_location_and_json():
    finding = Finding("syntax_error", "bad", file="a.py", line=3, excerpt="x(", evidence=("e",))
    assert finding.where() == "a.py:3"
    assert Finding("requirements_missing", "gone", file="r.txt").where() == "r.txt"
    assert Finding("requirements_unchecked", "slow").where() == ""
    assert finding.to_json() == {"kind": "syntax_error", "message": "bad", "file": "a.py", "line": 3,
                                 "excerpt": "x(", "evidence": ["e"]}
