"""Vector indexes: every backend answers the same question with the same types.

``search(queries, k)`` takes float32 (Q, D) unit query vectors and returns ``(scores, ids)``, both (Q, k'):
cosine similarities (higher is better) sorted descending, ties broken by the lower id, with k' = min(k, N)
(or fewer where a filter leaves fewer candidates; missing places hold id -1 and score -inf).
The exact numpy index is the default and the oracle every other backend is tested against.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cliplens.index.exact import ExactIndex


class VectorIndex(Protocol):
    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``allowed``: optional bool mask (N,) of items that may be returned (filters)."""
        ...


from cliplens.index.backends import BACKENDS, build_index, open_index  # noqa: E402  (FAISS/Milvus load lazily)

__all__ = ["BACKENDS", "ExactIndex", "VectorIndex", "build_index", "open_index"]
