"""Search only: exact top-k over N random unit vectors (dim 512), float32 and float16 storage.

Ours: ``cliplens.index.ExactIndex.search`` (one matrix product, chunked upcast for float16, argpartition top-k).
Reference: the naive numpy a user writes, ``np.argsort(-(emb @ q))[:k]`` (full sort; for float16 storage
numpy upcasts the whole matrix on every query). Single queries, and batches of 64 queries (the reference
loops over them). Peak RSS is the process's high-water mark while that size and dtype was built and searched.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from bench.common import Report, peak_rss_mb, peak_rss_reset, percentile, ratio, rss_mb
from bench.data import unit_vectors

K = 10
BATCH = 64


def _reference(emb: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.stack([np.argsort(-(emb @ q), kind="stable")[:K] for q in queries])


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run(*, sizes: list[int], reps: int, dim: int = 512, command: str) -> Report:
    from cliplens.index import ExactIndex

    report = Report("search", f"Search only: exact top-{K} (ms), dim {dim}",
                    {"command": command, "sizes": sizes, "reps": reps, "dim": dim, "k": K, "batch": BATCH})
    queries = unit_vectors(BATCH, dim, seed=99)
    rows, data = [], {}
    can_reset = peak_rss_reset()
    for n in sizes:
        for dtype in ("float32", "float16"):
            gc.collect()
            peak_rss_reset()
            before = rss_mb()
            emb = unit_vectors(n, dim, seed=1, dtype=np.dtype(dtype))
            index = ExactIndex(emb)
            agree = np.array_equal(index.search(queries[:4], K)[1], _reference(emb, queries[:4]))
            r = max(3, reps if n < 1_000_000 else max(3, reps // 4))
            single_ours = _time(lambda: index.search(queries[:1], K), r * 4)
            single_ref = _time(lambda: _reference(emb, queries[:1]), r * 4 if n < 1_000_000 else r)
            batch_ours = _time(lambda: index.search(queries, K), r)
            batch_ref = _time(lambda: _reference(emb, queries), max(1, r // 3)) if n <= 100_000 else None
            peak = peak_rss_mb()
            entry = {"single_ms": {"ours_p50": percentile(single_ours, 50),
                                   "reference_p50": percentile(single_ref, 50)},
                     "batch_ms": {"ours_p50": percentile(batch_ours, 50),
                                  "reference_p50": percentile(batch_ref, 50) if batch_ref else None},
                     "same_ids_as_reference": bool(agree), "stored_mb": emb.nbytes / 2**20,
                     "rss_before_mb": before, "peak_rss_mb": peak}
            data[f"{n}/{dtype}"] = entry
            s, b = entry["single_ms"], entry["batch_ms"]
            rows.append([f"{n:,}", dtype, f"{s['ours_p50']:.2f}", f"{s['reference_p50']:.2f}",
                         ratio(s["reference_p50"], s["ours_p50"]), f"{b['ours_p50']:.1f}",
                         f"{b['reference_p50']:.1f}" if b["reference_p50"] else "not run",
                         f"{b['ours_p50'] / BATCH:.3f}", f"{emb.nbytes / 2**20:.0f}",
                         f"{peak:.0f}" if can_reset else f"{peak:.0f} (process)", "yes" if agree else "NO"])
            emb = index = None  # free the vectors before the next size
    report.table(f"p50 latency in ms (k = {K}); batch = {BATCH} queries at once",
                 ["N", "storage", "1 query: ours", "1 query: reference", "speed-up", f"batch {BATCH}: ours",
                  f"batch {BATCH}: reference", "ours per query in batch", "stored MiB", "peak RSS MiB", "same ids"],
                 rows)
    report.data["search"] = data
    report.notes.append("reference = `np.argsort(-(emb @ q))[:k]` per query; its batch of 64 is run only "
                        "up to 100k (at 1M it takes minutes).")
    report.notes.append("peak RSS = the process's resident high-water mark (VmHWM, reset before each row), "
                        "including the Python process itself.")
    return report
