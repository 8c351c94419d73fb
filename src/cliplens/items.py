"""An index's ``items.parquet`` as numpy columns, read lazily and without pandas.

pyarrow converts columns to numpy through pandas (``ChunkedArray.to_numpy``), and importing pandas costs
about 1.5 s, more than a whole torch-free query. Here numbers become a zero-copy view of the column's buffer and
strings a numpy object array of Python strings, as before; anything else (nulls in a number column, nested
types) goes through pyarrow's own conversion. :class:`LazyItems` reads the footer when opened and each column the
first time it is used, so a query reads only the columns its hits show (label, superclass, ref).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np

from cliplens.errors import StoreError


def column_to_numpy(column) -> np.ndarray:
    """A pyarrow (Chunked)Array -> numpy: numbers as a read-only view, strings as an object array."""
    import pyarrow as pa
    import pyarrow.types as pt

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = arr.type
    if arr.null_count == 0 and (pt.is_integer(kind) or pt.is_floating(kind)):
        dtype = np.dtype(kind.to_pandas_dtype())
        return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
    if pt.is_integer(kind) or pt.is_floating(kind) or pt.is_boolean(kind) or pt.is_temporal(kind):
        return arr.to_numpy(zero_copy_only=False)  # nulls in a number column, booleans, dates: pyarrow's own
    out = np.empty(len(arr), dtype=object)  # strings, all-null columns (no sidecars), nested values
    out[:] = arr.to_pylist()
    return out


def _unreadable(path: Path, exc: Exception) -> StoreError:
    return StoreError(f"cannot read {path} ({type(exc).__name__}); rebuild the index with `cliplens index`")


class LazyItems(Mapping):
    """Column name -> numpy array, each column read from the parquet file on first use and then kept."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
            self.num_rows = int(self._file.metadata.num_rows)
            self._names = tuple(self._file.schema_arrow.names)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
            raise _unreadable(self.path, exc) from None
        self._columns: dict[str, np.ndarray] = {}
        # pyarrow's ParquetFile is not safe to read from two threads at once (seen: both hang): one read at a time
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._columns:
            if name not in self._names:
                raise KeyError(name)
            with self._lock:
                if name not in self._columns:  # another thread may have read it while this one waited
                    try:
                        self._columns[name] = column_to_numpy(self._file.read(columns=[name]).column(0))
                    except Exception as exc:
                        raise _unreadable(self.path, exc) from None
        return self._columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
