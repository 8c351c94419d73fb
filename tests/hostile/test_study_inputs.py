"""Hostile inputs of the study commands: one clear line, exit 2, nothing written. A new case is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplens.store import index_files
from cliplens.cli import main
from cliplens.suspects import SuspectsError, read_reference

REFERENCES = [  # (file name, bytes, what the message must say)
    ("bad.txt", b"12\nseven\n", "expected item ids"),
    ("bad.txt", b"3\n99999\n", "outside this index"),
    ("bad.txt", b"-1\n", "outside this index"),
    ("bad.txt", b"\xff\xfe\x00garbage", "cannot read the reference list"),
    ("bad.json", b'{"ids": [1, 2]}', "expected item ids"),
    ("bad.json", b"[1, 2", "expected item ids"),
    ("bad.json", b'[1.5, "x"]', "expected item ids"),
    ("bad.json", b"[" + b"9" * 5000 + b"]", "expected item ids"),
    ("bad.json", b"[1.0, 2]", "expected item ids"),
    ("bad.json", b"[true]", "expected item ids"),
    ("bad.txt", b"1e3\n", "expected item ids"),
]


@pytest.mark.parametrize("name,data,message", REFERENCES)
def test_reference_files(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SuspectsError, match=message):
        read_reference(path, 18)


def test_reference_that_is_a_folder_or_missing(tmp_path):
    for path in (tmp_path, tmp_path / "missing.txt"):
        with pytest.raises(SuspectsError, match="cannot read"):
            read_reference(path, 18)
    ok = tmp_path / "ok.txt"
    ok.write_text("# comment\n\n5\n5 # again\n2\n")
    assert read_reference(ok, 18).tolist() == [2, 5]


ARGV = [  # command lines that must be refused before any work, with part of the message
    (["fewshot", "--train-index-dir", "{i}", "--index-dir", "{i}", "--shots", "0,2"], "shots are whole numbers"),
    (["fewshot", "--train-index-dir", "{i}", "--index-dir", "{i}", "--shots", "1,two"], "shots are whole numbers"),
    (["fewshot", "--train-index-dir", "{i}", "--index-dir", "{i}", "--seeds", "0"], "must be at least 1"),
    (["fewshot", "--train-index-dir", "{i}", "--index-dir", "{i}", "--methods", "magic"], "unknown method magic"),
    (["fewshot", "--train-index-dir", "{i}/nope", "--index-dir", "{i}"], "no index at"),
    (["suspects", "--index-dir", "{i}", "--reference", "{i}/CURRENT"], "expected item ids"),
    (["map", "--index-dir", "{i}", "--out", "{i}/map.txt"], "must name a .png"),
    (["map", "--index-dir", "{i}", "--method", "mds"], "invalid choice"),
    (["compare", "--index-dir", "{i}"], "at least two indexes"),
    (["calibrate", "--index-dir", "{i}", "--target", "1.5"], "target precision"),
    (["search", "apple", "--index-dir", "{i}", "--min-score", "high"], "expected a cosine such as 0.25 or 'calibrated'"),
]


@pytest.mark.parametrize("argv,message", ARGV)
def test_bad_command_lines(tiny_index, capsys, argv, message, monkeypatch):
    import cliplens.cli.common as common

    root = tiny_index
    before = sorted(p.name for p in root.iterdir())
    # every command loads its model through cliplens.cli.common.load_model
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was loaded for a refused command"))
    assert main([a.replace("{i}", str(root)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written into the index
    json.loads((index_files(root) / "manifest.json").read_text())
    assert np.load(index_files(root) / "embeddings.npy").shape[0] == 200
