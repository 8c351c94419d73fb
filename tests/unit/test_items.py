"""cliplens.items reads items.parquet as pyarrow itself would convert it, column by column, without pandas."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cliplens.errors import StoreError
from cliplens.items import LazyItems
from cliplens.store import write_items

COLUMNS = {
    "id": np.arange(5, dtype=np.int64),
    "ref": ["a.png", "b/é.jpg", "", "🚜.png", "x"],
    "score": np.array([0.5, -1.0, 2.5, 0.0, 1e-9], np.float32),
    "caption": [None, "a caption", None, "emoji 🦭", ""],
    "meta": [None] * 5,  # an all-null column (a folder without JSON sidecars)
    "flag": [True, False, True, True, False],
    "maybe": [1, None, 3, None, 5],  # a number column with nulls
}


def test_columns_equal_pyarrows_own_conversion(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "items.parquet"
    write_items(path, COLUMNS)
    items = LazyItems(path)
    table = pq.read_table(path)
    assert list(items) == list(COLUMNS) and len(items) == len(COLUMNS) and items.num_rows == 5
    for name in COLUMNS:
        want = table.column(name).to_numpy(zero_copy_only=False)
        got = items[name]
        assert got.dtype == want.dtype, name
        assert [None if v is None or v != v else v for v in got.tolist()] == \
               [None if v is None or v != v else v for v in want.tolist()], name
    assert "ref" in items and "nope" not in items
    with pytest.raises(KeyError):
        items["nope"]


def test_reading_numbers_and_strings_does_not_import_pandas(tmp_path):
    path = tmp_path / "items.parquet"
    write_items(path, {k: v for k, v in COLUMNS.items() if k not in ("flag", "maybe")})
    code = (f"import sys; from cliplens.items import LazyItems; it = LazyItems({str(path)!r}); "
            "[it[c] for c in it]; print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_an_unreadable_file_is_a_store_error(tmp_path):
    path = tmp_path / "items.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(StoreError, match="cannot read"):
        LazyItems(path)


def test_columns_read_from_many_threads_at_once(tmp_path):
    """serve and the thumbnail writer read columns from threads: first reads of one file must not race
    (two concurrent pyarrow reads of the same ParquetFile hung the indexer once)."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "items.parquet"
    n = 20_000
    cols = {f"c{j}": np.arange(n, dtype=np.int64) * j for j in range(8)}
    cols["s"] = [f"row {i}" for i in range(n)]
    write_items(path, cols)
    for _ in range(5):
        items = LazyItems(path)
        names = [*cols] * 4
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda name: items[name], names))
        for name, value in zip(names, got):
            assert list(value[:3]) == list(cols[name][:3]) and len(value) == n
