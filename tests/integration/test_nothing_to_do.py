"""Re-running ``cliplens index`` on unchanged data decides "nothing to do" before any model loads; any change
(a touched or new file, a caption, other flags) takes the full path, which embeds only what changed."""

from __future__ import annotations

import os
import shutil

import pytest

import folder_fixture
from cliplens.cli import main


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails loudly: a run that passes never loaded one."""
    import cliplens.cli.common as common

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "load_model", refuse)


def _index(capsys, *argv):
    code = main([str(a) for a in ("index", *argv, "-q")])
    out, _ = capsys.readouterr()
    assert code == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return folder_fixture.make_folder(tmp_path_factory.mktemp("photos") / "photos")


def test_unchanged_folder_needs_no_model_and_changes_do(folder, tiny_model, tmp_path, capsys, monkeypatch):
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    idx = tmp_path / "idx"
    first = _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
    good, bad = len(folder_fixture.GOOD), len(folder_fixture.BAD)
    assert first.strip() == f"{photos}: {good} added, 0 updated, 0 removed, 0 reused, {bad} skipped (0 unchanged; {good} images in {idx})"
    import cliplens.cli.common as common

    real = common.load_model
    calls = []
    monkeypatch.setattr(common, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
    assert calls == []  # decided without the model, and it says what the full path says for an unchanged folder
    assert again.strip() == f"{photos}: 0 added, 0 updated, 0 removed, 0 reused, {bad} skipped ({good} unchanged; {good} images in {idx})"
    changes = [
        lambda: os.utime(photos / "a.png", ns=(1, 1)),  # touched: same content, new mtime
        lambda: shutil.copy(photos / "e.bmp", photos / "e2.bmp"),  # a new file
        lambda: (photos / "a.txt").write_text("another caption"),  # a caption changed, not the image
    ]
    for change in changes:
        change()
        _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
        assert calls, "a change must take the full path"
        calls.clear()
        _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
        assert calls == []  # and then it is unchanged again
    _index(capsys, photos, "--index-dir", idx, "--model", tiny_model, "--exclude", "sub/*")
    assert calls  # other flags: the full path


def test_unchanged_cifar_split_needs_no_model(cifar_root, tiny_model, tmp_path, capsys, monkeypatch):
    idx = tmp_path / "idx"
    argv = ("cifar100", "--data-dir", cifar_root, "--no-verify", "--index-dir", idx, "--model", tiny_model)
    _index(capsys, *argv, "--batch-size", 16)
    import cliplens.cli.common as common

    real = common.load_model
    calls = []
    monkeypatch.setattr(common, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    for extra in ((), ("--batch-size", 16)):
        out = _index(capsys, *argv, *extra)
        assert "already complete (200 images), nothing to do" in out and calls == []
    for extra in (("--batch-size", 8), ("--limit", 100), ("--dtype", "float16")):
        _index(capsys, *argv, *extra, "--rebuild")  # other settings replace a complete index only when asked
        assert calls, extra
        calls.clear()
