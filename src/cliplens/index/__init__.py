"""Vector indexes: every backend answers the same question with the same types.

``search(queries, k)`` takes float32 (Q, D) unit query vectors and returns ``(scores, ids)``, both (Q, k'):
cosine similarities (higher is better) sorted descending, ties broken by the lower id, with k' = min(k, N)
(or fewer where a filter leaves fewer candidates; missing places hold id -1 and score -inf).
The exact numpy index is the default and the oracle every other backend is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from cliplens.index.backends import BACKENDS, build_index, open_index
    from cliplens.index.exact import ExactIndex


class VectorIndex(Protocol):
    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``allowed``: optional bool mask (N,) of items that may be returned (filters)."""
        ...


_LAZY = {"ExactIndex": "cliplens.index.exact", "BACKENDS": "cliplens.index.backends",
         "build_index": "cliplens.index.backends", "open_index": "cliplens.index.backends"}


def __getattr__(name: str):
    """The backends load on first use: the CLI's parser reads ``cliplens.index.registry`` without numpy (--help)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "ExactIndex", "VectorIndex", "build_index", "open_index"]
