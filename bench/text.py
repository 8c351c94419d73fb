"""Text query latency: encode + search over a 10,000-vector index, single prompts and 18-template ensembles.

Reference: open_clip's tokenizer and ``encode_text`` on the full 77-token context (torch.no_grad), normalise,
then ``np.argsort`` of the scores. Ours: ``Searcher.search`` (prefix-only text encoding, exact top-k, hits
with their items), first with an empty text cache and then repeated (the LRU cache).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import Report, percentile, ratio
from bench.data import CASE_STUDIES, QUERIES, unit_vectors

K = 10


def make_store(root: Path, encoder, vectors: np.ndarray):
    """A complete index folder holding ``vectors`` under ``encoder``'s model identity; returns the open store."""
    from cliplens.store import IndexStore, IndexWriter

    info = encoder.info
    identity = {"model": info.name, "weights_sha256": info.weights_sha256, "source": "bench-random",
                "count": len(vectors), "dtype": "float32"}
    writer = IndexWriter(root=root, identity=identity, dim=vectors.shape[1])
    writer.start()
    writer.write(0, vectors)
    writer.checkpoint(len(vectors))
    ids = np.arange(len(vectors), dtype=np.int64)
    writer.finalize(items={"id": ids, "ref": [f"vec-{i}" for i in ids]}, manifest={"model": dict(info.__dict__)})
    return IndexStore.open(root)


def _reference_query(model, tokenizer, emb: np.ndarray, prompts: list[str]) -> np.ndarray:
    import torch

    with torch.no_grad():
        f = model.encode_text(tokenizer(prompts))
        f = torch.nn.functional.normalize(f, dim=-1)
        if len(prompts) > 1:  # an ensemble: mean of the unit vectors, normalised again
            f = torch.nn.functional.normalize(f.mean(dim=0, keepdim=True), dim=-1)
        q = f[0].numpy()
    scores = emb @ q
    return np.argsort(-scores, kind="stable")[:K]


def _latencies(fn, items, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        for item in items:
            t0 = time.perf_counter()
            fn(item)
            out.append(time.perf_counter() - t0)
    return out


def run(*, reference, encoders: dict, workdir: Path, n: int, reps: int, command: str) -> Report:
    """``encoders``: {variant: Encoder}, e.g. exact and fast (whose text tower may run in ONNX Runtime)."""
    from cliplens.prompts import ensemble, load_templates
    from cliplens.search import Searcher

    model, _, tokenizer = reference
    first = next(iter(encoders.values()))
    report = Report("text", f"Text query latency (ms): encode + search over {n:,} vectors",
                    {"command": command, "n": n, "reps": reps, "k": K, "queries": list(QUERIES),
                     "variants": {k: e.info.precision for k, e in encoders.items()}})
    vectors = unit_vectors(n, first.info.embed_dim, seed=1)
    store = make_store(workdir / "text-index", first, vectors)
    emb = np.ascontiguousarray(store.embeddings)
    templates = load_templates("cifar100")
    prompts = [f"a photo of a {q}." for q in QUERIES]

    def prompts_for(name: str) -> list[str]:
        return [t.replace("{}", name) for t in templates]

    cases = [("single query", "reference (77 tokens)", lambda p: _reference_query(model, tokenizer, emb, [p]),
              prompts),
             (f"ensemble of {len(templates)}", "reference (77 tokens)",
              lambda c: _reference_query(model, tokenizer, emb, prompts_for(c)), list(CASE_STUDIES))]
    warm_ref = set(_reference_query(model, tokenizer, emb, ["a photo of a tractor."]).tolist())
    overlaps = {}
    for name, encoder in encoders.items():
        searcher = Searcher(encoder=encoder, store=store)

        def single(q: str, cold: bool, s=searcher, e=encoder):
            if cold:
                e.clear_text_cache()
            return s.search(q, K)

        def ensembled(c: str, cold: bool, s=searcher, e=encoder):
            if cold:
                e.clear_text_cache()
            vec = ensemble(e.encode_texts(prompts_for(c))[None])[0]
            return s.search_vector(vec, K, query=c, prompt=f"{len(templates)} templates")

        overlaps[name] = len(warm_ref & {h.id for h in single("tractor", True).hits}) / K  # also a warm-up
        runtime = "text in ONNX Runtime fp32" if encoder.text_runner is not None else "text in torch fp32"
        label = f"cliplens {name} ({encoder.info.precision}, {runtime})"
        cases += [("single query", f"{label}, first time", lambda q, f=single: f(q, True), list(QUERIES)),
                  ("single query", f"{label}, repeated", lambda q, f=single: f(q, False), list(QUERIES)),
                  (f"ensemble of {len(templates)}", f"{label}, first time", lambda c, f=ensembled: f(c, True),
                   list(CASE_STUDIES)),
                  (f"ensemble of {len(templates)}", f"{label}, repeated", lambda c, f=ensembled: f(c, False),
                   list(CASE_STUDIES))]
    cases.sort(key=lambda case: not case[0].startswith("single"))  # stable: single queries first
    rows, data, ref_p50 = [], {}, {}
    for kind, who, fn, items in cases:
        if who.endswith("repeated"):  # fill the cache: a "first time" row has just emptied it
            for item in items:
                fn(item)
        times_ms = [t * 1000 for t in _latencies(fn, items, reps)]
        p50, p99 = percentile(times_ms, 50), percentile(times_ms, 99)
        if who.startswith("reference"):
            ref_p50[kind] = p50
        rows.append([kind, who, f"{p50:.2f}", f"{p99:.2f}", str(len(times_ms)), ratio(ref_p50[kind], p50)])
        data[f"{kind} | {who}"] = {"p50_ms": p50, "p99_ms": p99, "samples": len(times_ms)}
    report.table(f"latency per query in ms over {n:,} vectors (k = {K}); speed-up = reference p50 / this p50",
                 ["query", "pipeline", "p50 ms", "p99 ms", "samples", "speed-up"], rows)
    report.data["latency"] = data
    report.data["top10_overlap_with_reference_tractor"] = overlaps
    report.notes.append(f"queries: the four case studies and 20 others ({len(QUERIES)}), each "
                        f"`a photo of a {{}}.`; ensembles: the {len(templates)} CIFAR-100 templates for the "
                        "case studies.")
    report.notes.append("first time = the encoder's text cache emptied before each query; repeated = served from it.")
    report.notes.append("exact-served = exact mode as `cliplens serve` runs it (`Encoder.speed_up_text`: the text "
                        "tower in ONNX Runtime, fp32, checked against torch at start-up); `cliplens search` keeps "
                        "the torch text tower, which needs no start-up.")
    report.notes.append("top-10 for 'tractor' shared with the reference: "
                        + ", ".join(f"{k} {v:.0%}" for k, v in overlaps.items()) + ".")
    return report
