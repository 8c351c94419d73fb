"""The study's endpoints for the page: the embedding map, suspect labels, models side by side, the calibrated cut.

``study_router(...)`` is included by ``create_app`` with the app's own helpers (index lookup, encoder services, the
search runner), so these routes answer errors the same way (JSON, 4xx) and search the same way. The page's part is
``/study/study.js`` (no third-party code): a canvas scatter of the map (hover: thumbnail, click: the item, the current
query's hits ringed), a "suspects" view and a "compare" view.

Routes:
    GET /api/study/map?index=&method=pca         points scaled to [0, 1], group per item, groups, centres
    GET /api/study/suspects?index=&top=50       labels that disagree with zero-shot and with their neighbours
    GET /api/study/compare?q=&k=10              the same query in every index (one row per index/model)
    GET /api/study/calibration?index=           the threshold `cliplens calibrate` recorded for the index's model
"""

from __future__ import annotations

import threading
from importlib import resources

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from cliplens.errors import CliplensError
from cliplens.query import parse_query
from cliplens.web.schemas import ApiError

SUSPECT_TEMPLATE = "a photo of a {}."  # one prompt per class: cheap enough to compute on the first request


async def find_index_suspects(name: str, searcher, services, memo: dict) -> dict:
    """``find_suspects`` for an index (computed on first use, then kept): ranked ids, suggested labels, scores."""
    from cliplens.prompts import english_classname, wrap_query
    from cliplens.suspects import find_suspects

    if name not in memo:
        store = searcher.store
        names = [english_classname(n) for n in store.class_names]
        svc = services[id(searcher.encoder)]
        class_emb = await run_in_threadpool(svc.encode_texts, [wrap_query(n, SUSPECT_TEMPLATE) for n in names])
        memo[name] = await run_in_threadpool(lambda: find_suspects(np.asarray(store.embeddings, np.float32),
                                                                   store.labels, np.asarray(class_emb),
                                                                   num_classes=len(names)))
    return memo[name]


def study_router(*, indexes, searcher_for, services, run, max_query_chars: int = 500,
                 suspects_memo: dict | None = None) -> APIRouter:
    router = APIRouter(tags=["study"])
    lock = threading.Lock()
    suspects_memo = {} if suspects_memo is None else suspects_memo  # shared with the search's suspect filter

    @router.get("/api/study/map")
    async def study_map(index: str | None = Query(None, max_length=200),
                        method: str = Query("pca", pattern="^(pca|tsne|umap)$")):
        from cliplens.embedmap import cached_projection, map_groups, map_json

        name, searcher = searcher_for(index)

        def compute():
            with lock:  # one projection at a time; the cache makes the next request instant
                pts, cached = cached_projection(searcher.store, method=method)
            groups, names, kind = map_groups(searcher.store)
            return {"index": name, "method": method, "from_cache": cached, "count": len(pts),
                    **map_json(pts, groups, names, kind)}

        return await run_in_threadpool(compute)

    @router.get("/api/study/suspects")
    async def study_suspects(index: str | None = Query(None, max_length=200), top: int = Query(50, ge=1, le=1000)):
        from cliplens.prompts import english_classname

        name, searcher = searcher_for(index)
        store = searcher.store
        if not store.has_labels:
            raise ApiError(400, f"index {name!r} has no labels: suspects need a labelled index (cifar100, cifar10)")
        names = [english_classname(n) for n in store.class_names]
        r = await find_index_suspects(name, searcher, services, suspects_memo)
        labels = store.labels
        items = [{"id": int(i), "label": names[labels[i]], "suggested": names[r["suggested"][i]],
                  "self_confidence": round(float(r["self_confidence"][i]), 6),
                  "image_url": f"/api/items/{int(i)}/image?index={name}"} for i in r["ranked"][:top]]
        return {"index": name, "flagged": int(len(r["ranked"])), "count": len(store), "template": SUSPECT_TEMPLATE,
                "suspects": items}

    @router.get("/api/study/compare")
    async def study_compare(q: str = Query(..., min_length=1, max_length=max_query_chars),
                            k: int = Query(10, ge=1, le=100)):
        rows = []
        for name, searcher in indexes.items():
            result = await run(name, parse_query(q, allow_paths=False), k, query=q)
            rows.append({"model": searcher.store.manifest.model.short_label(), **result})
        return {"query": q, "k": k, "rows": rows}

    @router.get("/api/study/calibration")
    async def study_calibration(index: str | None = Query(None, max_length=200),
                                template: str = Query(SUSPECT_TEMPLATE, max_length=300)):
        from cliplens.calibrate import lookup

        name, searcher = searcher_for(index)
        try:
            entry = lookup(searcher.store.manifest.model, template)
        except CliplensError as exc:
            raise ApiError(404, str(exc)) from None
        return {"index": name, "template": template, "threshold": entry["threshold"],
                "precision": entry.get("precision"), "recall": entry.get("recall"),
                "target_precision": entry.get("target_precision")}

    @router.get("/study/study.js", include_in_schema=False)
    async def study_js():
        data = resources.files("cliplens.web").joinpath("static", "study.js").read_bytes()
        return Response(data, media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "no-cache"})

    return router
