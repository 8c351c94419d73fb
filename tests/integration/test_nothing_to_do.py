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
    assert first.strip() == f"{photos}: {good} added, 0 updated, 0 removed, 0 reused, {bad} skipped: 2 unreadable, 1 too large (0 unchanged; {good} images in {idx})"
    import cliplens.cli.common as common

    real = common.load_model
    calls = []
    monkeypatch.setattr(common, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
    assert calls == []  # decided without the model, and it says what the full path says for an unchanged folder
    assert again.strip() == f"{photos}: 0 added, 0 updated, 0 removed, 0 reused, {bad} skipped: 2 unreadable, 1 too large ({good} unchanged; {good} images in {idx})"
    import cliplens.uptodate as uptodate

    fast_path = []  # what the no-op check answered on each run: True when it found nothing to do
    real_check = uptodate.folder_unchanged
    monkeypatch.setattr(uptodate, "folder_unchanged",
                        lambda *a, **k: (lambda r: fast_path.append(r is not None) or r)(real_check(*a, **k)))
    changes = [  # (change, whether a model must load to embed something)
        (lambda: os.utime(photos / "a.png", ns=(1, 1)), False),  # touched: same content (sha256), new mtime
        (lambda: shutil.copy(photos / "e.bmp", photos / "e2.bmp"), False),  # a copy: its vector is reused
        (lambda: (photos / "a.txt").write_text("another caption"), False),  # a caption changed, not the image
        (lambda: _new_image(folder / "a.png", photos / "new.png"), True),  # new pixels: embedded
    ]
    for change, loads in changes:
        change()
        fast_path.clear()
        _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
        assert fast_path == [False], "a change must take the full path"
        assert bool(calls) == loads  # the model loads only when something must be embedded (cliplens.indexing.lazy)
        calls.clear()
        again = _index(capsys, photos, "--index-dir", idx, "--model", tiny_model)
        assert calls == [] and fast_path == [False, True] and "0 added, 0 updated" in again  # unchanged again
    fast_path.clear()
    _index(capsys, photos, "--index-dir", idx, "--model", tiny_model, "--exclude", "sub/*")
    assert fast_path == [False]  # other flags: the full path (which removes what is now excluded, no model needed)


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


def _new_image(src, dst):
    """A copy of ``src`` with one pixel changed: new content (and so a new sha256)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    im.putpixel((0, 0), (255 - im.getpixel((0, 0))[0], 7, 7))
    im.save(dst)
