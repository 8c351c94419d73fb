"""CIFAR loading: layouts, decoding, verification, safe unpickling, download and extraction.

Everything runs offline on tiny fixture archives written by ``cifar_fixture``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import cifar_fixture as cf
from cliplens.sources import LabeledImages, load_cifar, safe_load_pickle
from cliplens.sources import _pickle, cifar
from cliplens.errors import ChecksumError, DatasetError, UnsafePickleError


@pytest.fixture
def c100_folder(tmp_path: Path) -> cf.CifarFixture:
    return cf.make_cifar100(tmp_path / "data", archive=False, folder=True)


@pytest.fixture
def c100_archive(tmp_path: Path) -> cf.CifarFixture:
    return cf.make_cifar100(tmp_path / "data", archive=True, folder=False)


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under root with its bytes and mtime (None for folders)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def assert_matches(got: LabeledImages, fx: cf.CifarFixture, split: str) -> None:
    assert got.images.dtype == np.uint8 and got.images.flags.c_contiguous
    assert got.images.shape == (len(fx.labels[split]), 32, 32, 3)
    np.testing.assert_array_equal(got.images, fx.images[split])
    assert got.labels.dtype == np.int64
    np.testing.assert_array_equal(got.labels, fx.labels[split])
    assert got.refs == fx.refs[split]
    assert got.class_names == fx.class_names
    assert len(got) == len(fx.labels[split])


# ---- layouts and decoding ---------------------------------------------------------------------

LAYOUTS = ["parent_of_folder", "folder_itself", "parent_of_archive", "archive_itself"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_data_dir_form_decodes_exactly(tmp_path: Path, layout: str, split: str) -> None:
    fx = cf.make_cifar100(
        tmp_path / "data", archive="archive" in layout, folder="folder" in layout
    )
    data_dir = {
        "parent_of_folder": fx.root,
        "folder_itself": fx.folder,
        "parent_of_archive": fx.root,
        "archive_itself": fx.archive,
    }[layout]

    got = load_cifar("cifar100", split, data_dir=data_dir, verify=False, progress=False)

    assert (got.source, got.split) == ("cifar100", split)
    assert_matches(got, fx, split)
    assert "aquarium_fish" in got.class_names and got.class_names[89] == "tractor"
    assert got.superclass_names == cf.CIFAR100_SUPERCLASSES
    np.testing.assert_array_equal(got.coarse_labels, fx.coarse_labels[split])
    np.testing.assert_array_equal(got.fine_to_coarse, cf.CIFAR100_FINE_TO_COARSE)
    # the fingerprint records the files' own hashes, computed independently here
    files = got.fingerprint["files"]
    assert got.fingerprint["verified"] is False
    assert set(files) == {f"cifar-100-python/{split}", "cifar-100-python/meta"}
    for name, entry in files.items():
        path = fx.root / name
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["md5"] == fx.md5[path.name]
        assert entry["size"] == path.stat().st_size
    expected_archive_md5 = fx.md5["cifar-100-python.tar.gz"] if "archive" in layout else None
    assert got.fingerprint["archive_md5"] == expected_archive_md5
    json.dumps(got.fingerprint)  # goes into manifests as is


def test_fixture_files_are_python2_style_pickles_like_the_real_ones(tmp_path: Path) -> None:
    fx = cf.make_cifar100(tmp_path / "data", archive=False, folder=True)
    raw = (fx.folder / "test").read_bytes()
    # protocol 2, keys as Python 2 str, numpy's reconstructor under its numpy 1.x name
    assert raw.startswith(b"\x80\x02}") and b"U\tfilenames" in raw
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    # torchvision's way of reading them (latin1 -> str keys) works on them too
    assert pickle.loads((fx.folder / "meta").read_bytes(), encoding="latin1")["fine_label_names"][1] == "aquarium_fish"


def test_rows_are_decoded_as_red_green_blue_planes(tmp_path: Path) -> None:
    # Independent of the fixture's own encoder: pixel (y, x) channel c sits at c*1024 + y*32 + x.
    fx = cf.make_cifar100(tmp_path / "data", archive=False, folder=True)
    raw = pickle.loads((fx.folder / "test").read_bytes(), encoding="bytes")[b"data"]
    got = load_cifar("cifar100", "test", data_dir=fx.root, verify=False, progress=False)
    for i, y, x, c in [(0, 0, 0, 0), (3, 5, 17, 1), (7, 31, 2, 2), (len(got) - 1, 31, 31, 2)]:
        assert got.images[i, y, x, c] == raw[i, c * 1024 + y * 32 + x]


def test_extraction_is_atomic_and_reused(c100_archive: cf.CifarFixture) -> None:
    first = load_cifar("cifar100", "test", data_dir=c100_archive.root, verify=False, progress=False)
    # only the archive and the finished folder: no temporary folder left behind
    assert sorted(p.name for p in c100_archive.root.iterdir()) == [
        "cifar-100-python",
        "cifar-100-python.tar.gz",
    ]
    before = snapshot(c100_archive.root)
    again = load_cifar("cifar100", "test", data_dir=c100_archive.root, verify=False)
    assert snapshot(c100_archive.root) == before  # the extracted folder was used as it is
    # the fingerprint does not depend on whether this call extracted (indexes resume on it)
    assert again.fingerprint == first.fingerprint
    (c100_archive.root / "cifar-100-python.tar.gz").unlink()
    gone = load_cifar("cifar100", "test", data_dir=c100_archive.root, verify=False)
    assert gone.fingerprint["archive_md5"] is None
    assert gone.fingerprint["files"] == first.fingerprint["files"]


def test_limit_keeps_the_first_images(c100_folder: cf.CifarFixture) -> None:
    full = load_cifar("cifar100", "train", data_dir=c100_folder.root, verify=False)
    part = load_cifar("cifar100", "train", data_dir=c100_folder.root, verify=False, limit=7)
    assert len(part) == 7 and part.images.flags.c_contiguous
    np.testing.assert_array_equal(part.images, full.images[:7])
    np.testing.assert_array_equal(part.labels, full.labels[:7])
    np.testing.assert_array_equal(part.coarse_labels, full.coarse_labels[:7])
    assert part.refs == full.refs[:7]
    # the class map comes from the whole split, not just the kept images
    np.testing.assert_array_equal(part.fine_to_coarse, full.fine_to_coarse)
    assert len(load_cifar("cifar100", "train", data_dir=c100_folder.root, verify=False, limit=0)) == 0
    huge = load_cifar("cifar100", "train", data_dir=c100_folder.root, verify=False, limit=10**6)
    assert len(huge) == len(full)
    with pytest.raises(DatasetError, match="limit"):
        load_cifar("cifar100", "train", data_dir=c100_folder.root, verify=False, limit=-1)


def test_default_data_dir_reads_the_environment_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = cf.make_cifar100(tmp_path / "home" / "data", archive=False, folder=True)
    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path / "home"))
    assert cifar.default_data_dir() == tmp_path / "home" / "data"
    got = load_cifar("cifar100", "test", verify=False, download=False)
    assert_matches(got, fx, "test")


def test_fine_to_coarse_marks_missing_classes_and_refuses_conflicts(
    c100_folder: cf.CifarFixture,
) -> None:
    path = c100_folder.folder / "test"
    batch = safe_load_pickle(path)
    fine = np.asarray(batch[b"fine_labels"])
    keep = fine != 0  # drop every image of class 0 ("apple")
    batch[b"data"] = batch[b"data"][keep]
    batch[b"fine_labels"] = fine[keep].tolist()
    batch[b"coarse_labels"] = np.asarray(batch[b"coarse_labels"])[keep].tolist()
    batch[b"filenames"] = [f for f, k in zip(batch[b"filenames"], keep) if k]
    cf.write_cifar_pickle(path, batch)
    got = load_cifar("cifar100", "test", data_dir=c100_folder.root, verify=False)
    assert got.fine_to_coarse[0] == -1
    np.testing.assert_array_equal(got.fine_to_coarse[1:], cf.CIFAR100_FINE_TO_COARSE[1:])

    batch[b"coarse_labels"][0] = (batch[b"coarse_labels"][0] + 1) % 20  # one image disagrees
    cf.write_cifar_pickle(path, batch)
    with pytest.raises(DatasetError, match="two superclasses"):
        load_cifar("cifar100", "test", data_dir=c100_folder.root, verify=False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (b"fine_labels", "out_of_range", "outside 0..99"),
        (b"fine_labels", "short", "should be"),
        (b"data", "wrong_width", "3072"),
        (b"data", "floats", "bytes 0..255"),
    ],
)
def test_malformed_batches_name_the_file(
    c100_folder: cf.CifarFixture, key: bytes, value: str, message: str
) -> None:
    path = c100_folder.folder / "test"
    batch = safe_load_pickle(path)
    if value == "out_of_range":
        batch[key][0] = 100
    elif value == "short":
        batch[key] = batch[key][:-1]
    elif value == "wrong_width":
        batch[key] = batch[key][:, :3071]
    else:
        batch[key] = batch[key].astype(np.float32)
    cf.write_cifar_pickle(path, batch)
    with pytest.raises(DatasetError, match=message) as info:
        load_cifar("cifar100", "test", data_dir=c100_folder.root, verify=False)
    assert str(path) in str(info.value)


# ---- verification -----------------------------------------------------------------------------


def test_verify_refuses_unofficial_files(c100_folder: cf.CifarFixture) -> None:
    with pytest.raises(ChecksumError) as info:
        load_cifar("cifar100", "test", data_dir=c100_folder.root)
    message = str(info.value)
    assert "\n" not in message
    assert "cifar-100-python/test" in message and "--no-verify" in message
    assert cifar.OFFICIAL_MD5["cifar100"]["test"] in message


def test_verify_refuses_an_unofficial_archive_before_extracting(
    c100_archive: cf.CifarFixture,
) -> None:
    before = snapshot(c100_archive.root)
    with pytest.raises(ChecksumError, match=r"cifar-100-python\.tar\.gz.*--no-verify"):
        load_cifar("cifar100", "train", data_dir=c100_archive.root)
    assert snapshot(c100_archive.root) == before  # nothing extracted


def test_verified_path_end_to_end_with_patched_md5(
    c100_archive: cf.CifarFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cf.official_md5_patch(monkeypatch, c100_archive)
    got = load_cifar("cifar100", "train", data_dir=c100_archive.root, progress=False)
    assert_matches(got, c100_archive, "train")
    assert got.fingerprint["verified"] is True
    assert got.fingerprint["archive_md5"] == c100_archive.md5["cifar-100-python.tar.gz"]
    assert got.fingerprint["files"]["cifar-100-python/train"]["md5"] == c100_archive.md5["train"]


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_test_file_is_refused_and_left_alone(
    c100_folder: cf.CifarFixture, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    cf.official_md5_patch(monkeypatch, c100_folder)  # the intact files count as official
    cf.truncate(c100_folder.folder / "test")
    before = snapshot(c100_folder.root)
    expected = ChecksumError if verify else DatasetError
    with pytest.raises(expected) as info:
        load_cifar("cifar100", "test", data_dir=c100_folder.root, verify=verify)
    message = str(info.value)
    assert "\n" not in message and "cifar-100-python/test" in message
    assert ("--no-verify" in message) if verify else ("truncated or corrupt" in message)
    assert snapshot(c100_folder.root) == before


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_archive_is_refused_and_left_alone(
    c100_archive: cf.CifarFixture, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    cf.official_md5_patch(monkeypatch, c100_archive)
    cf.truncate(c100_archive.archive, 0.6)
    before = snapshot(c100_archive.root)
    expected = ChecksumError if verify else DatasetError
    with pytest.raises(expected) as info:
        load_cifar("cifar100", "test", data_dir=c100_archive.root, verify=verify)
    message = str(info.value)
    assert "\n" not in message and "cifar-100-python.tar.gz" in message
    assert "--no-verify" in message if verify else "re-download" in message
    assert snapshot(c100_archive.root) == before  # no half folder, no temporary folder


# ---- safe unpickling --------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, "patched"])
def test_malicious_test_file_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: bool | str
) -> None:
    marker = tmp_path / "pwned"
    fx = cf.make_malicious_cifar100(tmp_path / "data", marker)
    if verify == "patched":  # even a file whose md5 we trust is unpickled with the allow-list
        cf.official_md5_patch(monkeypatch, fx)
    with pytest.raises(UnsafePickleError, match=r"refusing to load .*test: unexpected object .*system"):
        load_cifar("cifar100", "test", data_dir=fx.root, verify=bool(verify), progress=False)
    assert not marker.exists()


def test_malicious_file_with_official_md5s_fails_the_checksum_first(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    fx = cf.make_malicious_cifar100(tmp_path / "data", marker, archive=False, folder=True)
    with pytest.raises(ChecksumError):
        load_cifar("cifar100", "test", data_dir=fx.root)
    assert not marker.exists()


def test_safe_load_pickle_refuses_other_globals(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cf.make_malicious_pickle(tmp_path / "evil", marker)
    with pytest.raises(UnsafePickleError, match="only numpy arrays, lists, dicts"):
        safe_load_pickle(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "builtins").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        safe_load_pickle(tmp_path / "builtins")


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_safe_load_pickle_reads_arrays_under_both_numpy_names(tmp_path: Path, module: str) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = pickle.dumps({b"data": array, b"labels": [1, 2], b"name": b"x"}, protocol=2)
    data = data.replace(b"cnumpy._core.multiarray\n", f"c{module}\n".encode())
    assert f"c{module}\n_reconstruct".encode() in data
    (tmp_path / "p").write_bytes(data)
    got = safe_load_pickle(tmp_path / "p")
    np.testing.assert_array_equal(got[b"data"], array)
    assert got[b"labels"] == [1, 2] and got[b"name"] == b"x"


def test_safe_load_pickle_refuses_huge_and_non_dict_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DatasetError, match="expected a pickled dict"):
        safe_load_pickle(tmp_path / "list")
    monkeypatch.setattr(_pickle, "MAX_PICKLE_BYTES", 8)
    with pytest.raises(DatasetError, match="larger than any CIFAR file"):
        safe_load_pickle(tmp_path / "list")


def _write_tar(path: Path, members: list[tarfile.TarInfo]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


@pytest.mark.parametrize("bad", ["escape", "symlink", "other_folder"])
def test_archive_members_outside_the_folder_are_refused(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    names = {
        "escape": "cifar-100-python/../../evil",
        "symlink": "cifar-100-python/meta",
        "other_folder": "cifar-10-batches-py/data_batch_1",
    }
    info = tarfile.TarInfo(names[bad])
    if bad == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        info.size = 3
    _write_tar(root / "cifar-100-python.tar.gz", [info])
    with pytest.raises(DatasetError, match="refusing member"):
        load_cifar("cifar100", "test", data_dir=root, verify=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cifar-100-python.tar.gz", "data"]


# ---- download ---------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> cf.CifarFixture:
    """A fixture archive "on the server": CIFAR_URLS points at it as a file:// URL."""
    fx = cf.make_cifar100(tmp_path / "server", archive=True, folder=False)
    monkeypatch.setitem(cifar.CIFAR_URLS, "cifar100", fx.archive.as_uri())
    return fx


def test_download_verifies_extracts_and_loads(
    served: cf.CifarFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cf.official_md5_patch(monkeypatch, served)
    data_dir = tmp_path / "fresh" / "data"
    got = load_cifar("cifar100", "test", data_dir=data_dir, progress=True)
    assert_matches(got, served, "test")
    assert got.fingerprint["verified"] is True
    assert got.fingerprint["archive_md5"] == served.md5["cifar-100-python.tar.gz"]
    assert (data_dir / "cifar-100-python.tar.gz").read_bytes() == served.archive.read_bytes()
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cifar-100-python",
        "cifar-100-python.tar.gz",
    ]


def test_download_to_a_folder_to_be(served: cf.CifarFixture, tmp_path: Path) -> None:
    # --data-dir pointing at a cifar-100-python folder that does not exist yet
    target = tmp_path / "data" / "cifar-100-python"
    got = load_cifar("cifar100", "test", data_dir=target, verify=False, progress=False)
    assert_matches(got, served, "test")
    assert (target / "test").is_file() and (target.parent / "cifar-100-python.tar.gz").is_file()


def test_downloaded_archive_with_wrong_md5_is_not_kept(served: cf.CifarFixture, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(ChecksumError, match="--no-verify"):
        load_cifar("cifar100", "test", data_dir=data_dir, progress=False)
    assert list(data_dir.iterdir()) == []


class _BrokenResponse:
    """A response that delivers one chunk and then loses the connection."""

    headers = {"Content-Length": "1000000"}

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> _BrokenResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise ConnectionResetError("connection reset by peer")
        return b"\x1f\x8b" + b"\0" * 1000


def _refuse(url: str, timeout: float) -> None:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _not_found(url: str, timeout: float) -> None:
    raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("opener", [_refuse, _not_found, lambda url, timeout: _BrokenResponse()])
def test_network_failure_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opener: object
) -> None:
    monkeypatch.setattr(cifar, "_urlopen", opener)
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        load_cifar("cifar100", "test", data_dir=data_dir, progress=False)
    message = str(info.value)
    assert type(info.value) is DatasetError and "\n" not in message
    assert message.startswith("downloading https://www.cs.toronto.edu/~kriz/cifar-100-python")
    assert "failed" in message and "--data-dir" in message
    assert list(data_dir.iterdir()) == []  # no partial archive


def test_missing_data_without_download_says_where_it_looked(tmp_path: Path) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not touch the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cifar, "_urlopen", fail)
        with pytest.raises(DatasetError, match=r"not found in .*cifar-100-python\.tar\.gz"):
            load_cifar("cifar100", "test", data_dir=tmp_path, download=False)


# ---- CIFAR-10 and argument checks -------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_loads_through_the_same_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str
) -> None:
    fx = cf.make_cifar10(tmp_path / "data", archive=True, folder=False)
    cf.official_md5_patch(monkeypatch, fx)
    got = load_cifar("CIFAR-10", split, data_dir=fx.archive, progress=False)
    assert got.source == "cifar10"
    assert_matches(got, fx, split)
    assert got.class_names == cf.CIFAR10_CLASSES
    assert got.coarse_labels is None and got.superclass_names is None
    assert got.fine_to_coarse is None
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}[split]
    assert set(got.fingerprint["files"]) == {f"cifar-10-batches-py/{f}" for f in [*files, "batches.meta"]}
    assert got.fingerprint["verified"] is True


def test_cifar10_folder_is_not_mistaken_for_cifar100(tmp_path: Path) -> None:
    fx = cf.make_cifar10(tmp_path / "data", archive=False, folder=True)
    with pytest.raises(DatasetError, match="looks like the CIFAR-10 folder"):
        load_cifar("cifar100", "test", data_dir=fx.folder, verify=False)


@pytest.mark.parametrize("name", ["cifar100", "CIFAR100", "cifar-100", "CIFAR-100", "cifar_100"])
def test_name_aliases(c100_folder: cf.CifarFixture, name: str) -> None:
    got = load_cifar(name, "test", data_dir=c100_folder.root, verify=False)
    assert got.source == "cifar100"


@pytest.mark.parametrize(
    ("name", "split", "message"),
    [
        ("cifar1000", "test", "unknown data set 'cifar1000'; expected one of: cifar100, cifar10"),
        ("imagenet", "test", "unknown data set"),
        ("cifar100", "val", "unknown split 'val'; expected one of: train, test"),
        ("cifar100", "Test", "unknown split"),
    ],
)
def test_invalid_name_or_split(tmp_path: Path, name: str, split: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_cifar(name, split, data_dir=tmp_path, download=False)


def test_labeled_images_is_frozen(c100_folder: cf.CifarFixture) -> None:
    got = load_cifar("cifar100", "test", data_dir=c100_folder.root, verify=False)
    with pytest.raises(AttributeError):
        got.split = "train"  # type: ignore[misc]
