"""Photo libraries: formats, metadata, thumbnails, filters and sorting, paging, duplicates, the original file.

The fixture folder (tests/photo_fixture.py) is written here: JPEGs with EXIF dates, cameras and GPS, a phone photo
stored rotated, a HEIC and an AVIF, a PNG without EXIF, an unsupported RAW file and an unreadable JPEG.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import photo_fixture
import pytest
from PIL import Image

from cliplens.cli import main
from cliplens.store import IndexStore


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_fixture.make_photos(tmp_path_factory.mktemp("lib") / "photos")


@pytest.fixture(scope="module")
def photo_index(photos, tiny_model, tmp_path_factory) -> Path:
    idx = tmp_path_factory.mktemp("pidx") / "idx"
    assert main(["index", str(photos), "--index-dir", str(idx), "--model", tiny_model, "--device", "cpu", "-q"]) == 0
    return idx


def by_path(store) -> dict[str, int]:
    return {str(p): i for i, p in enumerate(store.items["path"])}


# --------------------------------------------------------------------------- formats and the summary line


def test_heic_and_avif_are_indexed_and_skips_are_counted_by_kind(photos, tiny_model, tmp_path, capsys):
    code, out, _ = run(capsys, "index", photos, "--index-dir", tmp_path / "i", "--model", tiny_model, "--device",
                       "cpu", "-q")
    assert code == 0
    good = len(photo_fixture.PHOTOS)
    assert out.strip() == (f"{photos}: {good} added, 0 updated, 0 removed, 0 reused, 2 skipped: 1 unreadable, "
                           f"1 unsupported .cr2 (0 unchanged; {good} images in {tmp_path / 'i'})")
    store = IndexStore.open(tmp_path / "i")
    assert {"phone.heic", "web.avif"} <= set(by_path(store))
    skipped = {s["path"]: s["reason"] for s in store.manifest.folder["skipped"]}
    assert skipped["raw/IMG_0001.CR2"] == "unsupported .cr2" and "broken.jpg" in skipped
    code, again, _ = run(capsys, "index", photos, "--index-dir", tmp_path / "i", "--model", tiny_model, "--device",
                         "cpu", "-q")
    assert code == 0 and "2 skipped: 1 unreadable, 1 unsupported .cr2" in again and f"({good} unchanged" in again


# --------------------------------------------------------------------------- metadata


def test_exif_date_camera_gps_and_size_are_columns(photo_index):
    store = IndexStore.open(photo_index)
    rows = by_path(store)
    for rel, (taken, make, model, gps, orientation) in photo_fixture.PHOTOS.items():
        item = store.item(rows[rel])
        if taken:
            assert item["taken"] == taken.replace(":", "-", 2).replace(" ", "T") and item["taken_from"] == "exif"
        else:  # no EXIF: the file's mtime, and it says so
            want = __import__("datetime").datetime.fromtimestamp(photo_fixture.MTIME).isoformat(timespec="seconds")
            assert item["taken"] == want and item["taken_from"] == "mtime"
        if make:
            assert item["camera"] in (f"{make} {model}", model) and model in item["camera"]
        else:
            assert item["camera"] is None
        if gps:
            assert item["lat"] == pytest.approx(gps[0], abs=1e-4) and item["lon"] == pytest.approx(gps[1], abs=1e-4)
        else:
            assert item["lat"] is None and item["lon"] is None
        shown = (48, 64) if orientation == 6 else (64, 48)  # EXIF orientation 6: shown a quarter turn
        assert (item["width"], item["height"]) == shown
    assert store.item(rows["2023/dog.jpg"])["camera"] == "Canon EOS R6"  # not "Canon Canon EOS R6"


# --------------------------------------------------------------------------- thumbnails


def test_thumbnails_are_webp_and_jpeg_at_two_sizes_with_the_aspect_kept(tmp_path, tiny_model, tiny_encoder, capsys):
    import cliplens.sources.photos as photos_mod

    lib = tmp_path / "big"
    lib.mkdir()
    photo_fixture.picture(1, 1200, 800).save(lib / "wide.jpg", quality=90)
    photo_fixture.picture(2, 600, 900).save(lib / "tall.png")
    photo_fixture.picture(3, 100, 80).save(lib / "small.png")
    assert main(["index", str(lib), "--index-dir", str(tmp_path / "i"), "--model", tiny_model, "--device", "cpu",
                 "-q"]) == 0
    store = IndexStore.open(tmp_path / "i")
    rows = by_path(store)
    sizes = {}
    for rel, (w, h) in (("wide.jpg", (1200, 800)), ("tall.png", (600, 900)), ("small.png", (100, 80))):
        for size in (256, 512):
            data = store.thumbnail(rows[rel], size)
            with Image.open(io.BytesIO(data)) as im:
                # 256 px WebP, 512 px JPEG; an image no larger than 256 px has one WebP for both
                assert im.format == ("JPEG" if size == 512 and max(w, h) > 256 else "WEBP"), (rel, size)
                assert photos_mod.media_type(data) == f"image/{im.format.lower()}"
                scale = min(1.0, size / max(w, h))  # long side `size`, never enlarged, aspect kept (to a pixel)
                assert max(im.size) == round(max(w, h) * scale), (rel, size, im.size)
                assert abs(min(im.size) - min(w, h) * scale) <= 1 and (im.width > im.height) == (w > h)
            sizes[rel, size] = len(data)
    assert int(store.items["thumb_512"][rows["small.png"]]) == 0  # never enlarged: one thumbnail serves both
    from fastapi.testclient import TestClient

    from cliplens.search import Searcher
    from cliplens.web import create_app

    with TestClient(create_app({"p": Searcher(encoder=tiny_encoder, store=store)}), base_url="http://127.0.0.1") as c:
        for rel, size, served in (("wide.jpg", 512, "jpeg"), ("wide.jpg", 256, "webp"), ("small.png", 512, "webp")):
            r = c.get(f"/api/items/{rows[rel]}/image", params={"size": size})
            assert r.status_code == 200 and r.headers["content-type"] == f"image/{served}", (rel, size)
            assert r.content == store.thumbnail(rows[rel], size)  # the stored bytes, not a decode of the photo
    before = (store.files / "thumbs.bin").read_bytes()
    real = photos_mod.describe_file
    try:  # a re-run that changes nothing decodes nothing; a touched file's thumbnail comes from the index
        photos_mod.describe_file = lambda *a, **k: pytest.fail("an unchanged photo was decoded again")
        os.utime(lib / "wide.jpg", ns=(1, 1))
        assert main(["index", str(lib), "--index-dir", str(tmp_path / "i"), "--model", tiny_model, "--device", "cpu",
                     "-q"]) == 0
    finally:
        photos_mod.describe_file = real
    again = IndexStore.open(tmp_path / "i")
    assert (again.files / "thumbs.bin").read_bytes() == before


def test_an_index_written_before_thumbnails_gets_them_without_re_embedding(photos, tiny_model, tmp_path, capsys):
    """An index from before this version (no photo columns): the next run adds them, embedding nothing."""
    from cliplens.store import read_items, write_items
    import cliplens.cli.common as common

    idx = tmp_path / "old"
    assert main(["index", str(photos), "--index-dir", str(idx), "--model", tiny_model, "--device", "cpu", "-q"]) == 0
    files = IndexStore.open(idx).files
    items = {k: v for k, v in read_items(files / "items.parquet").items()
             if k not in ("taken", "taken_from", "camera", "lat", "lon", "width", "height", "thumb_offset",
                          "thumb_256", "thumb_512")}
    write_items(files / "items.parquet", {k: list(v) if v.dtype == object else v for k, v in items.items()})
    (files / "thumbs.bin").unlink()
    manifest = json.loads((files / "manifest.json").read_text())
    manifest["identity"].pop("photos")
    manifest["files"] = {"items.parquet": {"sha256": __import__("hashlib").sha256(
        (files / "items.parquet").read_bytes()).hexdigest()}}
    (files / "manifest.json").write_text(json.dumps(manifest))
    assert not IndexStore.open(idx).has_thumbnails
    capsys.readouterr()
    loads = []
    real = common.load_model
    common.load_model = lambda *a, **k: loads.append(1) or real(*a, **k)
    try:
        code, out, _ = run(capsys, "index", photos, "--index-dir", idx, "--model", tiny_model, "--device", "cpu",
                           "-q")
    finally:
        common.load_model = real
    assert code == 0 and "0 added, 0 updated" in out and loads == []
    assert IndexStore.open(idx).has_thumbnails


def test_grid_works_for_a_folder_index(photo_index, tmp_path, capsys):
    code, out, _ = run(capsys, "search", "a dog", "--index-dir", photo_index, "-k", 4, "--grid", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").is_file()
    with Image.open(tmp_path / "g.png") as im:
        assert im.width > 4 * 128


# --------------------------------------------------------------------------- filters, sorting, paging, paths


def _ids(out: str) -> list[int]:
    return [int(line.split()[2]) for line in out.splitlines() if line[:4].strip().isdigit()]


def test_where_taken_and_camera_filter_and_sort_by_date(photo_index, capsys):
    store = IndexStore.open(photo_index)
    taken, camera = store.items["taken"], store.items["camera"]
    code, out, _ = run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 20, "--where",
                       "taken>=2023-06-01", "--where", "taken<2023-09", "--json")
    got = {h["id"] for h in json.loads(out)["hits"]}
    assert code == 0 and got == {i for i, t in enumerate(taken) if "2023-06-01" <= t < "2023-09-01"} and len(got) == 3
    code, out, _ = run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 20, "--where",
                       "camera=*iphone*", "--json")
    assert {h["id"] for h in json.loads(out)["hits"]} == {i for i, c in enumerate(camera) if c and "iPhone" in c}
    code, out, _ = run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 20, "--where", "taken=2023",
                       "--json")
    assert {h["id"] for h in json.loads(out)["hits"]} == {i for i, t in enumerate(taken) if t.startswith("2023")}
    code, out, _ = run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 5, "--sort", "newest")
    ids = _ids(out)
    by_score = json.loads(run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 5, "--json")[1])["hits"]
    assert set(ids) == {h["id"] for h in by_score}  # the same hits (the score cut), ordered by date
    assert [taken[i] for i in ids] == sorted((taken[i] for i in ids), reverse=True) and "taken" in out


def test_offset_pages_through_the_ranking(photo_index, capsys):
    whole = json.loads(run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 7, "--json")[1])["hits"]
    first = json.loads(run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 3, "--json")[1])
    second = json.loads(run(capsys, "search", "photo", "--index-dir", photo_index, "-k", 3, "--offset", 3,
                            "--json")[1])
    assert [h["id"] for h in first["hits"] + second["hits"]] == [h["id"] for h in whole[:6]]
    assert [h["rank"] for h in second["hits"]] == [4, 5, 6] and first["more"] and second["offset"] == 3


def test_paths_prints_absolute_paths_only(photo_index, photos, capsys):
    code, out, err = run(capsys, "search", "a beach", "--index-dir", photo_index, "-k", 3, "--paths")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and all(Path(p).is_absolute() and Path(p).is_file() for p in lines)
    assert all(Path(p).resolve().is_relative_to(photos.resolve()) for p in lines)
    code, out, _ = run(capsys, "search", "a beach", "--index-dir", photo_index, "-k", 3, "--absolute")
    assert code == 0 and str(photos) in out and "path" in out.splitlines()[1]


def test_paths_sort_and_taken_filters_on_a_cifar_index_say_what_to_do(tiny_index, capsys):
    for argv, said in ((["--paths"], "are not files"), (["--sort", "taken"], "no photo dates to sort by"),
                       (["--where", "taken>=2023"], "no photo dates to filter by"),
                       (["--where", "camera=x"], "no camera names")):
        code, out, err = run(capsys, "search", "apple", "--index-dir", tiny_index, *argv)
        assert code == 2 and said in err and "\n" not in err.strip() and "Traceback" not in err


# --------------------------------------------------------------------------- duplicates


class PixelEncoder:
    """Stands in for CLIP where the answer must be known: an image's vector is its 8 x 8 colour layout, so a
    re-encoded copy lands next to its original and different pictures do not (random CLIP weights cannot tell)."""

    def __init__(self, info):
        self.info = info

    def encode_images(self, images):
        d = self.info.embed_dim  # the layout in as many cells as the index has dimensions (grey levels)
        w = next(w for w in range(int(d ** 0.5), 0, -1) if d % w == 0)
        out = []
        for im in images:
            a = np.asarray(im.convert("L").resize((d // w, w), Image.Resampling.BOX), np.float32).ravel()
            a = a - a.mean()
            out.append(a / np.linalg.norm(a))
        return np.stack(out)


def test_duplicates_are_found_on_reencoded_copies_and_not_on_distinct_photos(tmp_path, tiny_model, capsys,
                                                                             monkeypatch):
    from cliplens import duplicates
    from cliplens.folder_index import FolderIndexOptions, index_folder

    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(40):
        photo_fixture.picture(100 + i, 160, 120).save(lib / f"p{i:02d}.jpg", quality=92)
    photo_fixture.reencoded(lib / "p03.jpg", lib / "p03-whatsapp.jpg")
    photo_fixture.reencoded(lib / "p07.jpg", lib / "p07-small.jpg", scale=0.5, quality=60)
    shutil.copy(lib / "p07.jpg", lib / "p07-copy.jpg")
    from cliplens.encoder import load_encoder

    tiny = load_encoder(tiny_model, device="cpu")
    enc = PixelEncoder(tiny.info)
    # the index's vectors: the pixel layout too, so that search, collapse and groups see the same geometry
    import cliplens.folder_index as fi

    def pixel_pending(root, rels, shas, encoder, folder, options, embed_fn=None, thumbs=None):
        return enc.encode_images([Image.open(root / r) for r in rels]).astype(np.float32), {}

    monkeypatch.setattr(fi, "_embed_pending", pixel_pending)
    index_folder(lib, tiny, tmp_path / "i", options=FolderIndexOptions(progress=False))
    store = IndexStore.open(tmp_path / "i")
    t = duplicates.measure(enc, store)
    assert t.usable and t.copies_p01 > t.threshold > t.distinct_p99
    assert t.threshold == pytest.approx(t.copies_p01 - 0.25 * (t.copies_p01 - t.distinct_p99))
    groups = duplicates.all_groups(store.embeddings, t.threshold)
    rows = by_path(store)
    named = sorted(sorted(str(store.items["path"][i]) for i in g["ids"]) for g in groups)
    assert named == [["p03-whatsapp.jpg", "p03.jpg"], ["p07-copy.jpg", "p07-small.jpg", "p07.jpg"]]
    # recorded for these weights: the CLI and search use it
    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path / "home"))
    duplicates.record(store.manifest.model, t, index=str(store.root))
    code, out, _ = run(capsys, "duplicates", "--index-dir", tmp_path / "i", "--json", "--out", tmp_path / "g")
    body = json.loads(out)
    assert code == 0 and body["count"] == 2 and body["items_in_groups"] == 5
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["group-001.png", "group-002.png"]
    code, out, _ = run(capsys, "duplicates", "--index-dir", tmp_path / "i")
    assert code == 0 and out.startswith("2 groups of near-identical images (5 of 43 items)")
    # collapsing in search: the copies become one hit with a +N, and --no-collapse shows them again
    q = ["search", "#%d" % rows["p07.jpg"], "--index-dir", tmp_path / "i", "-k", 4, "--json"]
    collapsed = json.loads(run(capsys, *q)[1])["hits"]
    flat = json.loads(run(capsys, *q, "--no-collapse")[1])["hits"]
    pair = {rows["p07-copy.jpg"], rows["p07-small.jpg"]}  # p07 itself is the query, so not a hit
    assert any({h["id"], *h.get("duplicates", [])} == pair for h in collapsed), collapsed
    assert not any(h.get("duplicates") for h in flat) and len(flat) == 4
    assert len({h["id"] for h in collapsed}) == 4  # still k results, none of them a copy of another


def test_duplicates_with_a_model_that_cannot_tell_copies_apart_refuses_to_guess(tiny_index, capsys, tmp_path,
                                                                                monkeypatch):
    """Random weights on noise images (the CIFAR fixture): copies and different images overlap, so no threshold."""
    from cliplens import duplicates

    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path / "home"))
    code, out, err = run(capsys, "duplicates", "--index-dir", tiny_index, "--device", "cpu")
    assert code == 2 and "does not tell re-encoded copies" in err and err.strip().endswith("(--threshold T)")
    recorded = duplicates.recorded(IndexStore.open(tiny_index).manifest.model)
    assert recorded is not None and not recorded.usable and recorded.copies_p01 <= recorded.distinct_p99
    code, out, _ = run(capsys, "duplicates", "--index-dir", tiny_index, "--threshold", "0.9999999", "--json")
    assert code == 0 and json.loads(out)["threshold"]["measured"] is False
    code, out, _ = run(capsys, "search", "apple", "--index-dir", tiny_index, "-k", 5, "--json")
    assert code == 0 and len(json.loads(out)["hits"]) == 5  # nothing collapsed with an unusable threshold


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api(photo_index, tiny_index, tiny_encoder):
    from fastapi.testclient import TestClient

    from cliplens.search import Searcher
    from cliplens.web import create_app

    app = create_app({"photos": Searcher(encoder=tiny_encoder, store=IndexStore.open(photo_index)),
                      "cifar": Searcher(encoder=tiny_encoder, store=IndexStore.open(tiny_index))})
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def test_api_offset_filters_sort_and_facets(api, photo_index):
    store = IndexStore.open(photo_index)
    taken = store.items["taken"]
    whole = api.get("/api/search", params={"q": "photo", "index": "photos", "k": 7}).json()
    pages = [api.get("/api/search", params={"q": "photo", "index": "photos", "k": 3, "offset": o}).json()
             for o in (0, 3, 6)]
    assert [h["id"] for p in pages for h in p["hits"]] == [h["id"] for h in whole["hits"]]
    assert [p["more"] for p in pages] == [True, True, False]
    hit = pages[0]["hits"][0]
    assert {"taken", "taken_from", "camera", "width", "height", "thumb", "thumb2x"} <= set(hit)
    assert hit["thumb2x"].endswith("index=photos") and "size=512" in hit["thumb2x"]
    for url, served in ((hit["thumb"], "webp"), (hit["thumb2x"], "jpeg" if max(hit["width"], hit["height"]) > 256
                                                                else "webp")):
        r = api.get(url)  # the stored bytes, under the media type they are in
        assert r.status_code == 200 and r.headers["content-type"] == f"image/{served}", url
        assert Image.open(io.BytesIO(r.content)).format == served.upper()
    body = api.get("/api/search", params={"q": "photo", "index": "photos", "k": 7, "sort": "-taken",
                                          "where": ["taken>=2023", "camera=*iphone*"]}).json()
    got = [h["id"] for h in body["hits"]]
    want = sorted((i for i, t in enumerate(taken) if t >= "2023" and "iPhone" in (store.items["camera"][i] or "")),
                  key=lambda i: taken[i], reverse=True)
    assert got == want and body["sort"] == "-taken"
    meta = {i["name"]: i for i in api.get("/api/indexes").json()["indexes"]}
    assert meta["photos"]["cameras"][0] == "Apple iPhone 13" and meta["photos"]["taken_range"][1].startswith("2024")
    assert meta["photos"]["has_thumbnails"] and not meta["photos"]["tiny"] and not meta["photos"]["has_superclasses"]
    assert meta["cifar"]["tiny"] and meta["cifar"]["has_superclasses"] and len(meta["cifar"]["examples"]) == 6
    bad = api.get("/api/search", params={"q": "photo", "index": "photos", "where": "taken>=June"})
    assert bad.status_code == 400 and "bad date" in bad.json()["error"]
    assert api.get("/api/search", params={"q": "x", "sort": "size"}).status_code == 422


def test_api_original_serves_only_indexed_files(api, photo_index, photos):
    store = IndexStore.open(photo_index)
    i = by_path(store)["phone.heic"]
    r = api.get(f"/api/items/{i}/original", params={"index": "photos"})
    assert r.status_code == 200 and r.content == (photos / "phone.heic").read_bytes()
    assert r.headers["content-type"] == "image/heic" and "sandbox" in r.headers["content-security-policy"]
    assert api.get("/api/items/0/original", params={"index": "cifar"}).status_code == 404  # no files behind CIFAR
    assert api.get("/api/items/99/original", params={"index": "photos"}).status_code == 404
    r = api.get(f"/api/items/{i}/image", params={"index": "photos", "size": 2048})  # the viewer, from the HEIC
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 48)


def test_the_report_of_a_captioned_photo_index_shows_its_photos(tmp_path, tiny_model, capsys):
    lib = tmp_path / "shop"
    lib.mkdir()
    rows = ["path,caption"]
    for i, caption in enumerate(("a red mug", "a blue sofa", "a green lamp", "a wooden chair", "a white vase")):
        photo_fixture.picture(200 + i, 90, 60).save(lib / f"p{i}.jpg")
        rows.append(f"p{i}.jpg,{caption}")
    (lib / "list.csv").write_text("\n".join(rows) + "\n")
    assert main(["index", "list", str(lib / "list.csv"), "--index-dir", str(tmp_path / "i"), "--model", tiny_model,
                 "--device", "cpu", "-q"]) == 0
    code, out, _ = run(capsys, "evaluate", "--index-dir", tmp_path / "i", "--out", tmp_path / "r", "--device", "cpu")
    assert code == 0
    figures = sorted(p.name for p in (tmp_path / "r" / "figures").glob("caption_*.png"))
    assert figures == ["caption_0.png", "caption_1.png", "caption_2.png"]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    ex = metrics["caption_retrieval"]["examples"][0]
    assert ex["caption"] == "a red mug" and len(ex["ids"]) == 5 and ex["image"] == 0
    assert "caption_0.png" in (tmp_path / "r" / "report.md").read_text()


def test_thumbnails_come_from_the_decode_that_embeds(photos, tiny_model, tmp_path, monkeypatch, capsys):
    """Indexing decodes each new photo once: its thumbnails are made from the image decoded for the model."""
    import cliplens.sources.photos as photos_mod

    monkeypatch.setattr(photos_mod, "describe_file", lambda *a, **k: pytest.fail("a photo was decoded twice"))
    monkeypatch.setattr(photos_mod, "header_meta", lambda *a, **k: pytest.fail("a photo's header was read again"))
    code, out, _ = run(capsys, "index", photos, "--index-dir", tmp_path / "i", "--model", tiny_model, "--device",
                       "cpu", "-q")
    store = IndexStore.open(tmp_path / "i")
    assert code == 0 and store.has_thumbnails and len(store) == len(photo_fixture.PHOTOS)
    for i in range(len(store)):
        with Image.open(io.BytesIO(store.thumbnail(i, 512))) as im:
            assert im.format == ("JPEG" if max(im.size) > 256 else "WEBP")
            assert (im.width, im.height) == (store.item(i)["width"], store.item(i)["height"])
