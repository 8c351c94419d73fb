"""Hostile CIFAR pickles: code, arrays that lie about their size, odd calls, inconsistent names and labels.

Each case writes one file of a CIFAR-100 folder and runs ``cliplens index cifar100 --no-verify`` on it: one line,
exit 2, a marker file proves no code ran, and the folder is unchanged. The arrays that claim gigabytes are also
loaded under a 1 GiB address-space limit, so a refusal that came after the allocation would fail there.
New case = one line in CASES.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest

import cifar_fixture as cf
import hostile_fixture as hf

_reconstruct = np.empty(0).__reduce__()[0]
U1 = np.dtype("u1")


class _Reduce:
    """Pickles as ``func(*args)`` then BUILD ``state``: whatever a hand-written pickle could say."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _array(shape, dtype=U1, raw=b"x" * 3072, version=1, fortran=False):
    return _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (version, shape, dtype, fortran, raw))


def _batch(data, *, labels=(0,), names=(b"x.png",)) -> dict:
    return {b"data": data, b"fine_labels": list(labels), b"coarse_labels": [4] * len(labels),
            b"filenames": list(names), b"batch_label": b"testing batch 1 of 1"}


def _marker_call(marker: Path):
    return _Reduce(os.system, (f"touch {shlex.quote(str(marker))}",))


def _raw_bytes8(n: int) -> bytes:  # a protocol-4 BINBYTES8 claiming n bytes, then 3 bytes and STOP
    return b"\x80\x04\x8e" + n.to_bytes(8, "little") + b"abc."


def _deep_labels() -> bytes:  # {b'data': one row, b'fine_labels': [[[[...]]]] 100 000 deep}, by hand
    head = pickle.dumps(_batch(np.zeros((1, 3072), np.uint8)), protocol=2)
    key = pickle.dumps(b"fine_labels", protocol=2)[2:-1].replace(b"cbuiltins\nbytes", b"c__builtin__\nbytes")
    deep = b"]" * 100_000 + b"a" * 99_999
    return head[:-1] + key + deep + b"s."  # SETITEM on the top-level dict, then STOP


CASES = {  # name: (file, builder(marker) -> object or raw bytes, words the error must contain)
    "runs os.system": ("test", lambda m: _batch(_marker_call(m)), "unexpected object"),
    "runs code in meta": ("meta", lambda m: {b"fine_label_names": [_marker_call(m)]}, "unexpected object"),
    "300 GB claimed in 3 KB": ("test", lambda m: _array((100_000_000, 3072)), "holding 3,072 bytes"),
    "shape larger than bytes": ("test", lambda m: _array((2, 3072)), "holding 3,072 bytes"),
    "negative dimension": ("test", lambda m: _array((-1, 3072)), "non-negative"),
    "non-integer dimension": ("test", lambda m: _array((1.5, 3072)), "non-negative"),
    "object dtype": ("test", lambda m: _array((1, 3072), np.dtype("O")), "only numbers"),
    "record dtype": ("test", lambda m: _array((1, 3072), np.dtype([("a", "u1")])), "only numbers"),
    "data as a list": ("test", lambda m: _array((1, 3072), raw=[1] * 3072), "not a byte string"),
    "unknown state version": ("test", lambda m: _array((1, 3072), version=7), "unknown state layout"),
    "huge placeholder shape": ("test", lambda m: _Reduce(_reconstruct, (np.ndarray, (10**12,), b"b")),
                               "unusual way"),
    "zero strides": ("test", lambda m: _batch(_Reduce(np.ndarray, ((100_000, 3072), "u1", b"x" * 3072, 0, (0, 1)))),
                     "unusual way"),
    "negative strides": ("test", lambda m: _batch(_Reduce(np.ndarray, ((2, 3072), "u1", b"x" * 6144, 3072, (-3072, 1)))),
                         "unusual way"),
    "other codec": ("test", lambda m: _batch(_Reduce(__import__("_codecs").encode, ("x", "zlib_codec"))),
                    "_codecs.encode"),
    "BINBYTES8 claims 1 TB": ("test", lambda m: _raw_bytes8(1 << 40), "truncated or corrupt"),
    "nested 100 000 lists": ("test", lambda m: b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",
                             "expected a pickled dict"),
    "labels nested 100 000 deep": ("test", lambda m: _deep_labels(), "found other values"),
    "labels not numbers": ("test", lambda m: _batch(np.zeros((1, 3072), np.uint8), labels=("x",)), "other values"),
    "empty batch": ("test", lambda m: _batch(np.zeros((0, 3072), np.uint8), labels=(), names=()), "no images"),
    "100 identical class names": ("meta", lambda m: {b"fine_label_names": [b"apple"] * 100,
                                                     b"coarse_label_names": [b"s%d" % i for i in range(20)]},
                                  "more than once"),
    "99 class names": ("meta", lambda m: {b"fine_label_names": [b"c%d" % i for i in range(99)],
                                          b"coarse_label_names": [b"s%d" % i for i in range(20)]},
                       "lists 99 names"),
    "labels past the names": ("test", lambda m: _batch(np.zeros((1, 3072), np.uint8), labels=(100,)),
                              "outside 0..99"),
    "labels and rows differ": ("test", lambda m: _batch(np.zeros((1, 3072), np.uint8), labels=(1, 2)), "should be 1"),
    "not a dict": ("test", lambda m: [1, 2, 3], "expected a pickled dict"),
}


def _write(path: Path, obj) -> None:
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:  # as the real files are written: protocol 2, Python 2 strings
        cf.write_cifar_pickle(path, obj)


@pytest.fixture
def folder(tmp_path) -> cf.CifarFixture:
    return cf.make_cifar100(tmp_path / "data", archive=False, folder=True)


@pytest.mark.parametrize("case", CASES)
def test_hostile_pickle_is_refused_and_runs_nothing(case, folder, tmp_path, capsys):
    name, build, expect = CASES[case]
    marker = tmp_path / "pwned"
    _write(folder.folder / name, build(marker))
    before = hf.tree_digest(folder.root)
    code, out, err = hf.cli(capsys, "index", "cifar100", "--data-dir", folder.root, "--no-verify", "-q",
                            "--index-dir", tmp_path / "index")
    assert code == 2 and "Traceback" not in err
    assert any(word in err.lower() for word in expect.lower().split("|")), err
    hf.assert_one_line_error(code, err, expect="")
    assert not marker.exists()  # nothing in the pickle ran
    assert hf.tree_digest(folder.root) == before
    assert not (tmp_path / "index").exists()


BOMBS = ("300 GB claimed in 3 KB", "huge placeholder shape", "zero strides", "BINBYTES8 claims 1 TB")


def test_size_claims_are_refused_before_any_allocation(tmp_path):
    """Loaded under RLIMIT_AS = 1 GiB: a refusal after allocating would be a MemoryError or a crash instead."""
    paths = []
    for case in BOMBS:
        path = tmp_path / case.replace(" ", "_")
        _write(path, CASES[case][1](tmp_path / "marker"))
        paths.append(str(path))
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from cliplens.sources._pickle import safe_load_pickle
from cliplens.errors import DatasetError
for path in {paths!r}:
    try:
        safe_load_pickle(path)
    except DatasetError as exc:
        assert "MemoryError" not in str(exc), exc
        print("refused", path)
    else:
        raise SystemExit("loaded " + path)
"""
    proc = hf.run_python(code, env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert sum(line.startswith("refused ") for line in proc.stdout.splitlines()) == len(BOMBS)
