"""Terminal output: names, captions, queries and error lines never carry control characters to the terminal.

A file named with an escape sequence (``\\x1b]0;...`` retitles the window, ``\\x1b[2J`` clears it, ``\\r`` rewrites
the line, U+202E reverses it) is printed escaped: ``\\x1b``, ``\\x0d``, ``\\u202e``. New case = one line in NAMES.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import hostile_fixture as hf

NAMES = {  # name: a file name (without extension) a folder may hold
    "window title": "\x1b]0;owned\x07title",
    "clear screen": "\x1b[2J\x1b[Hclear",
    "colour": "\x1b[31mred",
    "carriage return": "ok\rfake",
    "backspace": "abc\x08\x08\x08xyz",
    "right-to-left override": "photo\u202egnp.exe",
    "C1 control": "csi\x9b31m",
    "newline": "two\nlines",
}
RAW = [c for n in NAMES.values() for c in n if ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c == "\u202e"]


def _assert_clean(text: str) -> None:
    bad = [c for c in text if c in RAW and c != "\n"]
    assert not bad, repr(text)


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("names") / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in NAMES.values():
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{name}.png")
    (root / f"{NAMES['colour']}.txt").write_text("caption")
    (root / "\x1b[31mbroken.jpg").write_bytes(b"not an image")  # its warning names it
    return root, tmp_path_factory.mktemp("names-index") / "index"


def test_search_results_escape_names(index, tiny_model, capsys):
    root, out = index
    code, stdout, err = hf.cli(capsys, "index", root, "--index-dir", out, "--model", tiny_model, "-q")
    assert code == 0, err
    _assert_clean(stdout)
    code, stdout, err = hf.cli(capsys, "search", "red \x1b[2J", "--index-dir", out, "-k", len(NAMES))
    assert code == 0, err
    _assert_clean(stdout)
    assert "\\x1b]0;owned\\x07title.png" in stdout and "\\u202e" in stdout and "two\\x0alines" in stdout
    assert "\\x1b[2J" in stdout  # the query itself, echoed
    code, stdout, err = hf.cli(capsys, "search", "red", "--index-dir", out, "--json", "-k", len(NAMES))
    assert code == 0, err  # JSON: escaped by JSON itself
    _assert_clean(stdout)
    assert {h["ref"] for h in json.loads(stdout)["hits"]} <= {f"{n}.png" for n in NAMES.values()}


@pytest.mark.parametrize("case", NAMES)
def test_error_lines_escape_what_they_name(case, tmp_path, capsys):
    missing = tmp_path / NAMES[case]
    code, out, err = hf.cli(capsys, "info", "--index-dir", missing)
    assert code == 2
    _assert_clean(err.rstrip("\n"))
    assert len(err.rstrip("\n").splitlines()) == 1  # a newline in the name cannot fake a second line


def test_warnings_escape_file_names(index, tiny_model, tmp_path):
    """Log lines on a real stderr (a subprocess: pytest captures logging in-process)."""
    root, _ = index
    code = ("import sys\nfrom cliplens.cli import main\n"
            f"sys.exit(main(['index', {str(root)!r}, '--index-dir', {str(tmp_path / 'i')!r}, '--model', "
            f"{tiny_model!r}, '-q']))")
    proc = hf.run_python(code)
    assert "broken.jpg" in proc.stderr and "\\x1b[31mbroken.jpg" in proc.stderr
    _assert_clean(proc.stderr)
    _assert_clean(proc.stdout)
