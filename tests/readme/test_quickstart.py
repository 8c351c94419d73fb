"""The README's Quick start is what CI runs, and its set-up line installs what its test line needs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("quickstart", ROOT / "tests" / "readme" / "quickstart.py")
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)

README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def installed_by(setup: str) -> set[str]:
    """Every distribution name the set-up line's `pip install -e ".[extras]"` asks for, extras resolved."""
    match = re.search(r'pip install -e "\.\[([^\]]*)\]"', setup)
    assert match, f"the set-up line does not install this project with extras: {setup}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, names, todo = project["optional-dependencies"], {_name(r) for r in project["dependencies"]}, \
        [e.strip() for e in match.group(1).split(",")]
    seen = set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in extras[extra]:
            inner = re.match(r"cliplens\[([^\]]+)\]", req)
            if inner:
                todo += [e.strip() for e in inner.group(1).split(",")]
            else:
                names.add(_name(req))
    return names


def test_quickstart_has_the_three_commands():
    cmds = quickstart.commands(README)
    assert cmds["setup"].startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
    assert cmds["main"] == ".venv/bin/cliplens demo"
    assert cmds["test"] == ".venv/bin/python -m pytest -q"


def test_the_script_prints_what_the_module_reads():
    for step, line in quickstart.commands(README).items():
        run = subprocess.run([sys.executable, str(ROOT / "tests/readme/quickstart.py"), step], capture_output=True,
                             text=True, check=True)
        assert run.stdout.strip() == line


def test_setup_installs_what_the_tests_need():
    names = installed_by(quickstart.commands(README)["setup"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["optional-dependencies"]["test"]}
    assert {"pytest", "httpx", "playwright"} <= needed
    assert needed <= names, f"the set-up line misses {sorted(needed - names)}"
    # the optional backends the suite exercises come with `all`, so CI skips none of them
    assert {"faiss-cpu", "pymilvus", "onnxruntime", "scikit-learn", "fastapi", "ray"} <= names


def test_ci_runs_exactly_the_readme_lines():
    assert 'setup=$(python3 tests/readme/quickstart.py setup)' in CI
    assert 'test=$(python3 tests/readme/quickstart.py test)' in CI
    assert 'bash -euo pipefail -c "$setup"' in CI and 'bash -euo pipefail -c "$test"' in CI
    # and nothing else installs Python packages or runs the tests behind the README's back
    for line in CI.splitlines():
        code = line.split("#", 1)[0]
        assert "pip install" not in code and "pytest" not in code, line


def test_a_readme_without_quick_start_is_refused_in_one_line():
    try:
        quickstart.commands("# cliplens\n\nno quick start here\n")
    except ValueError as exc:
        assert "Quick start" in str(exc)
    else:
        raise AssertionError("a README without a Quick start must not yield commands")
