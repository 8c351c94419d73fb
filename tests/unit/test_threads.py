"""cliplens._threads: OpenBLAS's idle threads sleep at once in cliplens processes, unless the user said otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "import os, sys; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), 'numpy' in sys.modules)"


def _run(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ,
                          timeout=120, check=True).stdout.split()


def test_set_before_numpy_loads():
    assert _run("from cliplens._threads import calm_blas_threads as c; print(c()); import numpy; " + SHOW) == [
        "True", "4", "True"]


@pytest.mark.parametrize("code, env, want", [
    ("import numpy; from cliplens._threads import calm_blas_threads as c; print(c()); " + SHOW, {},
     ["False", "None", "True"]),  # too late: OpenBLAS has read its settings
    ("from cliplens._threads import calm_blas_threads as c; print(c()); " + SHOW, {"OPENBLAS_THREAD_TIMEOUT": "8"},
     ["False", "8", "False"]),  # the user's own value stays
])
def test_left_alone_when_too_late_or_chosen(code, env, want):
    assert _run(code, **env) == want


def test_the_cli_sets_it_first_thing():
    out = _run("from cliplens.cli import main; main(['--version']); " + SHOW)
    assert out[-2:] == ["4", "False"]  # set, before anything loads numpy (building the parser no longer does)
    out = _run("import contextlib, io\nfrom cliplens.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):"
               "\n    main(['--version'])\nimport numpy\n" + SHOW)
    assert out[-2:] == ["4", "True"]  # and numpy, loaded later by a command, finds it set
