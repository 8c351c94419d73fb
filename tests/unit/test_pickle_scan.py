"""The restricted loader's length check (cliplens.sources._pickle._scan_lengths) against pickletools.genops.

The check replaced a full genops walk: it must accept every well-formed pickle genops accepts, and refuse every
pickle whose arguments or claimed lengths run past the bytes present, or that ends before STOP.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
import struct
from collections import OrderedDict

import numpy as np
import pytest

from bench.data import write_cifar_pickle
from cliplens.errors import DatasetError
from cliplens.sources._pickle import _scan_lengths
from cliplens.sources.cifar import _read_checked

OBJECTS = [
    {b"data": np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072), b"fine_labels": [1, 2], b"filenames": [b"a", b"b"]},
    [0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**70, -(2**70), 1.5, float("inf"), None, True, False],
    ("x" * 300, "é€𝄞", b"y" * 300, b"", "", bytearray(b"z" * 10), frozenset({1, 2}), {3, 4}),
    OrderedDict(a=1, b=[{"c": (1, 2, 3)}] * 3),
    [[[]]] * 50,
    complex(1, 2),
]


def _genops_ok(data: bytes) -> bool:
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
        return True
    except Exception:
        return False


def _scan_ok(data: bytes) -> bool:
    try:
        _scan_lengths(data)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("obj", OBJECTS, ids=range(len(OBJECTS)))
def test_accepts_what_genops_accepts_and_refuses_every_truncation(obj, protocol):
    data = pickle.dumps(obj, protocol=protocol)
    assert _genops_ok(data) and _scan_ok(data)
    assert _scan_ok(data + b"trailing bytes after STOP")  # as genops: nothing is read past STOP
    for cut in range(len(data)):  # every prefix is missing at least its STOP
        assert not _scan_ok(data[:cut]), cut


def test_the_official_files_spelling_passes(tmp_path):
    write_cifar_pickle(tmp_path / "test", OBJECTS[0])
    data = (tmp_path / "test").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and pickle.BINSTRING in data
    assert _genops_ok(data) and _scan_ok(data)


@pytest.mark.parametrize("opcode, width, fmt", [
    (pickle.BINBYTES8, 8, "<Q"), (pickle.BINUNICODE8, 8, "<Q"), (pickle.BYTEARRAY8, 8, "<Q"),
    (pickle.BINBYTES, 4, "<I"), (pickle.BINUNICODE, 4, "<I"), (pickle.BINSTRING, 4, "<i"), (pickle.LONG4, 4, "<i"),
    (pickle.SHORT_BINBYTES, 1, "<B"), (pickle.SHORT_BINSTRING, 1, "<B"), (pickle.SHORT_BINUNICODE, 1, "<B"),
    (pickle.LONG1, 1, "<B"),
])
def test_refuses_a_length_claiming_more_than_is_there(opcode, width, fmt):
    claim = min(2**40, 2 ** (8 * width - 1) - 1)
    body = b"x" * 8
    for length, fits in ((claim, False), (len(body) + 1, False), (len(body), True)):
        data = pickle.PROTO + b"\x04" + opcode + struct.pack(fmt, length) + body + pickle.STOP
        if fits:
            assert _scan_ok(data) and _genops_ok(data)
        else:
            assert not _scan_ok(data) and not _genops_ok(data)


def test_refuses_a_negative_signed_length_and_unknown_opcodes():
    assert not _scan_ok(pickle.PROTO + b"\x02" + pickle.BINSTRING + struct.pack("<i", -1) + pickle.STOP)
    assert not _scan_ok(pickle.PROTO + b"\x02" + b"\xff" + pickle.STOP)
    assert not _scan_ok(b"cos\nsystem" + pickle.STOP)  # GLOBAL's second line never ends
    assert not _scan_ok(b"")


def test_a_file_is_read_once_with_its_digests_and_damage_kept_for_later(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(pickle.dumps({b"a": 1}, protocol=2))
    bad.write_bytes(pickle.PROTO + b"\x02" + pickle.BINBYTES8 + struct.pack("<Q", 2**40) + pickle.STOP)
    for path in (good, bad):
        read = _read_checked(path)
        raw = path.read_bytes()
        assert read.digests == {"md5": hashlib.md5(raw).hexdigest(), "sha256": hashlib.sha256(raw).hexdigest(),
                                "size": len(raw)}
    assert _read_checked(good).load(good) == {b"a": 1} and _read_checked(bad).damage is not None
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        _read_checked(bad).load(bad)
