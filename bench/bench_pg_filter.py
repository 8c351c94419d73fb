"""The 1%-filter follow-up to bench_pg.py, on the 300k table it left: exact numpy vs pgvector with --pg-scan exact
(sequential scan, exact sort of the ~3,000 matching rows) and the planner's choice at ef_search 200.

    python bench/bench_pg_filter.py WORK_DIR [N] [QUERIES]     # after bench_pg.py --sizes N --work WORK_DIR

Same store, queries (the first QUERIES of bench_pg.py's) and filter (label = group_7); cliplens's exact fall-back is
off, so each row shows what the database itself returned. Prints a Markdown table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_ann import centres_for, interleaved, pct, recall_at_k, sample  # noqa: E402


def main() -> None:
    from cliplens.index import ExactIndex, open_index
    from cliplens.query import Where
    from cliplens.store import IndexStore

    work, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300_000
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    store = IndexStore.open(work / f"clustered-labelled-{n}-512")
    pg = open_index(store, "pgvector", uri="embedded")
    pg.fallback = False
    queries = sample(np.random.default_rng(1), 200, 512, centres_for(n, 512))[:count]
    mask, where = store.labels == 7, (Where("label", ("group_7",)),)
    exact = ExactIndex(store.embeddings)
    truth = exact.search(queries, 10, allowed=mask)[1]
    runs = {"exact numpy, 1% filter": lambda q: exact.search(q, 10, allowed=mask),
            "pgvector --pg-scan exact, 1% filter": lambda q: pg.search(q, 10, where=where, scan="exact"),
            "pgvector auto, --ef-search 200, 1% filter": lambda q: pg.search(q, 10, where=where, ef_search=200)}
    times, ids = interleaved(list(runs.values()), queries)
    print(f"{n:,} clustered x 512, {count} queries, load average {os.getloadavg()[0]:.1f}\n")
    print("| backend, setting | recall@10 | hits | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for name, t, found in zip(runs, times, ids):
        print(f"| {name} | {recall_at_k(found, truth):.3f} | {(found >= 0).sum(1).mean():.2f} | {pct(t, 50):.1f} | "
              f"{pct(t, 99):.1f} |")
    pg.close()


if __name__ == "__main__":
    main()
