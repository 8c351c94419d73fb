"""pgvector (PostgreSQL 18, embedded) beside FAISS HNSW32 and exact numpy: recall@10, p50/p99, build, size.

    python bench/bench_pg.py [--sizes 100000] [--dim 512] [--queries 200] [--work DIR] [--name pg] [--progress]

Data: bench_ann.py's clustered unit vectors (same generator, same seeds, same queries), written as a labelled
store: every vector gets a group 0..99 drawn at random (independent of its cluster), so ``label=group_7`` is a
1%-selective filter. Every backend is built from the store as ``cliplens build-index`` builds it; queries go one at
a time through the same ``search()`` a ``Searcher`` calls, each query to every backend before the next (so load
from elsewhere on this shared machine hits them alike). pgvector runs in the embedded server (Unix socket), so its
latencies include a round trip per query and the exact re-scoring of its candidates, like the others.

Unfiltered: exact numpy, FAISS HNSW32 (efConstruction 40) at efSearch 40/64/128, pgvector HNSW (m 16,
ef_construction 64, pgvector's defaults) at hnsw.ef_search 40/64/128, forced through the index.
Filtered (label = one group, 1%): exact numpy over the mask, FAISS HNSW32 with the mask as an ID selector,
pgvector forced through the HNSW index with ``hnsw.iterative_scan`` off (pgvector before 0.8: the index hands back
ef_search candidates, the filter keeps ~1% of them) and relaxed_order (it keeps scanning until k rows pass), both
without cliplens's exact fall-back so the index's own behaviour shows, and pgvector as the planner chooses (auto).
"hits" is the mean number of results a query returned (k = 10 asked).

Writes ``<out>/<name>.json`` and ``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_ann import K, centres_for, dir_mb, interleaved, pct, recall_at_k, sample, warm  # noqa: E402

GROUPS = 100


def labelled_store(root: Path, n: int, dim: int, seed: int = 0):
    """bench_ann's clustered store (same vectors for the same n, dim, seed) with a random group label per vector."""
    from cliplens.store import IndexStore, IndexWriter

    if (root / "CURRENT").is_file() or (root / "manifest.json").is_file():  # made by an earlier run
        return IndexStore.open(root)
    writer = IndexWriter(root=root, identity={"source": f"clustered-labelled-{n}x{dim}", "seed": seed, "count": n,
                                              "dtype": "float32"}, dim=dim)
    writer.start()
    rng = np.random.default_rng(seed)
    centres = centres_for(n, dim)
    for lo in range(0, n, 131072):
        writer.write(lo, sample(rng, min(131072, n - lo), dim, centres))
    writer.checkpoint(n)
    labels = np.random.default_rng(seed + 7).integers(0, GROUPS, n)
    writer.finalize(items={"id": np.arange(n, dtype=np.int64), "ref": [f"v{i}" for i in range(n)],
                           "label": labels.astype(np.int64)},
                    manifest={"model": {"name": "random"}, "class_names": [f"group_{i}" for i in range(GROUPS)]})
    return IndexStore.open(root)


def pg_sizes(index) -> dict:
    conn, t = index.conn, index.table
    total, heap, vec = conn.execute(
        "SELECT pg_total_relation_size(%s::regclass), pg_relation_size(%s::regclass), "
        "pg_relation_size(%s::regclass)",
        (t, t, t[:55] + "_vec")).fetchone()
    return {"table_mb": round(heap / 2**20, 1), "vector_index_mb": round(vec / 2**20, 1),
            "total_mb": round(total / 2**20, 1)}


def bench(store, queries: np.ndarray, args) -> list[dict]:
    from cliplens.index import ExactIndex, build_index, open_index
    from cliplens.query import Where

    n = len(store)
    exact = ExactIndex(store.embeddings)
    group = 7
    mask = store.labels == group
    where = (Where("label", (f"group_{group}",)),)
    truth = exact.search(queries, K)[1]
    truth_f = exact.search(queries, K, allowed=mask)[1]
    builds: dict[str, dict] = {}

    reused = args.reuse_builds.get(str(n)) if args.reuse_builds else None
    t0 = time.perf_counter()
    if reused:  # the indexes an earlier run built over this same store (its build times come from its record)
        hnsw = open_index(store, "faiss", factory="HNSW32")
        builds["faiss"] = dict(reused["faiss"])
    else:
        hnsw = build_index(store, "faiss", factory="HNSW32", progress=args.progress)
        builds["faiss"] = {"build_s": round(time.perf_counter() - t0, 1),
                           "size_mb": round(hnsw.paths[0].stat().st_size / 2**20, 1)}
    print(f"  FAISS HNSW32 built in {builds['faiss']['build_s']} s", flush=True)
    if not reused:
        shutil.rmtree(store.root / "pg", ignore_errors=True)  # a fresh embedded server: the build is measured whole
    t0 = time.perf_counter()
    pg = build_index(store, "pgvector", uri="embedded", index="hnsw", btree=False, progress=args.progress,
                     scan="index")  # reused: the table mirrors this store already, so this only checks it
    builds["pgvector"] = {"build_s": reused["pgvector"]["build_s"] if reused else round(time.perf_counter() - t0, 1),
                          **pg_sizes(pg), "data_folder_mb": round(dir_mb(store.root / "pg"), 1)}
    print(f"  pgvector HNSW built in {builds['pgvector']['build_s']} s ({builds['pgvector']})", flush=True)

    def pg_search(ef, *, filtered=False, scan="index", iterative="relaxed_order"):
        def run(q):
            pg.iterative_scan, pg.fallback = iterative, False
            return pg.search(q, K, ef_search=ef, scan=scan, where=where if filtered else ())
        return run

    configs = [("exact numpy", "", False, lambda q: exact.search(q, K))]
    configs += [("FAISS HNSW32", f"efSearch {ef}", False, lambda q, ef=ef: hnsw.search(q, K, ef_search=ef))
                for ef in (40, 64, 128)]
    configs += [("pgvector HNSW m16 efc64", f"ef_search {ef}", False, pg_search(ef)) for ef in (40, 64, 128)]
    configs += [("exact numpy", "1% filter", True, lambda q: exact.search(q, K, allowed=mask)),
                ("FAISS HNSW32", "1% filter, efSearch 64", True, lambda q: hnsw.search(q, K, allowed=mask,
                                                                                        ef_search=64)),
                ("pgvector HNSW m16 efc64", "1% filter, ef_search 40, iterative_scan off", True,
                 pg_search(40, filtered=True, iterative="off")),
                ("pgvector HNSW m16 efc64", "1% filter, ef_search 40, iterative_scan relaxed_order", True,
                 pg_search(40, filtered=True))]
    plans = {"unfiltered index": pg.explain(queries[0], scan="index"),
             "filtered index": pg.explain(queries[0], where=where, scan="index")}
    warm(store.files / "embeddings.npy", hnsw.paths[0])
    load = os.getloadavg()[0]
    times, ids = interleaved([c[3] for c in configs], queries)
    # then with a b-tree on the label (build-index's default), the planner's own choice, beside exact again
    t0 = time.perf_counter()
    pg.close()
    pg = build_index(store, "pgvector", uri="embedded", index="hnsw", btree=True, progress=False)
    builds["pgvector"]["btree_s"] = round(time.perf_counter() - t0, 1)
    plans["filtered auto, label b-tree"] = pg.explain(queries[0], where=where, scan="auto")
    second = [("exact numpy", "1% filter (second round)", True, lambda q: exact.search(q, K, allowed=mask)),
              ("pgvector, label b-tree", "1% filter, planner's choice (auto)", True,
               pg_search(40, filtered=True, scan="auto"))]
    times2, ids2 = interleaved([c[3] for c in second], queries)
    rows = []
    for (backend, setting, filtered, _), t, found in zip(configs + second, times + times2, ids + ids2):
        want = truth_f if filtered else truth
        row = {"n": n, "dim": store.dim, "backend": backend, "setting": setting, "filtered": filtered,
               "recall@10": round(recall_at_k(found, want), 4), "hits": round(float((found >= 0).sum(1).mean()), 2),
               "p50_ms": round(pct(t, 50), 3), "p99_ms": round(pct(t, 99), 3), "load_average": round(load, 2)}
        rows.append(row)
        print(f"  {backend:<24} {setting:<54} recall {row['recall@10']:.3f} hits {row['hits']:5.2f} "
              f"p50 {row['p50_ms']:8.3f} ms p99 {row['p99_ms']:8.3f} ms", flush=True)
    pg.close()
    return rows, builds, plans


def markdown(result: dict) -> str:
    lines = ["# pgvector beside FAISS HNSW32 and exact numpy", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Single queries, k = {K}, {result['queries']} queries after 5 warm-up, "
             "taking turns; recall@10 against exact numpy (filtered: against exact numpy over the filtered set); "
             "hits = mean results returned per query.", ""]
    for size in result["sizes"]:
        rows = [r for r in result["rows"] if r["n"] == size]
        b = result["builds"][str(size)]
        base = {False: rows[0]["p50_ms"], True: next(r["p50_ms"] for r in rows if r["filtered"])}
        second = next(r["p50_ms"] for r in rows if r["setting"].endswith("(second round)"))
        lines += [f"## clustered {size:,} x {rows[0]['dim']}", "",
                  f"Builds: FAISS HNSW32 {b['faiss']['build_s']} s, {b['faiss']['size_mb']} MB; pgvector (COPY + HNSW "
                  f"+ ANALYZE, one transaction) {b['pgvector']['build_s']} s, table {b['pgvector']['table_mb']} MB + "
                  f"HNSW index {b['pgvector']['vector_index_mb']} MB (total with TOAST and btrees "
                  f"{b['pgvector']['total_mb']} MB; data folder {b['pgvector']['data_folder_mb']} MB); adding the "
                  f"label b-tree afterwards (a re-sync that changed no row) {b['pgvector']['btree_s']} s. The last two "
                  "rows ran as a second round after it (their ratio is against that round's exact numpy)."
                  + (" The FAISS and pgvector builds were made by an earlier run of this command over the same "
                     "--work folder, which stopped after them; their times are that run's (--reuse-builds), the "
                     "sizes are measured now." if (result.get("reused_builds") or {}).get(str(size)) else ""), "",
                  "| backend | setting | recall@10 | hits | p50 ms | p99 ms | p50 vs exact |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            ref = second if r["setting"].endswith(("(second round)", "(auto)")) else base[r["filtered"]]
            lines.append(f"| {r['backend']} | {r['setting']} | {r['recall@10']:.3f} | {r['hits']:.2f} | "
                         f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {ref / r['p50_ms']:.2f}x |")
        lines += ["", "Plans (EXPLAIN, first query):", ""]
        for name, plan in result["plans"][str(size)].items():
            lines += [f"- {name}: `" + " / ".join(ln.strip().split("  (cost")[0] for ln in plan.splitlines()
                                                  if "->" in ln or ln.startswith(("Limit", "Index", "Sort")))[:300] + "`"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="pg")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--reuse-builds", type=Path, default=None,
                   help="a JSON file {size: {faiss: {build_s, size_mb}, pgvector: {build_s}}} recording an earlier "
                        "run's builds over the same --work folder: open its FAISS index and table instead of "
                        "building them again (the report says so)")
    args = p.parse_args()
    args.reuse_builds = json.loads(args.reuse_builds.read_text()) if args.reuse_builds else None
    work = args.work or Path(tempfile.mkdtemp(prefix="cliplens-pg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    result = {"command": "python bench/bench_pg.py " + " ".join(sys.argv[1:]), "queries": args.queries,
              "machine": f"{cpu}, {os.cpu_count()} cores (shared), load average {os.getloadavg()[0]:.1f} at start",
              "sizes": sizes, "rows": [], "builds": {}, "plans": {}, "reused_builds": args.reuse_builds}
    for n in sizes:
        store = labelled_store(work / f"clustered-labelled-{n}-{args.dim}", n, args.dim)
        print(f"clustered {n:,} x {args.dim}", flush=True)
        queries = sample(np.random.default_rng(1), args.queries, args.dim, centres_for(n, args.dim))
        rows, builds, plans = bench(store, queries, args)
        result["rows"] += rows
        result["builds"][str(n)], result["plans"][str(n)] = builds, plans
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(result) + "\n")
    print(f"wrote {args.out / (args.name + '.md')}")


if __name__ == "__main__":
    main()
