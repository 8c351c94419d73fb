"""Exact search: one matrix product and a partial sort. The default backend and the test oracle."""

from __future__ import annotations

import numpy as np

from cliplens.metrics import topk_indices

# Score this many rows at a time so large float16 stores are upcast chunk by chunk, never whole (1M x 512 x 4 B = 2 GB).
_CHUNK_ROWS = 65536
# A float16 store up to this size is upcast once, at open: numpy has no fast float16 matmul (10k: 10 ms -> 0.6 ms).
_UPCAST_BYTES = 256 << 20


class ExactIndex:
    def __init__(self, embeddings: np.ndarray):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {embeddings.shape}")
        self.embeddings = embeddings
        if embeddings.dtype != np.float32 and embeddings.shape[0] * embeddings.shape[1] * 4 <= _UPCAST_BYTES:
            self.embeddings = np.asarray(embeddings, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.embeddings)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """float32 (Q, N) cosine similarities of unit queries with every stored unit vector."""
        queries = np.asarray(queries, dtype=np.float32)
        emb = self.embeddings
        if emb.dtype == np.float32 and len(emb) <= _CHUNK_ROWS:
            return queries @ emb.T
        out = np.empty((len(queries), len(emb)), dtype=np.float32)
        for lo in range(0, len(emb), _CHUNK_ROWS):
            block = np.asarray(emb[lo : lo + _CHUNK_ROWS], dtype=np.float32)
            out[:, lo : lo + len(block)] = queries @ block.T
        return out

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(queries)
        scores = self.scores(queries)
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
            k = min(k, int(allowed.sum()))
        k = min(k, scores.shape[1])
        ids = topk_indices(scores, k) if k else np.zeros((len(queries), 0), np.int64)
        return np.take_along_axis(scores, ids, axis=1), ids

