"""Index backends against exact numpy: recall@10, single-query latency p50/p99, build time and size.

    python bench/bench_ann.py [--sizes 10000,100000,1000000] [--dim 512] [--queries 200]
                              [--cifar b32|tiny|none] [--milvus-max 100000] [--work DIR] [--out bench/results]
                              [--backends flat,hnsw,ivfpq,milvus] [--name ann] [--progress]

Data: random unit vectors (seeded; queries drawn independently from the same distribution, the hardest case
for approximate search because nothing is clustered), clustered synthetic unit vectors (``--clustered-sizes``:
about 250 per cluster, a vector at cosine ~0.7 from its centre, so neighbours stand out as in real embeddings),
and the CIFAR stand-in index: a CIFAR-100-format test set
of 10,000 synthetic images embedded with the real ViT-B-32-quickgelu architecture and random weights (no real
weights can be downloaded here). Each store is written to disk in the real index format and every backend is
built from it exactly as ``cliplens build-index`` does, then queried one query at a time through the same
``search()`` a ``Searcher`` calls (FAISS and Milvus results include the exact rescoring of their candidates).
Every backend of a data set is built first; then the queries go round all of them in turn (each query to each
backend before the next query), so load from elsewhere on a shared machine hits them alike, and files are read
once beforehand, so latencies are steady-state (page cache warm), not a memory-mapped index's first queries.

Backends: exact numpy (the oracle), FAISS Flat, HNSW32 (efSearch 16/64/128, plus 256/512 to show where recall
saturates), IVF-PQ (``IVF{nlist},PQ{m}``, nprobe 8/32, plus nprobe 32/64/128 with 10x and nprobe 32 with 30x
candidates re-ranked), Milvus Lite
(FLAT, up to ``--milvus-max`` vectors: its bulk insert runs at a few thousand vectors per second here).

``--backends`` picks which of them run beside exact numpy (always there: it is the oracle and the baseline), e.g.
``--sizes '' --clustered-sizes 1000000 --cifar none --backends milvus --milvus-max 1000000 --name ann.milvus1m``
for Milvus Lite alone at 1M. Memory: besides the peak RSS growth while building (which counts the store's pages a
build reads through its memory map), a sampler records the peak *anonymous* memory (``RssAnon``: heap, not
file pages) while building and while querying, which is what an in-process backend itself holds (Milvus Lite 3
runs inside this process, as Python threads).

Writes ``<out>/<name>.json`` (every row and the machine) and ``<out>/<name>.md`` (the tables); ``--name`` ann.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_ann.py` from a checkout: the bench package is importable
    sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_reset, rss_mb  # noqa: E402  (after the path set-up above)

K = 10


# --------------------------------------------------------------------------- measuring


class AnonPeak:
    """Peak ``RssAnon`` (MB) of this process while the ``with`` block runs, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, rss_mb("RssAnon"), threading.Event()

    def __enter__(self) -> "AnonPeak":
        self.start = self.peak = rss_mb("RssAnon")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_mb("RssAnon"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb("RssAnon"))


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def warm(*paths: Path) -> None:
    """Read files once so a memory-mapped index or store is in the page cache: steady-state, not cold-start, latency."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def interleaved(searches: list, queries: np.ndarray, warmup: int = 5) -> tuple[list[list[float]], list[np.ndarray]]:
    """Per-query wall times (ms) and (Q, K) ids of each ``search(q[None])``, taking turns query by query.

    Taking turns means a burst of load from elsewhere on a shared machine slows every backend alike, so the
    ratios between them hold even when the absolute times drift.
    """
    for q in queries[:warmup]:
        for search in searches:
            search(q[None])
    times = [[] for _ in searches]
    ids = [np.full((len(queries), K), -1, dtype=np.int64) for _ in searches]
    for row, q in enumerate(queries):
        for j, search in enumerate(searches):
            t0 = time.perf_counter()
            _, found = search(q[None])
            times[j].append((time.perf_counter() - t0) * 1000)
            ids[j][row, : found.shape[1]] = found[0]
    return times, ids


def recall_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(ids, truth)]))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --------------------------------------------------------------------------- data


def sample(rng, n: int, dim: int, centres: np.ndarray | None) -> np.ndarray:
    """Unit vectors: uniform on the sphere, or (``centres``) a cluster centre plus noise of the same norm, so a
    vector's cosine with its centre is about 0.7 and two vectors of one cluster score about 0.5 (neighbours that
    stand out, as in real embeddings; uniform vectors in 512 dimensions are all nearly orthogonal)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if centres is not None:
        x += centres[rng.integers(0, len(centres), n)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def centres_for(n: int, dim: int) -> np.ndarray:
    clusters = max(16, n // 250)  # about 250 vectors a cluster
    return sample(np.random.default_rng(12345), clusters, dim, None)


def random_store(root: Path, n: int, dim: int, seed: int, *, clustered: bool = False):
    """A complete store of ``n`` seeded unit vectors, written in chunks (1M x 512 is 2 GB)."""
    from cliplens.store import IndexStore, IndexWriter, read_current_manifest

    if read_current_manifest(root) is not None:
        return IndexStore.open(root)
    kind = "clustered" if clustered else "random"
    writer = IndexWriter(root=root, identity={"source": f"{kind}-{n}x{dim}", "seed": seed, "count": n,
                                              "dtype": "float32"}, dim=dim)
    writer.start()
    rng = np.random.default_rng(seed)
    centres = centres_for(n, dim) if clustered else None
    for lo in range(0, n, 131072):
        writer.write(lo, sample(rng, min(131072, n - lo), dim, centres))
    writer.checkpoint(n)
    writer.finalize(items={"id": np.arange(n, dtype=np.int64), "ref": [f"v{i}" for i in range(n)]},
                    manifest={"model": {"name": "random"}})
    return IndexStore.open(root)


def cifar_store(root: Path, work: Path, which: str, n: int = 10_000):
    """The CIFAR stand-in: a CIFAR-100-format test set of synthetic images, embedded with a stand-in model."""
    from bench import data, standin

    spec = standin.prepare(work / "hf", which)
    folder = data.write_cifar100(work / "cifar", n) if not (work / "cifar" / "cifar-100-python" / "test").is_file() \
        else work / "cifar" / "cifar-100-python"
    from cliplens.sources import load_cifar
    from cliplens.embed import index_labeled
    from cliplens.store import IndexStore

    cifar = load_cifar("cifar100", "test", data_dir=folder.parent, verify=False, progress=False)
    encoder = standin.load_ours(spec)
    _, stats = index_labeled(cifar, encoder, root, batch_size=64, progress=True)
    if stats.count:
        print(f"  embedded {stats.count} images at {stats.images_per_second:.1f} img/s with {spec.label}", flush=True)
    return IndexStore.open(root), spec.label


# --------------------------------------------------------------------------- one data set


def bench_store(name: str, store, queries: np.ndarray, args) -> list[dict]:
    from cliplens.errors import BackendError
    from cliplens.index import ExactIndex, build_index, open_index

    n, dim = len(store), store.dim
    rows: list[dict] = []
    exact = ExactIndex(store.embeddings)
    truth = exact.search(queries, K)[1]  # batched: the oracle

    configs: list[dict] = []  # {backend, setting, search, build_s, size_mb, build_peak_mb}

    def add(backend, setting, search, *, build_s=None, size_mb=None, build_peak_mb=None, anon=None):
        configs.append({"backend": backend, "setting": setting, "search": search, "build_s": build_s,
                        "size_mb": size_mb, "build_peak_mb": build_peak_mb, "anon": anon})

    wanted = set(args.backends)
    anon: dict[str, dict] = {}  # backend setting -> anonymous memory figures (MB)

    def build(backend, **options):
        if args.reuse and backend == "faiss":  # a FAISS index saved by an earlier run over this same store
            try:
                index = open_index(store, backend, **options)
                meta = json.loads(index.paths[1].read_text())
                earlier = [r for r in args.previous if r["dataset"] == name and r["build_peak_rss_mb"] is not None
                           and r["setting"].split(" ")[0] == options["factory"]]  # that build's peak, if recorded
                return index, meta["build_seconds"], earlier[0]["build_peak_rss_mb"] if earlier else None
            except BackendError:
                pass
        peak_rss_reset()
        before = rss_mb()
        t0 = time.perf_counter()
        with AnonPeak() as sampler:
            index = build_index(store, backend, progress=args.progress, **options)
        seconds = time.perf_counter() - t0
        peak = rss_mb("VmHWM") - before
        anon[options.get("factory", backend)] = {"build_peak_anon_mb": round(sampler.peak - sampler.start),
                                                 "after_build_anon_mb": round(rss_mb("RssAnon") - sampler.start)}
        print(f"  built {backend} {options.get('factory', '')} in {seconds:.1f} s (peak RSS growth {peak:.0f} MB, "
              f"anonymous {sampler.peak - sampler.start:.0f} MB)", flush=True)
        return index, seconds, peak

    add("exact", "numpy (memory-mapped store)", lambda q: exact.search(q, K), size_mb=store.embeddings.nbytes / 2**20)
    files = [store.files / "embeddings.npy"]
    if "flat" in wanted:
        flat, secs, peak = build("faiss", factory="Flat")
        add("faiss", "Flat", lambda q: flat.search(q, K), build_s=secs, size_mb=flat.paths[0].stat().st_size / 2**20,
            build_peak_mb=peak)
        files.append(flat.paths[0])
    if "hnsw" in wanted and n <= args.hnsw_max:
        efc = {"ef_construction": args.ef_construction} if args.ef_construction else {}
        hnsw, secs, peak = build("faiss", factory="HNSW32", **efc)
        files.append(hnsw.paths[0])
        label = f"HNSW32 efConstruction {args.ef_construction}" if efc else "HNSW32"
        for ef in (16, 64, 128, 256, 512):
            first = ef == 16
            add("faiss", f"{label} efSearch {ef}", lambda q, ef=ef: hnsw.search(q, K, ef_search=ef),
                build_s=secs if first else None, size_mb=hnsw.paths[0].stat().st_size / 2**20 if first else None,
                build_peak_mb=peak if first else None)
    nlist = args.nlist or max(64, min(4096, 1 << int(round(np.log2(4 * np.sqrt(n))))))
    m = 64 if dim % 64 == 0 and dim >= 128 else max(d for d in (32, 16, 8, 4) if dim % d == 0)
    factory = f"IVF{nlist},PQ{m}"
    if "ivfpq" in wanted:
        ivf, secs, peak = build("faiss", factory=factory)
        files.append(ivf.paths[0])
    for nprobe, k_factor in ((8, 1), (32, 1), (32, 10), (32, 30), (64, 10), (128, 10)) if "ivfpq" in wanted else ():
        first = nprobe == 8

        def search(q, nprobe=nprobe, k_factor=k_factor):
            ivf.k_factor = k_factor
            return ivf.search(q, K, nprobe=nprobe)

        add("faiss", f"{factory} nprobe {nprobe}" + (f", rerank {k_factor}x" if k_factor > 1 else ""), search,
            build_s=secs if first else None, size_mb=ivf.paths[0].stat().st_size / 2**20 if first else None,
            build_peak_mb=peak if first else None)
    milvus = None
    if "milvus" not in wanted:
        pass
    elif n <= args.milvus_max:
        shutil.rmtree(store.root / "milvus", ignore_errors=True)
        milvus, secs, peak = build("milvus", batch_size=5000)
        add("milvus-lite", "FLAT", lambda q: milvus.search(q, K), build_s=secs, size_mb=dir_mb(store.root / "milvus"),
            build_peak_mb=peak, anon=anon["milvus"])
    else:
        print(f"  milvus-lite  skipped at n={n} (--milvus-max {args.milvus_max})", flush=True)

    warm(*files)  # steady state: memory-mapped files in the page cache
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with AnonPeak() as sampler:
        all_times, all_ids = interleaved([c["search"] for c in configs], queries)
    print(f"  {len(queries)} queries x {len(configs)} backends in {time.perf_counter() - t0:.0f} s", flush=True)
    for c in configs:
        if c["anon"] is not None:  # what the process held while querying, over its level before that backend's build
            c["anon"]["query_peak_anon_mb"] = round(c["anon"]["after_build_anon_mb"] + sampler.peak - sampler.start)
    if milvus is not None:
        milvus.close()
    rows: list[dict] = []
    for c, times, ids in zip(configs, all_times, all_ids):
        row = {"dataset": name, "n": n, "dim": dim, "backend": c["backend"], "setting": c["setting"],
               "recall@10": round(recall_at_k(ids, truth), 4), "p50_ms": round(pct(times, 50), 3),
               "p99_ms": round(pct(times, 99), 3), "build_s": None if c["build_s"] is None else round(c["build_s"], 2),
               "size_mb": None if c["size_mb"] is None else round(c["size_mb"], 1),
               "build_peak_rss_mb": None if c["build_peak_mb"] is None else round(c["build_peak_mb"]),
               "load_average": round(load, 2), **(c["anon"] or {})}
        rows.append(row)
        print(f"  {row['backend']:<12} {row['setting']:<34} recall@10 {row['recall@10']:.3f}  "
              f"p50 {row['p50_ms']:9.3f} ms"
              f"  p99 {row['p99_ms']:9.3f} ms  ({rows[0]['p50_ms'] / row['p50_ms']:.1f}x exact)", flush=True)
    return rows


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# ANN backends vs exact numpy", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; load average {m['load_start']} at the "
             f"start, {m['load_end']} at the end (shared machine). faiss {m['faiss']}, pymilvus {m['pymilvus']}, "
             f"milvus-lite {m['milvus_lite']}, numpy {m['numpy']}.", "",
             f"Command: `{result['command']}`", "",
             f"Single queries (k={K}, {result['queries']} queries after 5 warm-up, each query sent to every backend in "
             "turn), recall@10 against exact numpy. "
             "Sizes: exact = the float32 store; FAISS = the saved index file (what is mapped or loaded); "
             "Milvus Lite = its data folder. Build peak = peak RSS growth of this process while building.", ""]
    for name in dict.fromkeys(r["dataset"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["dataset"] == name]
        base = rows[0]["p50_ms"]
        lines += [f"## {name} ({rows[0]['n']:,} x {rows[0]['dim']})", "",
                  "| backend | setting | recall@10 | p50 ms | p99 ms | p50 speed-up vs exact | build s | size MB "
                  "| build peak MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            cell = lambda v, f="{}": "" if v is None else f.format(v)  # noqa: E731
            lines.append(f"| {r['backend']} | {r['setting']} | {r['recall@10']:.3f} | {r['p50_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {base / r['p50_ms']:.1f}x | {cell(r['build_s'])} | "
                         f"{cell(r['size_mb'])} | {cell(r['build_peak_rss_mb'])} |")
        lines.append("")
        for r in rows:
            if "build_peak_anon_mb" in r:
                lines += [f"{r['backend']} {r['setting']}, anonymous memory of this process (RssAnon, heap not file "
                          f"pages; over its level before the build): peak {r['build_peak_anon_mb']:,} MB while "
                          f"building, {r['after_build_anon_mb']:,} MB held after it, peak "
                          f"{r.get('query_peak_anon_mb', 0):,} MB while querying.", ""]
    if result.get("reused"):
        lines += ["FAISS indexes were opened from an earlier run's --work folder (--reuse): their build time and peak "
                  "are the ones measured when that run built them, on this machine with this code; every query "
                  "figure above was measured in this run.", ""]
    if result.get("skipped"):
        lines += ["Not run: " + "; ".join(result["skipped"]), ""]
    return "\n".join(lines)


def machine() -> dict:
    import faiss
    import pymilvus

    try:
        from importlib.metadata import version

        lite = version("milvus-lite")
    except Exception:
        lite = "?"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram / 2**30),
            "python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
            "pymilvus": pymilvus.__version__, "milvus_lite": lite, "load_start": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="random-vector store sizes (comma-separated)")
    p.add_argument("--clustered-sizes", default="", help="sizes of clustered synthetic stores (comma-separated)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--cifar", default="b32", choices=["b32", "tiny", "none"], help="CIFAR stand-in model")
    p.add_argument("--milvus-max", type=int, default=100_000, help="largest store Milvus Lite is built for")
    p.add_argument("--hnsw-max", type=int, default=10**9, help="largest store HNSW is built for")
    p.add_argument("--ef-construction", type=int, default=None,
                   help="HNSW build effort (FAISS's default, 40, when left out)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default about 4 sqrt(N), a power of two)")
    p.add_argument("--work", type=Path, default=None, help="where stores are written (kept for reruns)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--append", action="store_true", help="keep the other data sets' rows already in <out>/ann.json")
    p.add_argument("--backends", default="flat,hnsw,ivfpq,milvus",
                   help="which to run beside exact numpy, comma-separated: flat, hnsw, ivfpq, milvus")
    p.add_argument("--name", default="ann", help="output file stem: <out>/<name>.json and .md (default ann)")
    p.add_argument("--progress", action="store_true", help="progress bars while building")
    p.add_argument("--reuse", action="store_true", help="open FAISS indexes an earlier run saved in --work (their "
                   "build time is the one recorded then) instead of building them again")
    args = p.parse_args()
    args.backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"flat", "hnsw", "ivfpq", "milvus"}
    if unknown:
        p.error(f"unknown --backends {', '.join(sorted(unknown))}: use flat, hnsw, ivfpq, milvus")

    work = args.work or Path(tempfile.mkdtemp(prefix="cliplens-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_ann.py " + " ".join(sys.argv[1:])
    result = {"command": command, "queries": args.queries, "rows": [], "skipped": [], "reused": args.reuse}
    out_json, out_md = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    previous = json.loads(out_json.read_text()) if out_json.is_file() else None
    earlier = previous if args.append else None
    args.previous = previous["rows"] if previous else []
    stores = []
    if args.cifar != "none":
        store, label = cifar_store(work / f"cifar-{args.cifar}", work, args.cifar)
        stores.append((f"CIFAR stand-in ({label})", store))
    result["machine"] = machine()
    for n in (int(float(s)) for s in args.sizes.split(",") if s.strip()):
        store = random_store(work / f"random-{n}-{args.dim}", n, args.dim, seed=0)
        stores.append((f"random unit vectors {n:,}", store))
    for n in (int(float(s)) for s in args.clustered_sizes.split(",") if s.strip()):
        stores.append((f"clustered unit vectors {n:,}",
                       random_store(work / f"clustered-{n}-{args.dim}", n, args.dim, seed=0, clustered=True)))
    for name, store in stores:
        print(f"{name}: {len(store):,} x {store.dim}", flush=True)
        rng = np.random.default_rng(1)  # queries: fresh draws from the data's own distribution
        centres = centres_for(len(store), store.dim) if name.startswith("clustered") else None
        queries = sample(rng, args.queries, store.dim, centres)
        if name.startswith("CIFAR"):  # perturbed stored vectors (the stand-in's vectors are very concentrated)
            emb = np.asarray(store.embeddings[rng.choice(len(store), args.queries, replace=False)], np.float32)
            queries = emb + 0.05 * queries / np.sqrt(store.dim)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        if earlier is not None and not result["rows"]:  # first data set of an --append run: keep the others
            result["rows"] = [r for r in earlier["rows"] if r["dataset"] != name]
            result["skipped"] = earlier.get("skipped", [])
            result["command"] = f"{earlier['command']}; then {command}"
        result["rows"] = [r for r in result["rows"] if r["dataset"] != name] + bench_store(name, store, queries, args)
        if len(store) > args.milvus_max and "milvus" in args.backends:
            result["skipped"].append(f"Milvus Lite at {len(store):,} vectors (bulk insert time; --milvus-max)")
        if len(store) > args.hnsw_max and "hnsw" in args.backends:
            result["skipped"].append(f"HNSW32 at {len(store):,} vectors (--hnsw-max)")
        result["machine"]["load_end"] = os.getloadavg()[0]
        args.out.mkdir(parents=True, exist_ok=True)  # written after every data set: a long run keeps what it did
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        out_md.write_text(markdown(result) + "\n")
    print(f"wrote {out_json} and {out_md}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
