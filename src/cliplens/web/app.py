"""The FastAPI app: JSON API + one static page. Build it with ``create_app({name: Searcher, ...})``.

Every error is JSON, ``{"error": message, "status": code}``, with the status that fits: 400 for a query that
cannot be run, 404 for an unknown index, item or route, 413 for an upload or image over the limits, 415 for
an unsupported body, 422 for parameters out of range. Items (and their images) are reached by id only.
"""

from __future__ import annotations

import io
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from typing import Mapping
from urllib.parse import urlencode

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cliplens._safe import redact_paths
from cliplens.errors import CliplensError
from cliplens.prompts import TEMPLATE_SETS
from cliplens.query import Term, fetch_size, parse_query, parse_where, resolve_templates, run_query
from cliplens.query import page as page_of
from cliplens.web.images import THUMB_SIZES, ImageNotAvailable, ThumbnailCache, item_image, original_file
from cliplens.web.schemas import ApiError, SearchBody, describe_index, hit_details, item_json
from cliplens.web.service import EncoderService
from cliplens.web.study_routes import study_router

log = logging.getLogger(__name__)

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class WebLimits:
    max_query_chars: int = 500
    max_k: int = 1000
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # uploaded images: 40 MP (a 7000 x 5700 photo)
    default_k: int = 24


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def create_app(indexes: Mapping[str, object], *, limits: WebLimits = WebLimits(),
               allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS):
    """``indexes``: name -> Searcher (anything with ``.encoder``, ``.store``, ``.search_vector``), first = default.

    The encoders must already be loaded. Indexes that share an encoder object share one
    :class:`EncoderService` (one worker thread per model), stopped when the app shuts down.

    ``allowed_hosts``: the names this server answers to. A request whose ``Host`` header names anything else
    gets 400, so a web page that rebinds its own DNS name to 127.0.0.1 cannot read the API from a browser.
    """
    if not indexes:
        raise CliplensError("no index to serve: name an index folder", fix={"index_dir": None})
    indexes = dict(indexes)  # name -> the searcher of the index's newest complete generation (see searcher_for)
    names = list(indexes)
    services: dict[int, EncoderService] = {}
    for searcher in indexes.values():
        if id(searcher.encoder) not in services:
            services[id(searcher.encoder)] = EncoderService(searcher.encoder)
    thumbs = ThumbnailCache()

    @asynccontextmanager
    async def lifespan(app):
        yield
        for svc in services.values():
            svc.close()

    # docs_url/redoc_url off: FastAPI's viewers load their scripts from a CDN (a third party sees every visit);
    # the schema itself stays at /openapi.json.
    app = FastAPI(title="cliplens", summary="Semantic image search with CLIP", version=_version(),
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = services
    app.state.limits = limits
    hosts = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts if h.strip())

    # ------------------------------------------------------------------ errors: always JSON
    def error(status: int, message: str) -> JSONResponse:
        # never a filesystem path: the client may be anyone the server is reachable from
        return JSONResponse({"error": redact_paths(message), "status": status}, status_code=status)

    @app.middleware("http")
    async def _check_host(request: Request, call_next):
        if _host_name(request.headers.get("host", "")) not in hosts:
            return error(400, "this server does not answer to that Host name; "
                              "start `cliplens serve` with --allow-host NAME to add it")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(CliplensError)
    async def _cliplens_error(request, exc: CliplensError):
        return error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug: logged with its traceback, answered in JSON
        log.exception("error while answering %s %s", request.method, request.url.path)
        return error(500, "internal error; the server log has the details")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", "")} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errs) or "invalid request"
        return JSONResponse({"error": message, "status": 422, "detail": errs}, status_code=422)

    # ------------------------------------------------------------------ helpers
    def searcher_for(name: str | None):
        if name is None or name == "":
            name = names[0]
        if name not in indexes:
            raise ApiError(404, f"no index named {name!r}; GET /api/indexes lists them")
        searcher = indexes[name]
        if hasattr(searcher, "refreshed"):  # a re-index finished: answer from its generation from now on
            searcher = indexes[name] = searcher.refreshed()
        return name, searcher

    def check_item(searcher, item_id: int) -> None:
        n = len(searcher.store)
        if not 0 <= item_id < n:
            raise ApiError(404, f"no item {item_id} in this index (ids run 0..{n - 1})")

    suspects_memo: dict[str, dict] = {}  # index name -> find_suspects result, shared with /api/study/suspects

    async def suspect_mask(index_name: str, searcher):
        from cliplens.web.study_routes import find_index_suspects

        if not searcher.store.has_labels:
            raise ApiError(400, f"index {index_name!r} has no labels, so no suspect labels to keep")
        r = await find_index_suspects(index_name, searcher, services, suspects_memo)
        mask = np.zeros(len(searcher.store), bool)
        mask[np.asarray(r["ranked"], np.int64)] = True
        return mask

    async def run(name: str | None, terms, k: int, *, template=None, where=(), min_score=None, raw=False,
                  query=None, offset: int = 0, sort: str = "score", collapse: bool = True,
                  suspects: bool = False) -> dict:
        index_name, searcher = searcher_for(name)
        svc = services[id(searcher.encoder)]
        n = len(searcher.store)
        restrict = await suspect_mask(index_name, searcher) if suspects else None
        k = min(k, n)  # a small index answers with all it has
        threshold, why = collapse_threshold(searcher.store) if collapse else (None, "turned off")
        fetch = fetch_size(k, offset, n, threshold is not None)
        call = partial(run_query, searcher, terms, fetch, templates=resolve_templates(template), raw=raw,
                       where=parse_where(list(where)), min_score=min_score, query=query, restrict=restrict,
                       encode_texts=svc.encode_texts, encode_images=svc.encode_images, max_pixels=limits.max_pixels)
        result = await run_in_threadpool(call)
        result = page_of(searcher, result, k, offset=offset, sort=sort, collapse=threshold)
        out = {"index": index_name, **result.to_json()}
        out["collapse"] = {"threshold": threshold, "why": why}
        for hit in out["hits"]:
            hit.update(hit_details(searcher.store, hit["id"], index_name))
        return out

    def collapse_threshold(store) -> tuple[float | None, str]:
        """The duplicate threshold measured for this index's weights (cliplens.duplicates), or None and why not."""
        from cliplens.duplicates import recorded

        t = recorded(store.manifest.model)
        if t is None:
            return None, "no threshold measured for this model yet: run `cliplens duplicates` once"
        if not t.usable:
            return None, (f"this model does not tell re-encoded copies (cosine >= {t.copies_p01:.4f}) from different "
                          f"images ({t.distinct_p99:.4f}) apart")
        return t.threshold, "measured on re-encoded copies"

    # Parameter declarations shared by several routes (functions: each route gets its own instance).
    def k_param():
        return Query(limits.default_k, ge=1, le=limits.max_k, description=f"number of results, 1..{limits.max_k}")

    def index_param():
        return Query(None, max_length=200, description="index name (default: the first)")

    def template_param():
        return Query(None, max_length=300, description=f"{', '.join(TEMPLATE_SETS)} or a template with {{}}")

    def where_param():
        return Query([], max_length=20, description="filters: label=..., superclass=..., path=GLOB, caption=...")

    def min_score_param():
        return Query(None, ge=-1.0, le=1.0, description="drop hits below this cosine similarity")

    def offset_param():
        return Query(0, ge=0, le=limits.max_k, description="skip this many results (the next page)")

    def sort_param():
        return Query("score", pattern="^(score|taken|-taken)$", description="score, or taken / -taken (photo date)")

    def collapse_param():
        return Query(True, description="collapse near-identical results into one (a duplicates list on the hit)")

    def suspects_param():
        return Query(False, description="only items whose label is a suspect (labelled indexes; /api/study/suspects)")

    # ------------------------------------------------------------------ routes
    @app.get("/healthz", tags=["meta"])
    async def healthz():
        return {"status": "ok", "indexes": len(names), "models": len(services),
                "encoders": [asdict(svc.stats) for svc in services.values()]}

    @app.get("/api/indexes", tags=["meta"])
    async def list_indexes():
        return {"indexes": [describe_index(n, s.store) for n, s in indexes.items()], "default": names[0],
                "template_sets": list(TEMPLATE_SETS), "limits": asdict(limits)}

    @app.get("/api/search", tags=["search"])
    async def search_get(q: str = Query(..., min_length=1, max_length=limits.max_query_chars,
                                        description='text, or combined: "2:red tractor" - snow + #12'),
                         k: int = k_param(), index: str | None = index_param(), template: str | None = template_param(),
                         where: list[str] = where_param(), min_score: float | None = min_score_param(),
                         raw: bool = False, offset: int = offset_param(), sort: str = sort_param(),
                         collapse: bool = collapse_param(), suspects: bool = suspects_param()):
        return await run(index, parse_query(q, allow_paths=False), k, template=template, where=where,
                         min_score=min_score, raw=raw, query=q, offset=offset, sort=sort, collapse=collapse,
                         suspects=suspects)

    @app.post("/api/search", tags=["search"], openapi_extra=SearchBody.openapi_request_body())
    async def search_post(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            raw_body = await _read_limited(request, 256 * 1024)
            body = SearchBody.parse(raw_body, limits)
            return await run(body.index, body.to_terms(), body.k, template=body.template, where=body.where,
                             min_score=body.min_score, raw=body.raw, query=body.q, offset=body.offset,
                             sort=body.sort, collapse=body.collapse, suspects=body.suspects)
        if ctype == "multipart/form-data":
            form = await _read_form(request, limits.max_upload_bytes)
            try:
                body, upload = SearchBody.from_form(form, limits)
                data = await upload.read()
            finally:
                await form.close()  # the spooled temporary file of the upload
            if len(data) > limits.max_upload_bytes:
                raise ApiError(413, f"the image is over {limits.max_upload_bytes // (1024 * 1024)} MB")
            image = await run_in_threadpool(_decode_upload, data, limits.max_pixels)
            name = upload.filename or "upload"
            terms = [Term("image", name, body.image_weight, image=image), *body.to_terms(False)]
            return await run(body.index, terms, body.k, template=body.template, where=body.where,
                             min_score=body.min_score, raw=body.raw, query=body.q or f"image {name}",
                             offset=body.offset, sort=body.sort, collapse=body.collapse, suspects=body.suspects)
        raise ApiError(415, "send JSON (application/json) or an image upload (multipart/form-data)")

    @app.get("/api/items/{item_id}", tags=["items"])
    async def get_item(item_id: int, index: str | None = index_param()):
        name, searcher = searcher_for(index)
        check_item(searcher, item_id)
        image_url = f"/api/items/{item_id}/image?" + urlencode({"index": name})
        return {"index": name, **item_json(searcher.store, item_id), "image_url": image_url,
                **hit_details(searcher.store, item_id, name)}

    @app.get("/api/items/{item_id}/original", tags=["items"], response_class=Response,
             responses={200: {"content": {"image/*": {}}}})
    async def get_item_original(item_id: int, index: str | None = index_param()):
        """The item's own file, as it is on disk: only for an indexed item of a folder or list, inside its folder."""
        _, searcher = searcher_for(index)
        check_item(searcher, item_id)
        try:
            f, media, filename, size = await run_in_threadpool(original_file, searcher.store, item_id)
        except ImageNotAvailable as exc:
            raise ApiError(404, str(exc)) from None

        def chunks():
            with f:
                while block := f.read(1 << 20):
                    yield block

        quoted = filename.encode("ascii", "replace").decode().replace('"', "")
        return StreamingResponse(chunks(), media_type=media, headers={
            "Content-Length": str(size), "Content-Disposition": f'inline; filename="{quoted}"',
            "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, max-age=300"})

    @app.get("/api/items/{item_id}/image", tags=["items"], response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    async def get_item_image(item_id: int, index: str | None = index_param(),
                             size: int = Query(256, ge=16, le=max(THUMB_SIZES),
                                               description="longer side in px, rounded up to 64, 128, 256, 512 or 1024")):
        name, searcher = searcher_for(index)
        check_item(searcher, item_id)
        size = next(s for s in THUMB_SIZES if s >= size)  # a few sizes only, so the cache stays useful
        key = (name, getattr(searcher.store, "generation", ""), item_id, size)
        hit = thumbs.get(key)
        if hit is None:
            try:
                hit = await run_in_threadpool(item_image, searcher.store, item_id, size)
            except ImageNotAvailable as exc:
                raise ApiError(404, str(exc)) from None
            thumbs.put(key, hit)
        return Response(hit[0], media_type=hit[1], headers={"Cache-Control": "public, max-age=3600",
                                                            "X-Content-Type-Options": "nosniff"})

    @app.get("/api/similar/{item_id}", tags=["search"])
    async def similar(item_id: int, k: int = k_param(), index: str | None = index_param(),
                      where: list[str] = where_param(), min_score: float | None = min_score_param(),
                      offset: int = offset_param(), sort: str = sort_param(), collapse: bool = collapse_param(),
                      suspects: bool = suspects_param()):
        _, searcher = searcher_for(index)
        check_item(searcher, item_id)
        return await run(index, [Term("item", item_id)], k, where=where, min_score=min_score,
                         query=f"more like #{item_id}", offset=offset, sort=sort, collapse=collapse,
                         suspects=suspects)

    app.include_router(study_router(indexes=indexes, searcher_for=searcher_for, services=services, run=run,
                                    suspects_memo=suspects_memo))

    @app.get("/", include_in_schema=False)
    async def page():
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return _static(name)

    def _static(name: str):
        if name not in STATIC_FILES:  # a fixed list: nothing else on disk is reachable
            raise ApiError(404, "not found")
        data = resources.files("cliplens.web").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return app


async def _limited_stream(request, limit: int):
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, f"the request body is over {limit // (1024 * 1024) or 1} MB")
        yield chunk


async def _read_limited(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit // 1024} kB")
    return b"".join([c async for c in _limited_stream(request, limit)])


async def _read_form(request, max_upload: int):
    from starlette.formparsers import MultiPartException, MultiPartParser

    limit = max_upload + 64 * 1024  # the file plus the form's own fields and boundaries
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the upload is over {max_upload // (1024 * 1024)} MB")
    parser = MultiPartParser(request.headers, _limited_stream(request, limit), max_files=1, max_fields=32,
                             max_part_size=64 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"bad upload: {exc.message}") from None


def _decode_upload(data: bytes, max_pixels: int):
    from cliplens.sources.folder import ImageSkipped, ImageTooLarge, decode_image

    try:
        return decode_image(io.BytesIO(data), max_pixels=max_pixels)
    except ImageTooLarge as exc:
        raise ApiError(413, f"image too large: {exc.reason}") from None
    except ImageSkipped as exc:
        raise ApiError(422, f"cannot read the uploaded image: {exc.reason}") from None


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without the port: "[::1]:8000" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _version() -> str:
    from cliplens import __version__

    return __version__

