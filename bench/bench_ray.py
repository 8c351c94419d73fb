"""Embedding throughput on this machine: the local engine against Ray (local cluster), and the shard merge time.

    python bench/bench_ray.py [--n 2000] [--model b32|tiny] [--shard-batches 4] [--batch-size 64] [--out bench/results]

Both runs index the same CIFAR-100-format stand-in (``n`` synthetic 32x32 images) with the same stand-in model
(the real ViT-B-32-quickgelu architecture with random weights by default) and batch size, into fresh folders, in
this one process: first ``index_labeled`` with the local engine (a thread pool preprocessing ahead of one model
using every core), then with ``--engine ray`` on a local Ray started with every core (one model per actor, one CPU
per actor). Reported: images/s of each, Ray's start-up, the job (actors loading their model included), the merge
of shard files into the store, and whether the two stores' vectors are identical.

Writes ``<out>/ray.json`` and ``<out>/ray.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--model", default="b32", choices=["b32", "tiny"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-batches", type=int, default=4, help="batches per Ray shard")
    p.add_argument("--merge-rows", type=int, default=1_000_000, help="rows of the separate merge-only measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()

    from bench import data, standin

    work = Path(tempfile.mkdtemp(prefix="cliplens-ray-bench-"))
    try:
        spec = standin.prepare(work / "hf", args.model)  # before anything imports huggingface_hub
        folder = data.write_cifar100(work / "cifar", args.n)
        import ray

        from cliplens.sources import load_cifar
        from cliplens.distributed import RayEngine, RayOptions, connect_ray
        from cliplens.embed import index_labeled
        from cliplens.store import IndexStore

        cifar = load_cifar("cifar100", "test", data_dir=folder.parent, verify=False, progress=False)
        encoder = standin.load_ours(spec)
        load_start = os.getloadavg()[0]

        _, local = index_labeled(cifar, encoder, work / "local", batch_size=args.batch_size, progress=False)
        print(f"local: {local.count} images in {local.seconds:.1f} s = {local.images_per_second:.1f} img/s", flush=True)

        t0 = time.perf_counter()
        connect_ray(RayOptions())  # a local Ray with every core, as `--engine ray` without --ray-address starts it
        ray_start = time.perf_counter() - t0
        engine = RayEngine(RayOptions(shard_batches=args.shard_batches))
        _, remote = index_labeled(cifar, encoder, work / "ray", batch_size=args.batch_size, progress=False,
                                  embed_fn=engine.embed_into)
        run = engine.last_run
        ray.shutdown()
        print(f"ray: start {ray_start:.1f} s; {remote.count} images in {remote.seconds:.1f} s = "
              f"{remote.images_per_second:.1f} img/s; {run}", flush=True)
        merge = merge_only(work / "merge", args.merge_rows, dim=encoder.info.embed_dim,
                           shard_rows=256 * args.batch_size, batch_size=args.batch_size)
        print(f"merge only: {args.merge_rows} rows in {merge:.2f} s", flush=True)
        a = np.asarray(IndexStore.open(work / "local").embeddings)
        b = np.asarray(IndexStore.open(work / "ray").embeddings)
        identical = bool(np.array_equal(a, b))
        result = {
            "command": "python bench/bench_ray.py " + " ".join(sys.argv[1:]),
            "model": spec.label, "n": args.n, "batch_size": args.batch_size, "dim": encoder.info.embed_dim,
            "shard_rows": args.shard_batches * args.batch_size, "shards": run.shards, "actors": run.actors,
            "local_seconds": round(local.seconds, 2), "local_img_s": round(local.images_per_second, 1),
            "ray_start_seconds": round(ray_start, 2), "ray_seconds": round(remote.seconds, 2),
            "ray_img_s": round(remote.images_per_second, 1),
            "ray_job_seconds": round(run.embed_seconds, 2), "merge_seconds": round(run.merge_seconds, 3),
            "merge_rows_per_s": round(args.n / run.merge_seconds) if run.merge_seconds > 0 else None,
            "identical_vectors": identical, "max_abs_diff": float(np.abs(a - b).max()),
            "merge_only_rows": args.merge_rows, "merge_only_seconds": round(merge, 2),
            "machine": {"cpu": next((ln.split(":", 1)[1].strip()
                                     for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                     if ln.startswith("model name")), platform.processor()),
                        "cores": os.cpu_count(), "ray": ray.__version__, "load_start": load_start,
                        "load_end": os.getloadavg()[0]},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
    r, m = result, result["machine"]
    md = [
        "# Ray vs local embedding", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average {m['load_start']:.1f} -> {m['load_end']:.1f}); "
        f"Ray {m['ray']}. Model: {r['model']}. Command: `{r['command']}`", "",
        "| engine | images | seconds | img/s | notes |", "|---|---:|---:|---:|---|",
        f"| local | {r['n']} | {r['local_seconds']} | {r['local_img_s']} | thread pool + one model on all cores |",
        f"| ray (local cluster) | {r['n']} | {r['ray_seconds']} | {r['ray_img_s']} | {r['actors']} actors x 1 CPU, "
        f"{r['shards']} shards of {r['shard_rows']} rows; job {r['ray_job_seconds']} s incl. actor start-up; "
        f"merge {r['merge_seconds']} s |",
        "", f"Ray start-up (`ray.init`, not in the seconds above): {r['ray_start_seconds']} s. "
        f"Ray/local throughput: {r['ray_img_s'] / r['local_img_s']:.2f}x. "
        f"Vectors identical to the local run: {r['identical_vectors']} (max |diff| {r['max_abs_diff']}).", "",
        f"Merge at scale (the engine's merge path alone, every shard already on disk): {r['merge_only_rows']:,} x "
        f"{result['dim']} float32 rows in {r['merge_only_seconds']} s "
        f"({r['merge_only_rows'] / r['merge_only_seconds'] / 1e6:.2f} M rows/s).", "",
    ]
    (args.out / "ray.md").write_text("\n".join(md))
    print("\n".join(md))


def merge_only(root: Path, n: int, *, dim: int, shard_rows: int, batch_size: int) -> float:
    """Seconds the Ray engine spends merging ``n`` rows of finished shards into a store (no Ray job runs: every
    shard is already on disk, as after a run that was interrupted just before its merge)."""
    from types import SimpleNamespace

    from cliplens.distributed import RayEngine, RayOptions, _shard_folder, _shard_name
    from cliplens.store import IndexWriter

    identity = {"source": f"merge-{n}", "count": n, "dtype": "float32", "batch_size": batch_size}
    folder = _shard_folder(root, identity, shard_rows, dim)
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, n, shard_rows)):
        np.save(folder / _shard_name(i), rng.standard_normal((min(shard_rows, n - start), dim), dtype=np.float32))
    engine = RayEngine(RayOptions(shard_batches=shard_rows // batch_size))
    stub = SimpleNamespace(info=SimpleNamespace(embed_dim=dim))  # the merge needs only the dimension
    writer = IndexWriter(root=root, identity=identity, dim=dim)
    engine.embed_into(_Rows(n), stub, writer, batch_size=batch_size,
                      progress=False)
    if engine.last_run.shards_computed:
        raise RuntimeError("the merge-only measurement ran a Ray job")
    return engine.last_run.merge_seconds


class _Rows:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


if __name__ == "__main__":
    main()
