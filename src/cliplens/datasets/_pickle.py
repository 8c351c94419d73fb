"""A restricted unpickler for the CIFAR python files.

Unpickling runs whatever callables the pickle names, so a tampered ``test`` file could run
``os.system`` the moment it is loaded. The CIFAR pickles only ever need four globals: numpy's
array reconstructor, ``numpy.ndarray``, ``numpy.dtype`` and ``_codecs.encode`` (which Python 3
writes for ``bytes`` under protocol 2). Everything else is refused before it is looked up.
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.errors import CliplensError, DatasetError, UnsafePickleError

# The real files are ~160 MB (CIFAR-100 train); anything past this is not a CIFAR pickle,
# and refusing it early avoids reading gigabytes into memory.
MAX_PICKLE_BYTES = 1 << 30

# numpy's array reconstructor, taken from ndarray's own pickling hook rather than imported:
# on numpy 2 ``import numpy.core`` warns (and warnings are errors in our tests), and on
# numpy 1.x there is no ``numpy._core``. The real files were written under numpy 1.x and name
# ``numpy.core.multiarray``; files written by numpy 2 name ``numpy._core.multiarray``.
_reconstruct = np.empty(0).__reduce__()[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


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


def safe_load_pickle(path: str | Path) -> dict:
    """Load a CIFAR-style pickle (a dict) without running arbitrary code.

    Raises UnsafePickleError for any global outside the allow-list, and DatasetError for a file
    that is missing, too large, truncated or not a dict.
    """
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
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, name=str(path)).load()
    except CliplensError:
        raise
    except Exception as exc:
        # Only allow-listed callables can run, so any other failure (EOFError, UnpicklingError,
        # a ValueError from numpy on a short buffer, ...) means the bytes are damaged.
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # keep the message one line
        raise DatasetError(
            f"{path} is truncated or corrupt ({reason}); re-download it"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj
