"""Hostile image folders: link loops, names that are not UTF-8, links out, FIFOs, files that change under us,
and very large images (bounded memory for indexing, thumbnails and the item image route).

Each folder case runs ``cliplens index FOLDER`` twice: both runs exit 0, the bad entry is skipped and counted (and
named in the manifest), the good images are indexed, and nothing outside the index folder changes.
New case = one line in CASES or CHANGES.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hostile_fixture as hf
from cliplens import folder_index
from cliplens.folder_index import FolderIndexOptions, index_folder
from cliplens.store import IndexStore


def _good(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / name)


def _outside_png(root: Path) -> Path:
    target = root.parent / "outside.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(target)
    return target


CASES = {  # name: (builder(root), how many entries it adds that must be skipped)
    "self link loop": (lambda r: os.symlink("loop.jpg", r / "loop.jpg"), 1),
    "two-link loop": (lambda r: (os.symlink("y.png", r / "x.png"), os.symlink("x.png", r / "y.png")), 2),
    "dangling link": (lambda r: os.symlink("gone.png", r / "dangling.png"), 1),
    "link out of the folder": (lambda r: os.symlink(_outside_png(r), r / "out.png"), 1),
    "name not UTF-8": (lambda r: Path(os.fsdecode(bytes(r) + b"/caf\xe9.png")).write_bytes((r / "a.png").read_bytes()
                                                                                       + b"x"), 1),
    "FIFO named like an image": (lambda r: os.mkfifo(r / "pipe.jpg"), 1),
    "empty file": (lambda r: (r / "empty.png").write_bytes(b""), 1),
}


def _index(capsys, root: Path, out: Path, tiny_model: str) -> tuple[int, str, str]:
    return hf.cli(capsys, "index", root, "--index-dir", out, "--model", tiny_model, "-q", "--batch-size", "4")


@pytest.mark.parametrize("case", CASES)
def test_unusable_entries_are_skipped_and_counted_on_every_run(case, tmp_path, capsys, tiny_model):
    build, bad = CASES[case]
    root = tmp_path / "photos"
    root.mkdir()
    _good(root)
    build(root)
    before = hf.tree_digest(tmp_path / "photos")
    out = tmp_path / "index"
    for run in (1, 2):  # the second run sees the recorded skips: still no traceback
        code, stdout, err = _index(capsys, root, out, tiny_model)
        assert code == 0 and "Traceback" not in err, err
        assert f"{bad} skipped" in stdout, stdout
    store = IndexStore.open(out)
    assert sorted(map(str, store.items["path"])) == ["a.png", "b.png"]
    skipped = store.manifest.folder["skipped"]
    assert len(skipped) == bad and all(s["reason"] for s in skipped)
    json.dumps(store.manifest.to_json(), ensure_ascii=True)  # every recorded name is valid Unicode
    assert hf.tree_digest(tmp_path / "photos") == before


def _swap_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _swap_link_out(path: Path) -> None:
    path.unlink()
    os.symlink(_outside_png(path.parent), path)


CHANGES = {  # name: what happens to b.png after it was listed and hashed, before it is decoded
    "deleted": lambda p: p.unlink(),
    "replaced by a FIFO": _swap_fifo,  # opening it would block for ever
    "replaced by a link out of the folder": _swap_link_out,
    "replaced by garbage": lambda p: p.write_bytes(b"\x89PNG garbage"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:60]),
}


@pytest.mark.parametrize("case", CHANGES)
def test_files_changing_between_listing_and_reading_are_skipped(case, tmp_path, tiny_encoder, monkeypatch):
    root = tmp_path / "photos"
    root.mkdir()
    _good(root)
    real_probe = folder_index.probe_image

    def probe_then_change(path, **kw):  # runs after the hash, before the decode
        size = real_probe(path, **kw)
        if Path(path).name == "b.png":
            CHANGES[case](Path(path))
        return size

    monkeypatch.setattr(folder_index, "probe_image", probe_then_change)
    summary = index_folder(root, tiny_encoder, tmp_path / "index", options=FolderIndexOptions(progress=False))
    assert (summary.added, summary.skipped) == (1, 1)
    assert [p for p, _ in summary.skipped_files] == ["b.png"]
    monkeypatch.undo()
    again = index_folder(root, tiny_encoder, tmp_path / "index", options=FolderIndexOptions(progress=False))
    assert again.total == 1  # a later run: no traceback either


# --------------------------------------------------------------------------- bounded memory

BIG = 9000  # 9000 x 9000 = 81 MP, under the default 100 MP limit; 243 MB as decoded RGB
FULL_MB = BIG * BIG * 3 / 2**20


def _big_jpegs(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    ramp = Image.linear_gradient("L").resize((BIG, BIG))
    for i in range(n):  # different content each, so none is reused as a copy of another
        Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", ramp.size, 40 * i))
                    ).save(root / f"big{i}.jpg", quality=80)


# Peak resident memory of one step alone: Linux resets the high-water mark (VmHWM) when 5 is written to
# /proc/self/clear_refs, so imports and model loading before the step do not hide what the step costs.
MEASURE = """
import re, sys
def hwm_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def reset():
    open("/proc/self/clear_refs", "w").write("5")
"""

PEAK = MEASURE + """
from pathlib import Path
from cliplens.encoder import load_encoder
from cliplens.folder_index import FolderIndexOptions, index_folder
encoder = load_encoder(sys.argv[3], device="cpu")
index_folder(sys.argv[4], encoder, Path(sys.argv[2]).parent / "warm", options=FolderIndexOptions(progress=False))
reset(); before = rss_mb()
summary = index_folder(sys.argv[1], encoder, sys.argv[2], options=FolderIndexOptions(batch_size=8, workers=1,
                                                                               progress=False))
assert summary.added == 3, summary
print("grew_mb", hwm_mb() - before)
"""


def _grown_mb(folder: Path, out: Path, model: str, warm: Path) -> float:
    code = f"import sys; sys.argv = ['x', {str(folder)!r}, {str(out)!r}, {model!r}, {str(warm)!r}]\n" + PEAK
    proc = hf.run_python(code, env={"OMP_NUM_THREADS": "1"})
    return float(proc.stdout.split("grew_mb")[-1])


@pytest.mark.slow
def test_indexing_large_images_holds_one_full_size_image_per_thread(tmp_path, tiny_model):
    """Three 9000 x 9000 JPEGs in one batch of 8, one decoding thread: the peak grows by about one decoded image
    (232 MiB), not three.

    Bound: decoding threads x one full-size image, whatever the batch size (a batch is decoded as chunks, one
    image at a time in each); a batch holds 224 x 224 pixels per image. The model is loaded and a small folder
    indexed first, so only the large images are measured.
    """
    small = tmp_path / "small"
    small.mkdir()
    _good(small)
    _big_jpegs(tmp_path / "big", 3)
    grown = _grown_mb(tmp_path / "big", tmp_path / "index", tiny_model, small)
    print(f"indexing 3 x {BIG}x{BIG} JPEGs in one batch: peak +{grown:.0f} MiB; one decoded image is {FULL_MB:.0f} MiB")
    assert 0.8 * FULL_MB < grown < 1.6 * FULL_MB  # decoded whole (exact), one at a time; 3 at once: >= 696 MiB


THUMB = MEASURE + """
from pathlib import Path
from types import SimpleNamespace
from cliplens.manifest import SourceInfo
from cliplens.web.images import item_image
class Store:  # what item_image reads of a folder index
    root = Path(sys.argv[1])
    manifest = SimpleNamespace(source=SourceInfo(name="folder", type="folder", root=sys.argv[1],
                                                 options={"max_megapixels": 100}))
    items = {"path": ["big0.jpg"]}
    def images(self):
        return None
from io import BytesIO
from PIL import Image
reset(); before = rss_mb()
data, kind = item_image(Store(), 0, int(sys.argv[2]))
grew = hwm_mb() - before
print("size", max(Image.open(BytesIO(data)).size), "grew_mb", grew)
"""


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 1024])
def test_thumbnails_of_large_jpegs_never_decode_full_size(tmp_path, size):
    _big_jpegs(tmp_path / "big", 1)
    code = f"import sys; sys.argv = ['x', {str(tmp_path / 'big')!r}, '{size}']\n" + THUMB
    out = hf.run_python(code).stdout.split()
    assert int(out[out.index("size") + 1]) == size
    grew = float(out[out.index("grew_mb") + 1])
    print(f"thumbnail {size} of a {BIG}x{BIG} JPEG: peak +{grew:.0f} MiB; the full image is {FULL_MB:.0f} MiB")
    assert grew < FULL_MB / 4  # decoded at 1/8 (256) or 1/4 (1024) scale, never whole
