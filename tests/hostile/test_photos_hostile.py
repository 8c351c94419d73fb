"""Hostile photo inputs: EXIF that lies or injects, HEIC/AVIF that are not, and requests for the original file.

Each case indexes a folder of one good photo plus the hostile file: the run succeeds, the hostile file is skipped
and counted (or its bad metadata dropped), nothing outside the folder is read, and nothing is echoed raw to a
terminal. New case = one line in the tables below.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

import photo_fixture
from cliplens.cli import main
from cliplens.folder_index import FolderIndexOptions, index_folder
from cliplens.store import IndexStore

SECRET = "TOP-SECRET-PHOTO-1b2c"


def _jpeg_with_exif(path: Path, exif: Image.Exif) -> None:
    photo_fixture.picture(7).save(path, format="JPEG", exif=exif.tobytes())


def _exif(**tags) -> Image.Exif:
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    for key, value in tags.items():
        if key == "taken":
            ifd[0x9003] = value
        elif key == "gps":
            exif.get_ifd(0x8825).update(value)
        else:
            exif[{"make": 0x010F, "model": 0x0110, "orientation": 0x0112}[key]] = value
    return exif


# name: (exif tags, what the item's metadata must be)
EXIF_CASES = {
    "date of zeros": ({"taken": "0000:00:00 00:00:00"}, {"taken_from": "mtime"}),
    "date that is not a date": ({"taken": "yesterday at noon"}, {"taken_from": "mtime"}),
    "date out of range": ({"taken": "2023:13:45 99:99:99"}, {"taken_from": "mtime"}),
    "camera with terminal escapes": ({"make": "Evil\x1b[2J", "model": "Cam\x07 9"}, {"camera": "Evil[2J Cam 9"}),
    "GPS garbage": ({"gps": {1: "N", 2: (1000, 0, 0), 3: "E", 4: (5, 0, 0)}}, {"lat": None, "lon": None}),
    "GPS without longitude": ({"gps": {1: "N", 2: (45, 0, 0)}}, {"lat": None, "lon": None}),
    "orientation out of range": ({"orientation": 99}, {"width": 64, "height": 48}),
}


@pytest.mark.parametrize("name", list(EXIF_CASES))
def test_lying_exif_is_dropped_not_trusted(name, tmp_path, tiny_encoder):
    tags, want = EXIF_CASES[name]
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg_with_exif(root / "a.jpg", _exif(**tags))
    index_folder(root, tiny_encoder, tmp_path / "idx", options=FolderIndexOptions(progress=False))
    item = IndexStore.open(tmp_path / "idx").item(0)
    for key, value in want.items():
        assert item[key] == value, (name, key, item[key])
    assert item["taken"] and len(item["taken"]) == 19  # always a date: EXIF's, else the file's


def _fake(ext: str):
    return lambda root: (root / f"fake{ext}").write_bytes(b"\x00\x00\x00\x18ftypheic" + os.urandom(64))


def _secret_link(ext: str):
    def build(root: Path) -> None:
        target = root.parent / f"secret{ext}"
        photo_fixture.picture(9).save(target, format="PNG")
        os.symlink(target, root / f"link{ext}")
    return build


FILE_CASES = {  # name: (builder(root), the summary line's skip kinds)
    "HEIC that is noise": (_fake(".heic"), "1 unreadable"),
    "AVIF that is noise": (_fake(".avif"), "1 unreadable"),
    "HEIC named .jpg": (lambda root: Image.new("RGB", (9, 9)).save(root / "x.jpg", format="AVIF"), None),
    "RAW file": (lambda root: (root / "IMG.NEF").write_bytes(b"MM\x00*" + b"\x00" * 32), "1 unsupported .nef"),
    "photoshop file": (lambda root: (root / "art.psd").write_bytes(b"8BPS" + b"\x00" * 32), "1 unsupported .psd"),
    "link to a photo outside": (_secret_link(".heic"), "1 unusable link"),
}


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_hostile_photo_files_are_skipped_and_counted(name, tmp_path, tiny_model, capsys):
    build, said = FILE_CASES[name]
    root = tmp_path / "photos"
    root.mkdir()
    photo_fixture.picture(1).save(root / "good.jpg")
    build(root)
    code = main(["index", str(root), "--index-dir", str(tmp_path / "idx"), "--model", tiny_model, "--device", "cpu",
                 "-q"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    if said is None:  # decodable whatever its name: indexed
        assert "0 skipped" in out
    else:
        assert f"1 skipped: {said} (" in out, out
    thumbs = (IndexStore.open(tmp_path / "idx").files / "thumbs.bin").read_bytes()
    secret = tmp_path / "secret.heic"
    if secret.exists():  # the linked file's pixels never became a thumbnail
        assert len(IndexStore.open(tmp_path / "idx")) == 1 and secret.read_bytes()[:64] not in thumbs


@pytest.fixture
def served(tmp_path, tiny_encoder):
    from fastapi.testclient import TestClient

    from cliplens.search import Searcher
    from cliplens.web import create_app

    root = tmp_path / "photos"
    root.mkdir()
    photo_fixture.picture(1).save(root / "a.jpg")
    photo_fixture.picture(2).save(root / "b.jpg")
    index_folder(root, tiny_encoder, tmp_path / "idx", options=FolderIndexOptions(progress=False))
    (tmp_path / "secret.txt").write_text(SECRET)
    app = create_app({"p": Searcher(encoder=tiny_encoder, store=IndexStore.open(tmp_path / "idx"))})
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, root, tmp_path


def test_the_original_is_never_a_file_outside_the_folder(served):
    client, root, tmp = served
    os.replace(root / "a.jpg", tmp / "moved.jpg")
    os.symlink(tmp / "secret.txt", root / "a.jpg")  # swapped for a link out after indexing
    r = client.get("/api/items/0/original")
    assert r.status_code == 404 and SECRET not in r.text and str(tmp) not in r.text
    os.unlink(root / "a.jpg")
    os.mkfifo(root / "a.jpg")  # swapped for a FIFO: refused at once, never blocks
    assert client.get("/api/items/0/original").status_code == 404
    for url in ("/api/items/..%2F..%2Fsecret.txt/original", "/api/items/-1/original", "/api/items/2/original",
                "/api/items/1/original?index=../../etc"):
        r = client.get(url)
        assert r.status_code in (404, 422) and SECRET not in r.text
    assert client.get("/api/items/1/original").content == (root / "b.jpg").read_bytes()


@pytest.mark.parametrize("spec,said", [
    ("taken>=June", "bad date"), ("taken>=2023-02-30", "no such day"), ("camera>=x", "only taken compares"),
    ("taken~2023", "bad filter"), ("taken=", "empty value"),
])
def test_bad_photo_filters_are_one_line(spec, said, tmp_path, tiny_model, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    photo_fixture.picture(1).save(root / "a.jpg")
    assert main(["index", str(root), "--index-dir", str(tmp_path / "i"), "--model", tiny_model, "--device", "cpu",
                 "-q"]) == 0
    capsys.readouterr()
    code = main(["search", "x", "--index-dir", str(tmp_path / "i"), "-k", "1", "--where", spec])
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and "\n" not in err and "Traceback" not in err


def test_a_truncated_thumbnail_file_is_named_not_served(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    root.mkdir()
    photo_fixture.picture(1).save(root / "a.jpg")
    index_folder(root, tiny_encoder, tmp_path / "idx", options=FolderIndexOptions(progress=False))
    thumbs = IndexStore.open(tmp_path / "idx").files / "thumbs.bin"
    thumbs.write_bytes(thumbs.read_bytes()[:10])
    from cliplens.errors import StoreError

    with pytest.raises(StoreError, match="thumbs.bin is 10 bytes, shorter than its items say"):
        IndexStore.open(tmp_path / "idx")
