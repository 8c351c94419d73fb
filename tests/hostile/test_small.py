"""Small hostile inputs: a NaN score threshold, a probe trained and tested on one index, an index of one kind
written over the other. One line, exit 2, nothing on disk changed (unless --force). New case = one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import hostile_fixture as hf
from cliplens.store import IndexStore

SCORES = ["nan", "NaN", "inf", "-inf", "1.5", "-2", "1e309", "abc", ""]


@pytest.mark.parametrize("score", SCORES)
def test_min_score_must_be_a_finite_cosine(score, tiny_index, capsys):
    code, out, err = hf.cli(capsys, "search", "cat", "--index-dir", tiny_index, "--min-score", score)
    hf.assert_one_line_error(code, err, expect="--min-score")
    assert out == ""


@pytest.mark.parametrize("copy", [False, True], ids=["same folder", "a copy of it"])
def test_probe_on_one_index_twice_is_refused(copy, tiny_index, tmp_path, capsys):
    other = shutil.copytree(tiny_index, tmp_path / "copy") if copy else tiny_index
    code, out, err = hf.cli(capsys, "probe", "--index-dir", tiny_index, "--eval-index-dir", other, "--no-zero-shot", "-q")
    hf.assert_one_line_error(code, err, expect="same index")


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "a.png")
    return root


def test_cifar_index_over_a_folder_index_needs_force(photos, tmp_path, cifar_root, tiny_model, capsys):
    out = tmp_path / "index"
    assert hf.cli(capsys, "index", photos, "--index-dir", out, "--model", tiny_model, "-q")[0] == 0
    before = hf.tree_digest(out)
    cifar = ("index", "cifar100", "--data-dir", cifar_root, "--no-verify", "--index-dir", out, "--model", tiny_model,
             "-q")
    code, _, err = hf.cli(capsys, *cifar)
    hf.assert_one_line_error(code, err, expect="--force")
    assert hf.tree_digest(out) == before
    code, _, err = hf.cli(capsys, *cifar, "--force")
    assert code == 0, err
    assert IndexStore.open(out).manifest.source.name == "cifar100"


def test_folder_index_over_a_cifar_index_needs_force(photos, tmp_path, tiny_index, tiny_model, capsys):
    out = shutil.copytree(tiny_index, tmp_path / "index")
    before = hf.tree_digest(out)
    folder = ("index", photos, "--index-dir", out, "--model", tiny_model, "-q")
    code, _, err = hf.cli(capsys, *folder)
    hf.assert_one_line_error(code, err, expect="--force")
    assert hf.tree_digest(out) == before
    code, _, err = hf.cli(capsys, *folder, "--force")
    assert code == 0, err
    replaced = IndexStore.open(out)
    assert replaced.manifest.source.type == "folder" and replaced.images() is None  # no CIFAR tiles left
