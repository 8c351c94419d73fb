"""A restricted unpickler for the CIFAR python files.

Unpickling runs whatever callables the pickle names, so a tampered ``test`` file could run
``os.system`` the moment it is loaded. The CIFAR pickles only ever need four globals: numpy's
array reconstructor, ``numpy.ndarray``, ``numpy.dtype`` and ``_codecs.encode`` (which Python 3
writes for ``bytes`` under protocol 2). Everything else is refused before it is looked up, and the arrays themselves are checked: the bytes present
must match the shape and dtype they declare, before numpy allocates anything.
"""

from __future__ import annotations

import _codecs
import contextlib
import io
import math
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.errors import CliplensError, DatasetError, UnsafePickleError

# The largest real file is CIFAR-100's ``train`` (~158 MB); anything past this is not a CIFAR pickle, and
# refusing it early avoids reading gigabytes into memory.
MAX_PICKLE_BYTES = 256 << 20
_MAX_NDIM = 8
_DTYPE_KINDS = "biuf"  # bool, signed, unsigned, float: all a CIFAR file holds

# numpy's array reconstructor, taken from ndarray's own pickling hook rather than imported:
# on numpy 2 ``import numpy.core`` warns (and warnings are errors in our tests), and on
# numpy 1.x there is no ``numpy._core``. The real files were written under numpy 1.x and name
# ``numpy.core.multiarray``; files written by numpy 2 name ``numpy._core.multiarray``.
_reconstruct = np.empty(0).__reduce__()[0]


class _Refused(Exception):
    """An array or call in the pickle is inconsistent or not allowed; the message says how."""


class _CheckedArray(np.ndarray):
    """What the pickle's ``numpy.ndarray`` becomes: its state (shape, dtype, bytes) is checked before numpy sees it.

    A pickled array is ``_reconstruct(ndarray, (0,), b'b')`` followed by ``__setstate__((1, shape, dtype,
    is_fortran, raw_bytes))``. numpy would trust ``shape`` and ``dtype``; here the bytes present must be exactly
    what they declare, computed in Python integers (no overflow), before anything is allocated.
    """

    def __new__(cls, *args, **kwargs):
        # ndarray(shape, dtype, buffer, offset, strides) called by the pickle itself: a 3 KB buffer seen through
        # zero or negative strides as gigabytes. Only _reconstruct (which does not call __new__) builds these.
        raise _Refused("an array constructed in an unusual way")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise _Refused("an array with an unknown state layout")
        shape, dtype, fortran, raw = state[-4:]
        if (not isinstance(shape, tuple) or len(shape) > _MAX_NDIM
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise _Refused(f"an array with shape {shape!r} (want at most {_MAX_NDIM} non-negative sizes)")
        if (not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or dtype.fields is not None
                or dtype.subdtype is not None or dtype.itemsize != np.dtype(dtype.str).itemsize):
            raise _Refused(f"an array of dtype {dtype!r} (only numbers are allowed)")
        if not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise _Refused("an array whose data is not a byte string")
        declared = math.prod(shape) * dtype.itemsize
        if declared != len(raw):
            raise _Refused(f"an array declaring shape {shape} of {dtype} ({declared:,} bytes) "
                           f"but holding {len(raw):,} bytes")
        super().__setstate__(state)


def _checked_reconstruct(subtype, shape, dtype):
    # numpy allocates ``shape`` here, before __setstate__: only the empty placeholder that pickles write passes
    if subtype is not _CheckedArray or not isinstance(shape, tuple) or math.prod(
            d if type(d) is int and d >= 0 else 1 << 62 for d in shape) > 16:
        raise _Refused("an array constructed in an unusual way")
    return _reconstruct(_CheckedArray, shape, dtype)


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Python 3 pickles bytes under protocol 2 as _codecs.encode(str, "latin1"); no other codec is needed
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"a call to _codecs.encode with {encoding!r}")
    return _codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy", "ndarray"): _CheckedArray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


def _plain(obj: Any, depth: int = 0) -> Any:
    """The loaded structure with every checked array turned back into a plain ndarray (CIFAR nests 2 deep)."""
    if isinstance(obj, _CheckedArray):
        return obj.view(np.ndarray)
    if depth < 4 and isinstance(obj, dict):
        return {k: _plain(v, depth + 1) for k, v in obj.items()}
    if depth < 4 and isinstance(obj, list):  # CIFAR's lists hold 10,000s of labels and names: skip those fast
        return [v if type(v) in _LEAVES else _plain(v, depth + 1) for v in obj]
    return obj


_LEAVES = frozenset({int, bytes, str, float, bool, type(None)})  # what _plain returns as it is


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, name: str) -> None:
        # encoding="bytes" keeps Python 2 ``str`` as bytes, matching the files' b'data' keys
        super().__init__(file, encoding="bytes")
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {self._name}: unexpected object {module}.{name} in pickle "
                "(only numpy arrays, lists, dicts, bytes and numbers are allowed)"
            ) from None


def read_pickle_file(path: str | Path) -> bytes:
    """The bytes of a CIFAR-style pickle, refused (DatasetError) when missing or far larger than any CIFAR file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > MAX_PICKLE_BYTES:
        raise DatasetError(
            f"refusing to load {path}: {size / 2**30:.1f} GiB is far larger than any CIFAR file"
        )
    try:
        # All of it in memory, not streamed from the file: a length field claiming gigabytes then reads what is
        # there, and fails
        with path.open("rb") as f:
            return f.read(MAX_PICKLE_BYTES + 1)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_pickle_lengths(data: bytes, path: str | Path) -> None:
    """Every length field in ``data`` checked against the bytes present (pickletools reads only what is there).

    The C unpickler allocates whatever a BINBYTES8 or BYTEARRAY8 claims, a terabyte included, before reading it;
    after this check none claims more than the file holds. Runs no code: any bytes may be checked, in any thread.
    """
    with _damage_reported(path):
        _scan_lengths(data)


def _argument_layouts() -> dict[int, tuple[int, int]]:
    """opcode -> (kind, size), from pickletools' own table: kind 0 a fixed-size argument of ``size`` bytes, 1 a
    ``size``-byte little-endian length then that many bytes (2: the length signed), 3 ``size`` lines ending in a
    newline."""
    prefixes = {pickletools.TAKEN_FROM_ARGUMENT1: (1, 1), pickletools.TAKEN_FROM_ARGUMENT4: (2, 4),
                pickletools.TAKEN_FROM_ARGUMENT4U: (1, 4), pickletools.TAKEN_FROM_ARGUMENT8U: (1, 8)}
    layouts = {}
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            layouts[ord(op.code)] = (0, 0)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            layouts[ord(op.code)] = (3, 2 if arg.name == "stringnl_noescape_pair" else 1)
        elif arg.n >= 0:
            layouts[ord(op.code)] = (0, arg.n)
        else:
            layouts[ord(op.code)] = prefixes[arg.n]
    return layouts


_LAYOUTS = _argument_layouts()
_STOP = ord(pickle.STOP)


def _scan_lengths(data: bytes) -> None:
    """Walk the opcodes up to STOP as :func:`pickletools.genops` does, checking only that each argument, and each
    length an argument claims, fits in the bytes that are there (ValueError if not). genops also decodes every
    argument: on CIFAR-100's test file it takes 68-73 ms, this 8-10 ms; the unpickler checks the values."""
    pos, end, layouts = 0, len(data), _LAYOUTS
    while pos < end:
        code = data[pos]
        pos += 1
        layout = layouts.get(code)
        if layout is None:
            raise ValueError(f"unknown opcode {code:#04x} at byte {pos - 1}")
        kind, size = layout
        if kind == 0:
            pos += size
        elif kind == 3:
            for _ in range(size):
                newline = data.find(b"\n", pos)
                if newline < 0:
                    raise ValueError(f"no newline after the argument at byte {pos}")
                pos = newline + 1
        else:
            length = int.from_bytes(data[pos : pos + size], "little", signed=kind == 2)
            pos += size
            if length < 0:
                raise ValueError(f"negative length {length} at byte {pos - size}")
            pos += length
        if pos > end:
            raise ValueError(f"an argument runs past the end of the data ({pos - end} bytes missing)")
        if code == _STOP:
            return
    raise ValueError("pickle exhausted before seeing STOP")


def loads_checked_pickle(data: bytes, path: str | Path) -> dict:
    """Unpickle ``data`` (the bytes of ``path``, already through :func:`check_pickle_lengths`) with the allow-list."""
    with _damage_reported(path):
        obj = _plain(_RestrictedUnpickler(io.BytesIO(data), name=str(path)).load())
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def safe_load_pickle(path: str | Path) -> dict:
    """Load a CIFAR-style pickle (a dict) without running arbitrary code.

    Raises UnsafePickleError for any global outside the allow-list, and DatasetError for a file
    that is missing, too large, truncated or not a dict.
    """
    data = read_pickle_file(path)
    check_pickle_lengths(data, path)
    return loads_checked_pickle(data, path)


@contextlib.contextmanager
def _damage_reported(path):
    """Failures inside the pickle as one DatasetError naming the file (allow-list refusals pass as they are)."""
    try:
        yield
    except CliplensError:
        raise
    except _Refused as exc:
        raise DatasetError(f"refusing to load {path}: it holds {exc} (a tampered or non-CIFAR file)") from None
    except RecursionError:
        raise DatasetError(f"refusing to load {path}: nested too deeply for a CIFAR file") from None
    except Exception as exc:
        # Only allow-listed callables can run, so any other failure (EOFError, UnpicklingError,
        # a ValueError from numpy on a short buffer, ...) means the bytes are damaged.
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # keep the message one line
        raise DatasetError(
            f"{path} is truncated or corrupt ({reason}); re-download it"
        ) from exc
