"""Request bodies and the JSON shapes of indexes and items, for the web API."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cliplens._safe import MAX_JSON_DEPTH, json_depth
from cliplens.query import MAX_TERMS, MAX_WEIGHT, Term, parse_query


class ApiError(Exception):
    """An HTTP error with a one-line message; the app turns it into ``{"error": ..., "status": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class TermIn(BaseModel):
    """One weighted term: text, or the id of an indexed item."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=500)
    id: int | None = Field(None, ge=0)
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, description="negative subtracts; not 0")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.text is None) == (self.id is None):
            raise ValueError("give exactly one of text or id")
        if self.weight == 0:
            raise ValueError("weight must not be 0")
        return self


class SearchBody(BaseModel):
    """POST /api/search as JSON: ``q`` (the same syntax as GET) and/or explicit ``terms``."""

    model_config = ConfigDict(extra="forbid")
    q: str | None = Field(None, min_length=1, description='e.g. "2:red tractor" - snow + #12')
    terms: list[TermIn] = Field(default_factory=list, max_length=MAX_TERMS)
    k: int = Field(24, ge=1)
    index: str | None = Field(None, max_length=200)
    template: str | None = Field(None, max_length=300)
    where: list[str] = Field(default_factory=list, max_length=20)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    raw: bool = False
    offset: int = Field(0, ge=0, description="skip this many results (the next page)")
    sort: str = Field("score", pattern="^(score|taken|-taken)$", description="score, or taken / -taken")
    collapse: bool = Field(True, description="collapse near-identical results into one")
    suspects: bool = Field(False, description="only items whose label is a suspect (labelled indexes)")
    image_weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, description="multipart only: the image's weight")

    # ---------------------------------------------------------------- building
    @classmethod
    def parse(cls, raw_body: bytes, limits) -> "SearchBody":
        if json_depth(raw_body) > MAX_JSON_DEPTH:  # Python's parser would recurse once per level, then crash
            raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            data = json.loads(raw_body or b"null")
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(422, 'the body must be a JSON object such as {"q": "tractor", "k": 10}')
        return cls._validate(data, limits)

    @classmethod
    def from_form(cls, form, limits):
        from starlette.datastructures import UploadFile

        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "image: upload the image as the multipart field 'image'")
        data: dict[str, Any] = {}
        for key in ("q", "k", "index", "template", "min_score", "raw", "offset", "sort", "collapse", "suspects"):
            value = form.get(key)
            if isinstance(value, str) and value != "":
                data[key] = value
        if isinstance(form.get("weight"), str) and form.get("weight"):
            data["image_weight"] = form.get("weight")
        data["where"] = [w for w in form.getlist("where") if isinstance(w, str) and w]
        return cls._validate(data, limits, need_terms=False), upload

    @classmethod
    def _validate(cls, data: dict, limits, *, need_terms: bool = True) -> "SearchBody":
        try:
            body = cls.model_validate(data)
        except ValidationError as exc:
            msg = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
            raise ApiError(422, msg) from None
        if body.k > limits.max_k:
            raise ApiError(422, f"k: must be at most {limits.max_k}")
        if body.offset > limits.max_k:
            raise ApiError(422, f"offset: must be at most {limits.max_k}")
        if body.q is not None and len(body.q) > limits.max_query_chars:
            raise ApiError(422, f"q: at most {limits.max_query_chars} characters")
        if need_terms and body.q is None and not body.terms:
            raise ApiError(422, "give q (a query string) or terms")
        if body.image_weight == 0:
            raise ApiError(422, "weight must not be 0")
        return body

    def to_terms(self, require: bool = True) -> list[Term]:
        terms = list(parse_query(self.q, allow_paths=False)) if self.q else []
        terms += [Term("text", t.text, t.weight) if t.text is not None else Term("item", t.id, t.weight)
                  for t in self.terms]
        return terms

    # ---------------------------------------------------------------- documentation
    @classmethod
    def openapi_request_body(cls) -> dict:
        schema = _inline_defs(cls.model_json_schema())
        form = {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "the query image, at most 10 MB"},
            "weight": {"type": "number", "description": "the image's weight (default 1)"},
            "q": {"type": "string", "description": "text terms to combine with the image"},
            "k": {"type": "integer"}, "index": {"type": "string"}, "template": {"type": "string"},
            "where": {"type": "array", "items": {"type": "string"}}, "min_score": {"type": "number"},
        }}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                              "multipart/form-data": {"schema": form}}}}


def _inline_defs(schema: dict) -> dict:
    """Replace pydantic's local ``#/$defs/X`` references by the definitions (they mean nothing inside OpenAPI)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.split("/")[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


# --------------------------------------------------------------------------- responses


def describe_index(name: str, store) -> dict:
    m = store.manifest
    source = m.source
    return {
        "name": name,
        "count": len(store),
        "dim": store.dim,
        "model": m.model.name,
        "pretrained": m.model.pretrained,
        "source": (source.type or source.name) if source else None,
        "split": source.split if source else None,
        "has_labels": store.has_labels,
        "classes": [c.replace("_", " ") for c in store.class_names],
        "superclasses": [c.replace("_", " ") for c in store.superclass_names],
        "has_images": store.images() is not None or (source is not None and source.type in ("folder", "list")),
        "has_superclasses": bool(store.superclass_names),
        "has_thumbnails": bool(getattr(store, "has_thumbnails", False)),
        "tiny": _tiny(store),  # CIFAR-size tiles: the page scales them up pixelated
        "has_originals": source is not None and source.type in ("folder", "list"),
        **photo_facets(store),
        "examples": example_queries(store),
        "calibration": calibration_of(store),
    }


def calibration_of(store) -> dict:
    """The calibrated cut recorded for this index's weights and the page's default prompt ("single"), or {}: the
    page marks it on its relevance slider without asking (and without a 404) first."""
    from cliplens.calibrate import lookup
    from cliplens.errors import CliplensError

    try:
        entry = lookup(store.manifest.model, "a photo of a {}.")
    except CliplensError:
        return {}
    keep = ("threshold", "precision", "recall", "target_precision")
    return {"single": {k: entry.get(k) for k in keep}}


def _tiny(store) -> bool:
    images = store.images()
    return images is not None and max(images.shape[1:3]) <= 64


def photo_facets(store) -> dict:
    """For the page's filters: the cameras (most photos first) and the range of dates taken, where the index has them."""
    from collections import Counter

    out: dict[str, Any] = {}
    if "camera" in store.items:
        counts = Counter(c for c in store.items["camera"] if isinstance(c, str) and c)
        out["cameras"] = [c for c, _ in counts.most_common(50)]
    if "taken" in store.items:
        dates = [t for t in store.items["taken"] if isinstance(t, str) and t]
        out["taken_range"] = [min(dates), max(dates)] if dates else None
    return out


def example_queries(store, n: int = 6) -> list[str]:
    """Queries that fit this index: a spread of its class names; for photos, frequent words of the captions; else
    nothing (the page then suggests kinds of query)."""
    import re
    from collections import Counter

    if store.class_names:
        names = [c.replace("_", " ") for c in store.class_names]
        step = max(1, len(names) // n)
        return names[::step][:n]
    if "caption" in store.items:
        stop = {"a", "an", "the", "of", "on", "in", "with", "and", "at", "to", "for", "is", "by", "from", "my"}
        words = Counter(w for c in store.items["caption"] if isinstance(c, str)
                        for w in re.findall(r"[a-z]{3,}", c.lower()) if w not in stop)
        return [w for w, _ in words.most_common(n)]
    return []


PHOTO_FIELDS = ("path", "caption", "taken", "taken_from", "camera", "lat", "lon", "width", "height")


def hit_details(store, item_id: int, index: str) -> dict:
    """What a result tile and the viewer show beside the score: the photo metadata columns the index has, and the
    thumbnail URLs (256 px, 512 px for 2x screens)."""
    items = store.items
    out: dict[str, Any] = {}
    for key in PHOTO_FIELDS:
        if key in items:
            v = items[key][item_id]
            v = v.item() if hasattr(v, "item") else v
            out[key] = None if isinstance(v, float) and v != v else v
    q = urlencode({"index": index})
    out["thumb"] = f"/api/items/{item_id}/image?size=256&{q}"
    out["thumb2x"] = f"/api/items/{item_id}/image?size=512&{q}"
    return out


def item_json(store, item_id: int) -> dict:
    raw = store.item(item_id)
    out: dict[str, Any] = {"id": int(raw["id"]), "ref": raw.get("ref")}
    if store.has_labels:
        lab = int(raw["label"])
        out["label_id"], out["label"] = lab, store.class_names[lab].replace("_", " ")
        if store.superclass_names and "superclass" in raw:
            sup = int(raw["superclass"])
            out["superclass_id"], out["superclass"] = sup, store.superclass_names[sup].replace("_", " ")
    for key in ("path", "caption", "size", "mtime_ns", "sha256"):
        if key in raw:
            out[key] = raw[key]
    if raw.get("meta"):
        try:
            out["meta"] = json.loads(raw["meta"])
        except ValueError:
            out["meta"] = None
    return out
