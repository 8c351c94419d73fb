"""Helpers for tests/hostile: run the CLI in-process, check the one-line error, digest a tree.

Plain functions (``import hostile_fixture as hf``), like the other fixture modules.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): a file's sha256, a link's target, "dir" or "other"."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "other"
    return out


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``cliplens ARGV`` in this process: (exit code, stdout, stderr)."""
    from cliplens.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *, expect: str, exit_code: int = 2) -> None:
    """Exit ``exit_code`` with exactly one line on stderr, starting "cliplens: error:" and naming ``expect``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith("cliplens: error:"), err
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]


def run_python(code: str, *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c CODE`` with this checkout's sources first on the path; fails the test on a non-zero exit."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(Path(__file__).parent)]), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc
