"""Hostile CIFAR archives: corrupt gzip streams, bombs, odd members, a stale extracted folder.

Every case is refused with one line (exit 2) even with --no-verify, before the model loads, and leaves the data
folder exactly as it was: no half-extracted folder, no temporary folder. New case = one line in CASES.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import cifar_fixture as cf
import hostile_fixture as hf
from cliplens.sources import _download, load_cifar
from cliplens.errors import DatasetError

ARCHIVE = "cifar-100-python.tar.gz"


def _flip_bit(data: bytes) -> bytes:
    i = len(data) // 2  # inside the deflate stream
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]


def _bad_crc(data: bytes) -> bytes:  # trailer: CRC32 (4 bytes) then ISIZE (4 bytes); only the CRC check sees this
    return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


def _bad_size(data: bytes) -> bytes:
    return data[:-4] + (int.from_bytes(data[-4:], "little") + 1).to_bytes(4, "little")


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _info(name: str, *, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


class _Zeros(io.RawIOBase):  # a member's bytes, produced as tarfile reads them: nothing this big is ever held
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _bomb(_: bytes) -> bytes:
    """A 300 MiB member of zeros: a few hundred kB of gzip that expands past any CIFAR file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.addfile(_info("cifar-100-python/train", size=300 << 20), _Zeros(300 << 20))
    return buf.getvalue()


CASES = {  # name: (how the archive's bytes are changed, words the error must contain)
    "flipped bit": (_flip_bit, "corrupt"),
    "bad crc": (_bad_crc, "corrupt"),
    "bad length trailer": (_bad_size, "corrupt"),
    "cut trailer": (lambda d: d[:-8], "corrupt"),
    "cut in half": (lambda d: d[: len(d) // 2], "corrupt"),
    "not gzip at all": (lambda d: b"<html>404</html>" * 100, "corrupt"),
    "gzip bomb": (_bomb, "over the 256 MiB"),
    "symlink member": (lambda d: _tar([(_info("cifar-100-python/meta", kind=tarfile.SYMTYPE, link="/etc/passwd"),
                                        None)]), "not a regular file"),
    "hard link member": (lambda d: _tar([(_info("cifar-100-python/meta", kind=tarfile.LNKTYPE, link="/etc/shadow"),
                                          None)]), "not a regular file"),
    "path escape": (lambda d: _tar([(_info("cifar-100-python/../../evil", size=1), b"x")]), "outside"),
    "absolute path": (lambda d: _tar([(_info("/tmp/evil", size=1), b"x")]), "outside"),
    "device member": (lambda d: _tar([(_info("cifar-100-python/meta", kind=tarfile.CHRTYPE), None)]),
                      "not a regular file"),
    "thousands of members": (lambda d: _tar([(_info(f"cifar-100-python/f{i}"), b"") for i in range(200)]),
                             "64 members"),
}


@pytest.fixture
def archive(tmp_path) -> Path:
    fx = cf.make_cifar100(tmp_path / "data", archive=True, folder=False)
    return fx.archive


@pytest.mark.parametrize("case", CASES)
def test_hostile_archive_is_refused_in_one_line_and_leaves_nothing(case, archive, tmp_path, capsys):
    change, expect = CASES[case]
    archive.write_bytes(change(archive.read_bytes()))
    before = hf.tree_digest(archive.parent)
    code, out, err = hf.cli(capsys, "index", "cifar100", "--data-dir", archive, "--no-verify", "-q",
                            "--index-dir", tmp_path / "index")
    hf.assert_one_line_error(code, err, expect=expect)
    assert hf.tree_digest(archive.parent) == before  # no folder, no temporary folder, archive untouched
    assert not (tmp_path / "index").exists()


def test_total_size_cap_is_checked_before_writing(archive, monkeypatch):
    monkeypatch.setattr(_download, "MAX_TOTAL_BYTES", 100_000)  # the fixture's members add up to more
    before = hf.tree_digest(archive.parent)
    with pytest.raises(DatasetError, match="would expand past"):
        load_cifar("cifar100", "test", data_dir=archive, verify=False, progress=False)
    assert hf.tree_digest(archive.parent) == before


def test_a_folder_extracted_from_another_archive_is_not_used(tmp_path):
    first = cf.make_cifar100(tmp_path / "a", archive=True, folder=False, seed=1)
    other = cf.make_cifar100(tmp_path / "b", archive=True, folder=False, seed=2)
    load_cifar("cifar100", "test", data_dir=first.archive, verify=False, progress=False)  # extracts A beside it
    first.archive.write_bytes(other.archive.read_bytes())  # the user now points at archive B, same name
    got = load_cifar("cifar100", "test", data_dir=first.archive, verify=False, progress=False)
    assert (got.images == other.images["test"]).all()  # B's images, not the folder left by A
    assert got.fingerprint["archive_md5"] == other.md5[ARCHIVE]
    assert sorted(p.name for p in first.root.iterdir()) == ["cifar-100-python", ARCHIVE]  # old folder gone


def test_a_data_dir_holding_both_uses_the_archive_when_the_folder_came_from_another(tmp_path):
    """--data-dir DIR with DIR/cifar-100-python.tar.gz and a DIR/cifar-100-python/ that cliplens extracted from
    another archive: the archive beside it wins; a folder cliplens did not extract stays the user's to vouch for."""
    first = cf.make_cifar100(tmp_path / "a", archive=True, folder=False, seed=1)
    other = cf.make_cifar100(tmp_path / "b", archive=True, folder=False, seed=2)
    load_cifar("cifar100", "test", data_dir=first.root, verify=False, progress=False)  # extracts A in DIR
    same = load_cifar("cifar100", "test", data_dir=first.root, verify=False, progress=False)
    assert (same.images == first.images["test"]).all() and same.fingerprint["archive_md5"] == first.md5[ARCHIVE]
    first.archive.write_bytes(other.archive.read_bytes())  # a new archive of the same name in DIR
    got = load_cifar("cifar100", "test", data_dir=first.root, verify=False, progress=False)
    assert (got.images == other.images["test"]).all()  # B's images, not the folder extracted from A
    assert got.fingerprint["archive_md5"] == other.md5[ARCHIVE]
    mine = cf.make_cifar100(tmp_path / "c", archive=True, folder=True, seed=3)  # a folder of unknown origin
    kept = load_cifar("cifar100", "test", data_dir=mine.root, verify=False, progress=False)
    assert (kept.images == mine.images["test"]).all()


def test_a_folder_cliplens_did_not_extract_is_never_used_for_the_archive(tmp_path, capsys):
    fx = cf.make_cifar100(tmp_path / "data", archive=True, folder=True)  # a folder of unknown origin beside it
    before = hf.tree_digest(fx.root)
    code, _, err = hf.cli(capsys, "index", "cifar100", "--data-dir", fx.archive, "--no-verify", "-q",
                          "--index-dir", tmp_path / "index")
    hf.assert_one_line_error(code, err, expect="was not extracted from")
    assert hf.tree_digest(fx.root) == before  # the user's folder is never deleted or overwritten


def test_a_failed_swap_puts_the_previous_extraction_back(tmp_path, monkeypatch):
    first = cf.make_cifar100(tmp_path / "a", archive=True, folder=False, seed=1)
    other = cf.make_cifar100(tmp_path / "b", archive=True, folder=False, seed=2)
    load_cifar("cifar100", "test", data_dir=first.archive, verify=False, progress=False)  # extracts A beside it
    folder = first.root / "cifar-100-python"
    before = hf.tree_digest(folder)
    first.archive.write_bytes(other.archive.read_bytes())
    real = _download.os.rename

    def rename(src, dst):  # the new folder cannot be moved into place (a full disk, a racing tool, ...)
        if Path(src).name == "cifar-100-python" and Path(dst) == folder:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_download.os, "rename", rename)
    with pytest.raises(DatasetError, match="cannot extract"):
        load_cifar("cifar100", "test", data_dir=first.archive, verify=False, progress=False)
    assert hf.tree_digest(folder) == before  # the previous extraction is back, byte for byte
    assert sorted(p.name for p in first.root.iterdir()) == ["cifar-100-python", ARCHIVE]  # no scratch left
