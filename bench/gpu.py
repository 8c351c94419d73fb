"""GPU run: CIFAR indexing end to end and text queries on CUDA, in one call (``bench/gpu.sh``, ``python -m bench gpu``).

On CUDA: the ViT-B/32 stand-in loaded by ``load_encoder(device="cuda")``, its image tower in fp16 weights
(:mod:`cliplens.gpu_tower`; text under fp16 autocast), a large batch (1024, or the largest the memory probe finds
below it), CIFAR upscaling on the GPU (:mod:`cliplens.gpu_preprocess`).
Indexing runs the real ``cliplens index cifar100`` path (``open_source`` + ``index_source``: unpickle, decode,
embed, the resumable store with manifest, items and thumbnails) into a fresh folder per repetition; images/s is
the count over that whole wall time (model load excluded, reported apart). Agreement: a sample of the index's
vectors against the CPU exact path (numpy Pillow-exact preprocessing, fp32 on the CPU) on the same images, and the
GPU pixels against ``preprocess_batch``. Text: single queries (p50/p99, first time and repeated) and one batch of
queries through ``Searcher`` over the index just built.

Without CUDA the same script runs at tiny sizes on the CPU as a fallback (what CI runs): the torch preprocessing
path forced on, fp32, the table's device line saying ``cpu (fallback)``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import Report, Stats, machine, percentile
from bench.data import QUERIES, write_cifar100

TARGET_IMAGES_PER_SECOND = 20_000  # the target on one H100-class GPU (clip-retrieval: ~1,500/s, RTX 3080)
K = 10
# (images, batch size, repetitions, agreement sample, queries in the batch) per kind of run
SIZES = {"cuda": (10_000, 1024, 3, 512, 1024), "cpu": (64, 32, 1, 32, 24)}


def run(*, standin, workdir: Path, command: str, n: int | None = None, batch_size: int | None = None,
        reps: int | None = None, sample: int | None = None, device: str = "auto") -> Report:
    import torch

    from cliplens.encoder import largest_batch_in_memory, load_encoder

    t_start, header = time.perf_counter(), machine()  # the load average at the start
    cuda = device != "cpu" and torch.cuda.is_available()
    kind = "cuda" if cuda else "cpu"
    d_n, d_batch, d_reps, d_sample, n_queries = SIZES[kind]
    n, reps = n or d_n, reps or d_reps
    sample = min(sample or d_sample, n)
    name = torch.cuda.get_device_name(0) if cuda else "cpu (fallback)"

    t0 = time.perf_counter()
    encoder = load_encoder(standin.model, standin.pretrained, device=kind, precision="exact")
    load_s = time.perf_counter() - t0
    if not cuda:
        encoder.device_preprocess = True  # the GPU's preprocessing code, here on the CPU: what the fallback checks
    # on CUDA the probe also warms the model up (cuBLAS handles, kernels) at full batch size
    batch = largest_batch_in_memory(encoder, batch_size or d_batch) if cuda else (batch_size or d_batch)
    cifar = write_cifar100(workdir / "cifar", n).parent
    encoder.encode_images(np.zeros((min(batch, 8), 32, 32, 3), np.uint8))  # a warm-up for the CPU too

    runs, index_dir = _index_reps(encoder, cifar, workdir, n=n, batch=batch, reps=reps)
    agreement = _agreement(encoder, standin, index_dir, sample=sample, cuda=cuda)
    text = _text(encoder, index_dir, reps=reps, n_queries=n_queries)
    total_s = time.perf_counter() - t_start
    return _report(header=header, command=command, name=name, cuda=cuda, n=n, batch=batch, reps=reps, sample=sample,
                   load_s=load_s, runs=runs, agreement=agreement, text=text, total_s=total_s, encoder=encoder)


def _index_reps(encoder, cifar: Path, workdir: Path, *, n: int, batch: int, reps: int):
    """Each repetition: ``cliplens index cifar100`` into a fresh folder, timed whole and by stage."""
    from cliplens.indexing import IndexOptions, index_source, open_source

    runs = []
    for rep in range(reps):
        index_dir = workdir / f"index-{rep}"
        t0 = time.perf_counter()
        data = open_source("cifar100", split="test", data_dir=cifar, verify=False, progress=False)
        t1 = time.perf_counter()
        result = index_source(data, encoder, index_dir, options=IndexOptions(batch_size=batch, progress=False))
        t2 = time.perf_counter()
        if result.embedded != n:
            raise RuntimeError(f"indexed {result.embedded} images, expected {n}")
        runs.append({"total_s": t2 - t0, "load_s": t1 - t0, "embed_s": result.seconds,
                     "store_s": (t2 - t1) - result.seconds})
        if rep < reps - 1:
            shutil.rmtree(index_dir)
    return runs, index_dir


def _agreement(encoder, standin, index_dir: Path, *, sample: int, cuda: bool) -> dict:
    """The index's first ``sample`` vectors against the CPU exact path on the same images; GPU pixels vs numpy."""
    import torch

    from cliplens.encoder import load_encoder
    from cliplens.gpu_preprocess import preprocess_on_device
    from cliplens.preprocess import preprocess_batch
    from cliplens.store import IndexStore

    store = IndexStore.open(index_dir)
    images = np.array(store.images()[:sample])  # a writable copy of the memory-mapped thumbnails
    vectors = np.asarray(store.embeddings[:sample], np.float64)
    exact = load_encoder(standin.model, standin.pretrained, device="cpu", precision="exact") if cuda else encoder
    reference = np.asarray(exact.encode_pixels(preprocess_batch(images, exact.fast_config)), np.float64)
    cos = np.einsum("ij,ij->i", vectors, reference) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    with torch.inference_mode():
        pixels = preprocess_on_device(torch.from_numpy(images).to(encoder.device), encoder.fast_config).cpu().numpy()
    expected = preprocess_batch(images, encoder.fast_config)
    return {"sample": sample, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "pixels_max_abs_diff": float(np.abs(pixels - expected).max()),
            "pixels_differing": int(np.count_nonzero(pixels != expected)), "pixels_total": int(expected.size)}


def _text(encoder, index_dir: Path, *, reps: int, n_queries: int) -> dict:
    """Single-query latency (cold and repeated) and one batch of queries, over the index just built."""
    from cliplens.prompts import load_templates
    from cliplens.search import Searcher
    from cliplens.store import IndexStore

    store = IndexStore.open(index_dir)
    searcher = Searcher(encoder=encoder, store=store)
    searcher.search("tractor", K)  # warm-up
    out = {}
    for label, cold in (("first time", True), ("repeated", False)):
        if not cold:
            for q in QUERIES:
                searcher.search(q, K)
        times = []
        for _ in range(reps):
            for q in QUERIES:
                if cold:
                    encoder.clear_text_cache()
                t0 = time.perf_counter()
                searcher.search(q, K)
                times.append((time.perf_counter() - t0) * 1000)
        out[label] = {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "samples": len(times)}
    templates = load_templates("cifar100")
    prompts = [t.replace("{}", q) for t in templates for q in QUERIES][:n_queries]
    while len(prompts) < n_queries:  # more queries than templates x words: numbered variants, all distinct
        prompts.append(f"{prompts[len(prompts) % len(QUERIES)]} ({len(prompts)})")
    emb = np.ascontiguousarray(store.embeddings, dtype=np.float32)
    encoder.clear_text_cache()
    t0 = time.perf_counter()
    q = encoder.encode_texts(prompts)
    scores = q @ emb.T
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
    batch_s = time.perf_counter() - t0
    out["batch"] = {"queries": len(prompts), "seconds": batch_s, "queries_per_second": len(prompts) / batch_s,
                    "top_shape": list(top.shape)}
    return out


def _report(*, header, command, name, cuda, n, batch, reps, sample, load_s, runs, agreement, text, total_s, encoder):
    import torch

    rates = Stats.of([n / r["total_s"] for r in runs])
    embed_rates = Stats.of([n / r["embed_s"] for r in runs])
    met = rates.median >= TARGET_IMAGES_PER_SECOND
    versions = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                "cudnn": torch.backends.cudnn.version() if cuda else None,
                "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}
    if not cuda:
        precision = "fp32 (CPU)"
    elif encoder.visual_dtype is not None:  # the image tower cast by cliplens.gpu_tower
        precision = f"image tower in {str(encoder.visual_dtype).removeprefix('torch.')} weights, text fp16 autocast"
    else:
        precision = "fp16 autocast"
    report = Report("gpu", f"GPU run: CIFAR indexing and text queries on {name}",
                    {"command": command, "n": n, "batch_size": batch, "reps": reps, "sample": sample,
                     "device": name, "precision": precision, "model": encoder.info.name}, machine=header)
    report.table("device", ["", ""], [
        ["device", name], ["torch", versions["torch"]], ["CUDA", versions["cuda"] or "none"],
        ["cuDNN", versions["cudnn"] or "none"], ["GPU memory", f"{versions['gpu_memory_gib']} GiB" if cuda else "none"],
        ["model", f"{encoder.info.name} (stand-in weights), {precision}"],
        ["preprocessing", "CIFAR 32x32 -> 224 upscaled on the device (cliplens.gpu_preprocess)"],
        ["model load", f"{load_s:.1f} s"], ["whole benchmark", f"{total_s:.1f} s"]])
    stage = {k: Stats.of([r[k] for r in runs]) for k in ("load_s", "embed_s", "store_s", "total_s")}
    report.table(f"CIFAR-format indexing, N = {n:,}, batch {batch}: median (min-max) of {reps}", ["measure", "value"], [
        ["images/s, end to end (`cliplens index cifar100` path)", rates.text()],
        ["images/s, embedding stage only", embed_rates.text()],
        ["seconds: load and decode the split", stage["load_s"].text("{:.3f}")],
        ["seconds: embed (preprocess + encode + write)", stage["embed_s"].text("{:.3f}")],
        ["seconds: items, thumbnails, manifest, commit", stage["store_s"].text("{:.3f}")],
        [f"target: >= {TARGET_IMAGES_PER_SECOND:,} images/s end to end on one H100-class GPU",
         ("met" if met else "not met") + ("" if cuda else " (CPU fallback: no GPU measured)")]])
    a = agreement
    report.table(f"agreement with the CPU exact path (numpy Pillow-exact preprocessing, fp32), {a['sample']} images",
                 ["measure", "value"], [
                     ["mean cosine", f"{a['cosine_mean']:.7f}"], ["min cosine", f"{a['cosine_min']:.7f}"],
                     ["pixels: max abs diff vs preprocess_batch", f"{a['pixels_max_abs_diff']:.3g}"],
                     ["pixels differing", f"{a['pixels_differing']:,} of {a['pixels_total']:,}"]])
    rows = [[f"single query, {k}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}", str(v["samples"])]
            for k, v in text.items() if k != "batch"]
    b = text["batch"]
    report.table(f"text queries over the {n:,}-image index (k = {K})", ["query", "p50 ms", "p99 ms", "samples"], rows)
    report.table("a batch of queries (encode all, then exact top-10 for each)", ["queries", "seconds", "queries/s"],
                 [[str(b["queries"]), f"{b['seconds']:.3f}", f"{b['queries_per_second']:.0f}"]])
    report.data = {"versions": versions, "images_per_second": rates.to_json(),
                   "embed_images_per_second": embed_rates.to_json(), "runs": runs, "model_load_s": load_s,
                   "total_s": total_s, "target": {"images_per_second": TARGET_IMAGES_PER_SECOND, "met": met},
                   "agreement": agreement, "text": text}
    report.notes.append("end to end: unpickle and decode the CIFAR-format split, embed in fixed batches, write the "
                        "resumable store (vectors, items, thumbnails, manifest) and commit the generation; model load "
                        "and warm-up excluded (shown above).")
    report.notes.append("weights are random stand-ins in the real hub layout: speed depends on the architecture, not "
                        "the values; agreement on trained weights may differ.")
    if not cuda:
        report.notes.append("CPU fallback: no CUDA here; the same code at tiny sizes, the device preprocessing run on "
                            "the CPU. Its numbers are no GPU measurement.")
    return report
