"""Hostile caption sidecars (.txt / .json): links out of the folder, giants, deep JSON, binary, FIFOs.

Each case indexes a folder of one image plus the sidecar: the run succeeds, the caption and metadata are dropped
(or kept, for the allowed controls), and no byte of the secret file outside the folder appears anywhere in the
index. New case = one line in CASES.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hostile_fixture as hf
from cliplens.folder_index import FolderIndexOptions, index_folder
from cliplens.store import IndexStore

SECRET = "TOP-SECRET-6f1d2c"


def _secret(root: Path, suffix: str) -> Path:
    target = root.parent / f"secret{suffix}"
    target.write_text(SECRET if suffix == ".txt" else '{"caption": "%s"}' % SECRET)
    return target


def _link_out(suffix: str):
    return lambda root: os.symlink(_secret(root, suffix), root / f"a{suffix}")


def _link_inside(root: Path) -> None:
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("a red bicycle")
    os.symlink("notes/a.txt", root / "a.txt")


CASES = {  # name: (builder(root), expected caption, expected metadata present)
    ".txt link out of the folder": (_link_out(".txt"), None, False),
    ".json link out of the folder": (_link_out(".json"), None, False),
    "photo.png.txt link out": (lambda r: os.symlink(_secret(r, ".txt"), r / "a.png.txt"), None, False),
    ".txt hard link to a file outside": (lambda r: os.link(_secret(r, ".txt"), r / "a.txt"), None, False),
    ".json hard link to a file outside": (lambda r: os.link(_secret(r, ".json"), r / "a.json"), None, False),
    "oversized .txt": (lambda r: (r / "a.txt").write_text("x" * ((1 << 20) + 1)), None, False),
    "JSON nested 100 000 deep": (lambda r: (r / "a.json").write_text("[" * 100_000 + "]" * 100_000), None, False),
    "JSON nested 40 deep": (lambda r: (r / "a.json").write_text('{"caption": "ok", "x": ' + "[" * 40 + "]" * 40 + "}"),
                            None, False),
    "binary .txt": (lambda r: (r / "a.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), None, False),
    "ANSI escapes in .txt": (lambda r: (r / "a.txt").write_text("\x1b[2J\x1b]0;owned\x07"), None, False),
    "not UTF-8 .txt": (lambda r: (r / "a.txt").write_bytes("caf\xe9".encode("latin-1")), None, False),
    "FIFO .txt": (lambda r: os.mkfifo(r / "a.txt"), None, False),
    "folder named a.txt": (lambda r: (r / "a.txt").mkdir(), None, False),
    "control chars in JSON caption": (lambda r: (r / "a.json").write_text('{"caption": "\\u001b[31mred"}'), None, True),
    # controls: what must keep working
    "link inside the folder": (_link_inside, "a red bicycle", False),
    "plain JSON": (lambda r: (r / "a.json").write_text('{"title": "a red bicycle", "tags": [["x"]]}'),
                   "a red bicycle", True),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_sidecar_never_leaks_and_never_fails_the_run(case, tmp_path, tiny_encoder):
    build, caption, has_meta = CASES[case]
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "a.png")
    build(root)
    before = hf.tree_digest(root)
    summary = index_folder(root, tiny_encoder, tmp_path / "index", options=FolderIndexOptions(progress=False))
    assert (summary.added, summary.skipped) == (1, 0)
    store = IndexStore.open(tmp_path / "index")
    assert store.items["caption"][0] == caption
    assert (store.items["meta"][0] is not None) == has_meta
    for path in (tmp_path / "index").rglob("*"):  # not in the items, the manifest, or anywhere else
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    assert hf.tree_digest(root) == before
