"""Hostile image lists (`cliplens index list FILE`): each case writes a list beside a few real images; the run
either refuses the whole file in one line (exit 2) or skips the bad rows with their reason, and never reads or
indexes anything outside the list's folder.

A new case is one line in FILE_CASES (whole file refused) or ROW_CASES (rows skipped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplens.cli import main
from cliplens.sources import listfile
from cliplens.store import IndexStore

IMAGES = ("a.png", "b.png", "sub/c.png")


@pytest.fixture
def listdir(tmp_path):
    root = tmp_path / "catalogue"
    rng = np.random.default_rng(0)
    for rel in IMAGES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / rel)
    (tmp_path / "secret.png").write_bytes((root / "a.png").read_bytes())  # outside the list's folder
    return root


def _run(capsys, tiny_model, list_file, out):
    code = main(["index", "list", str(list_file), "--index-dir", str(out), "--model", tiny_model, "--device", "cpu",
                 "-q", "--batch-size", "4"])
    o, e = capsys.readouterr()
    return code, o, e


FILE_CASES = [  # (id, file name, content bytes, text the one-line error must contain)
    ("no-path-column", "l.csv", b"file,caption\na.png,x\n", 'has no "path" column'),
    ("not-utf8", "l.csv", b"path,caption\na.png,caf\xe9\n", "is not UTF-8"),
    ("nul-bytes", "l.csv", b"path\na.png\x00\n", "holds NUL bytes"),
    ("jsonl-not-json", "l.jsonl", b'{"path": "a.png"}\n{nope\n', "line 2 is not JSON"),
    ("jsonl-not-object", "l.jsonl", b'["a.png"]\n', "is a JSON list, not an object"),
    ("parquet-garbage", "l.parquet", b"PAR1 this is not parquet", "cannot read"),
    ("wrong-extension", "l.txt", b"path\na.png\n", "a list must be .csv, .jsonl or .parquet"),
    ("empty-csv", "l.csv", b"", 'has no "path" column'),
    ("csv-bad-quoting", "l.csv", b'path,caption\n"a.png,"unterminated\n', "no usable images"),
]


@pytest.mark.parametrize("name,content,needle", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_bad_list_file_is_refused_in_one_line(name, content, needle, listdir, tmp_path, tiny_model, capsys):
    (listdir / name).write_bytes(content)
    out = tmp_path / "idx"
    code, _, err = _run(capsys, tiny_model, listdir / name, out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cliplens: error:") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not (out / "CURRENT").exists()


def test_an_oversized_list_is_refused_before_it_is_read(listdir, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setattr(listfile, "MAX_LIST_BYTES", 64)
    (listdir / "l.csv").write_text("path\n" + "a.png\n" * 20)
    code, _, err = _run(capsys, tiny_model, listdir / "l.csv", tmp_path / "idx")
    assert code == 2 and "over the 0 MiB a list may have" in err


ROW_CASES = [  # (id, path as written in the list, reason recorded for it)
    ("absolute", "/etc/passwd", "absolute path"),
    ("parent", "../secret.png", "leaves the list's folder"),
    ("deep-parent", "sub/../../secret.png", "leaves the list's folder"),
    ("missing", "nope.png", "cannot read"),
    ("a-folder", "sub", "not a file"),
    ("empty", "", "no path"),
    ("not-an-image", "l.csv", "not a readable image"),
    ("windows-drive", "C:/x.png", "absolute path"),
]


@pytest.mark.parametrize("bad,reason", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_bad_rows_are_skipped_with_their_reason(bad, reason, listdir, tmp_path, tiny_model, capsys):
    rows = [{"path": "a.png", "caption": "one"}, {"path": bad, "caption": "bad"}, {"path": "b.png"}]
    (listdir / "l.csv").write_text("path,caption\n" + "".join(f'"{r["path"]}",{r.get("caption", "")}\n' for r in rows))
    code, out, err = _run(capsys, tiny_model, listdir / "l.csv", tmp_path / "idx")
    assert code == 0, err
    store = IndexStore.open(tmp_path / "idx")
    assert sorted(store.items["path"]) == ["a.png", "b.png"]
    skipped = {s["reason"] for s in store.manifest.folder["skipped"]}
    assert any(reason in r for r in skipped), skipped
    assert "1 skipped" in out


def test_a_jsonl_path_that_is_not_a_string_is_skipped(listdir, tmp_path, tiny_model, capsys):
    lines = [{"path": "a.png"}, {"path": 3}, {"path": {"x": 1}}, {"path": None}, {"caption": "no path"}]
    (listdir / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, err = _run(capsys, tiny_model, listdir / "l.jsonl", tmp_path / "idx")
    assert code == 0, err
    store = IndexStore.open(tmp_path / "idx")
    assert list(store.items["path"]) == ["a.png"]  # 3 is a name ("3") that does not exist; the others have none
    assert "4 skipped" in out
