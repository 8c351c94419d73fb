"""Combined, weighted queries and result filters, shared by the CLI and the web API.

A query is a list of terms joined by ``+`` and ``-``::

    "2:red tractor" + ./field.jpg - snow + #123

- ``W:...`` gives a term the weight W (default 1); ``-`` negates it;
- ``#123`` or ``id:123`` is an indexed item ("more like this"); ``./x.jpg``, ``/x.png``, ``~/x.webp`` or any
  existing image file is an image (paths only where the caller allows them: never from the web);
  ``text:...`` / ``image:...`` force the kind; anything else is text, wrapped in the prompt template(s).

Every term is encoded to a unit vector, multiplied by its signed weight, the sum is L2-normalised again, and
that one vector is searched. Filters (``label=``, ``superclass=``, ``path=``, ``caption=``) become a boolean
mask over the items; ``min_score`` drops hits below a cosine similarity.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import fnmatch
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cliplens.sources.folder import IMAGE_EXTENSIONS, ImageSkipped, decode_image
from cliplens.errors import QueryError
from cliplens.prompts import TEMPLATE_SETS, fill, load_templates, match_class, wrap_query

DEFAULT_TEMPLATES = ("a photo of a {}.",)
MAX_WEIGHT = 100.0
MAX_TERMS = 16
QUERY_IMAGE_MAX_PIXELS = 100_000_000

_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:(.*)$", re.S)
_ITEM = re.compile(r"^(?:#|id:)\s*(\d+)$")
WHERE_KEYS = ("label", "superclass", "path", "caption", "taken", "camera")
SORT_KEYS = ("score", "taken", "-taken")


@dataclass(frozen=True)
class Term:
    kind: str  # "text", "image" (a file path, or an uploaded image) or "item" (an index id)
    value: str | int  # the text, the path (or upload name), the item id
    weight: float = 1.0  # signed: negative terms subtract
    image: Any = field(default=None, compare=False, repr=False)  # a decoded PIL image, for uploads

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value, "weight": self.weight}


@dataclass(frozen=True)
class EncodedQuery:
    terms: tuple[Term, ...]
    vector: np.ndarray  # float32 (D,) unit
    prompt: str  # what was encoded, for people
    class_hint: str | None  # the class name the query is about, if any (for match marks / precision@k)


# --------------------------------------------------------------------------- parsing


def _classify(token: str, weight: float, *, allow_paths: bool) -> Term:
    if token.startswith("text:"):
        body = token[5:].strip()
        if not body:
            raise QueryError("empty text term 'text:'; put words after it")
        return Term("text", body, weight)
    m = _ITEM.match(token)
    if m:
        return Term("item", int(m.group(1)), weight)
    forced = token.startswith("image:")
    path = token[6:].strip() if forced else token
    looks = forced or path.startswith(("./", "../", "/", "~", ".\\")) or path.lower().endswith(IMAGE_EXTENSIONS)
    if looks:
        if not allow_paths:
            raise QueryError(f"image paths are not allowed here ({path!r}): upload the image instead")
        p = Path(path).expanduser()
        if not p.is_file():
            raise QueryError(f"no image file {path!r}; give the path of a jpg/png/webp/gif/bmp/tiff file "
                             "(or prefix text: to search for the words)")
        return Term("image", str(p), weight)
    return Term("text", token.strip(), weight)


def parse_terms(tokens: Sequence[str], *, allow_paths: bool = True) -> tuple[Term, ...]:
    """Terms from command-line words: ``["2:red tractor", "+", "./field.jpg", "-", "snow"]``.

    Consecutive words between operators form one term (``red tractor`` = ``"red tractor"``).
    """
    groups: list[tuple[int, list[str]]] = []
    sign = 1
    pending = False  # an operator waits for its term
    for tok in tokens:
        if tok in ("+", "-"):
            if pending:
                raise QueryError(f"two operators in a row near {tok!r}; write term + term - term")
            sign, pending = (1 if tok == "+" else -1), True
            continue
        if pending or not groups:
            groups.append((sign, [tok]))
            pending = False
        else:
            groups[-1][1].append(tok)
    if pending:
        raise QueryError("the query ends with an operator; put a term after + or -")
    if not groups:
        raise QueryError("empty query; type some words, or give an image or an item id to search like",
                         fix={"image": None, "similar": None})
    if len(groups) > MAX_TERMS:
        raise QueryError(f"too many terms ({len(groups)}); at most {MAX_TERMS}")
    terms = []
    for sign, words in groups:
        text = " ".join(w.strip() for w in words).strip()
        weight = 1.0
        m = _WEIGHT.match(text)
        if m:
            weight, text = float(m.group(1)), m.group(2).strip()
            if not math.isfinite(weight) or weight == 0 or abs(weight) > MAX_WEIGHT:
                raise QueryError(f"weight {m.group(1)} must be non-zero and at most {MAX_WEIGHT:g} in size")
        if not text:
            raise QueryError(f"empty query term {' '.join(words)!r}; type some words, W:words, #ID or an image path")
        terms.append(_classify(text, sign * weight, allow_paths=allow_paths))
    return tuple(terms)


def parse_query(text: str, *, allow_paths: bool = False) -> tuple[Term, ...]:
    """Terms from one string, shell-quoted: ``'"2:red tractor" + #12 - snow'``."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # an unbalanced quote ("don't"): plain words then
        tokens = text.split()
    return parse_terms(tokens, allow_paths=allow_paths)


def resolve_templates(spec: str | None, *, allow_files: bool = False) -> tuple[str, ...]:
    """A built-in set name (single, cifar100, imagenet80), a literal template with ``{}``, or the default.

    ``allow_files`` (the CLI, never the web) also reads a template file (one per line, or JSON).
    """
    if spec is None or spec == "":
        return DEFAULT_TEMPLATES
    if spec in TEMPLATE_SETS or (allow_files and "{}" not in spec and Path(spec).is_file()):
        return load_templates(spec)
    fill(spec, "x")  # PromptError unless it has exactly one {}
    return (spec,)


# --------------------------------------------------------------------------- encoding


def encode_query(terms: Sequence[Term], *, store, encode_texts: Callable[[list[str]], np.ndarray],
                 encode_images: Callable[[list], np.ndarray], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 raw: bool = False, max_pixels: int = QUERY_IMAGE_MAX_PIXELS) -> EncodedQuery:
    """Encode each term, weight, sum and re-normalise (in float64)."""
    if not terms:
        raise QueryError("empty query; type some words, or give an image or an item id")
    total = np.zeros(store.dim, np.float64)
    parts = []
    single = None  # the encoder's own float32 vector, when one prompt/image/item at weight 1 is the whole query
    for t in terms:
        if t.kind == "text":
            prompts = [t.value.strip()] if raw else [wrap_query(t.value, tpl) for tpl in templates]
            raw_vecs = np.asarray(encode_texts(prompts))
            vecs = raw_vecs.astype(np.float64)
            vec = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).mean(axis=0)  # prompt ensemble
            vec /= np.linalg.norm(vec)
            single = raw_vecs[0] if len(prompts) == 1 else None
            shown = f'"{prompts[0]}"' if len(prompts) == 1 else f'"{t.value}" x {len(prompts)} templates'
        elif t.kind == "item":
            n = len(store)
            if not 0 <= int(t.value) < n:
                raise QueryError(f"no item #{t.value} in this index (ids run 0..{n - 1})")
            single = np.asarray(store.embeddings[int(t.value)], np.float32)
            vec = single.astype(np.float64)
            shown = f"#{t.value}"
        elif t.kind == "image":
            image = t.image
            if image is None:
                try:
                    image = decode_image(t.value, max_pixels=max_pixels)
                except ImageSkipped as exc:
                    raise QueryError(f"cannot use image {t.value}: {exc.reason}") from None
            single = np.asarray(encode_images([image])[0], np.float32)
            vec = single.astype(np.float64)
            shown = f"image {Path(str(t.value)).name}"
        else:
            raise QueryError(f"unknown term kind {t.kind!r}")
        total += t.weight * vec
        w = abs(t.weight)
        parts.append(("- " if t.weight < 0 else "+ ") + (f"{w:g}*" if w != 1 else "") + shown)
    norm = np.linalg.norm(total)
    if not norm > 1e-6:
        raise QueryError("the terms cancel each other out (the weighted sum is zero); change a weight")
    prompt = " ".join(parts)[2:]
    if len(terms) == 1 and terms[0].kind == "text" and terms[0].weight == 1 and (raw or len(templates) == 1):
        prompt = prompt.strip('"')  # a plain text query: the prompt is exactly the encoded sentence
    vector = single if len(terms) == 1 and terms[0].weight == 1 and single is not None else total / norm
    return EncodedQuery(terms=tuple(terms), vector=np.asarray(vector, np.float32), prompt=prompt,
                        class_hint=_class_hint(terms, store))


def _class_hint(terms: Sequence[Term], store) -> str | None:
    positive_text = [t for t in terms if t.kind == "text" and t.weight > 0]
    if len(positive_text) == 1:
        return str(positive_text[0].value)
    items = [t for t in terms if t.weight > 0]
    if not positive_text and len(items) == 1 and items[0].kind == "item" and store.has_labels:
        return str(store.items["label_name"][int(items[0].value)])  # "more like this": same class counts as right
    return None


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Where:
    key: str  # label, superclass, path, caption, taken or camera
    values: tuple[str, ...]  # any of them may match
    op: str = "="  # taken only: >=, <=, >, < (and = for "within that day, month or year")

    def to_json(self) -> str:
        return f"{self.key}{self.op}{','.join(self.values)}"


_WHERE = re.compile(r"^\s*([A-Za-z_]+)\s*(>=|<=|=|>|<)(.*)$", re.S)
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?)?)?$")


def date_range(text: str) -> tuple[str, str]:
    """The [start, end) of the period a date names, as ISO strings comparable with the ``taken`` column:
    "2023" is the year, "2023-06" the month, "2023-06-14" the day, "2023-06-14T18:02" the minute."""
    m = _DATE.match(text.strip())
    if not m:
        raise QueryError(f"bad date {text!r}: write YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM")
    parts = [int(p) for p in m.groups() if p is not None]
    try:
        start = datetime.datetime(*parts, *([1] * max(0, 3 - len(parts))))
    except ValueError:
        raise QueryError(f"bad date {text!r}: no such day") from None
    if len(parts) == 1:
        end = start.replace(year=start.year + 1)
    elif len(parts) == 2:
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    else:
        end = start + {3: datetime.timedelta(days=1), 5: datetime.timedelta(minutes=1),
                       6: datetime.timedelta(seconds=1)}[len(parts)]
    return start.isoformat(timespec="seconds"), end.isoformat(timespec="seconds")


def taken_strings(column) -> list[str | None]:
    """A ``taken`` column as ISO strings ("2023-06-14T18:02:11") or None: photo indexes store strings; a
    datetime64 column (NaT for missing) is converted, so both compare the same way."""
    values = np.asarray(column)
    if values.dtype.kind == "M":
        text = np.datetime_as_string(values, unit="s")
        return [None if np.isnat(v) else str(t) for v, t in zip(values, text)]
    return [v if isinstance(v, str) and v else None for v in values]


def taken_bounds(w: "Where") -> tuple[str | None, str | None]:
    """A ``taken`` filter as [low, high) ISO bounds (None: open)."""
    start, end = date_range(w.values[0])
    return {">=": (start, None), ">": (end, None), "<": (None, start), "<=": (None, end), "=": (start, end)}[w.op]


def parse_where(specs: Sequence[str]) -> tuple[Where, ...]:
    """``["label=tulip,rose", "superclass=flowers", "path=2023/*"]``; the same key twice means either."""
    merged: dict[str, list[str]] = {}
    ranges: list[Where] = []
    for spec in specs:
        m = _WHERE.match(spec)
        key, op, value = (m.group(1).lower(), m.group(2), m.group(3)) if m else ("", "", "")
        if key == "ref":
            key = "path"
        if not m or key not in WHERE_KEYS:
            raise QueryError(f"bad filter {spec!r}: write KEY=VALUE with KEY one of {', '.join(WHERE_KEYS)} "
                             "(taken also takes >=, <=, >, <)")
        if op != "=" and key != "taken":
            raise QueryError(f"bad filter {spec!r}: only taken compares with {op}; write {key}=VALUE")
        values = [v.strip() for v in (value.split(",") if key in ("label", "superclass") else [value])]
        if not all(values):
            raise QueryError(f"filter {spec!r} has an empty value")
        if key == "taken":
            date_range(values[0])  # a bad date is said now
            ranges.append(Where(key, (values[0],), op))
            continue
        merged.setdefault(key, []).extend(values)
    return tuple(Where(k, tuple(v)) for k, v in merged.items()) + tuple(ranges)


def where_mask(store, wheres: Sequence[Where]) -> np.ndarray | None:
    """Boolean (N,) mask of the items every filter accepts, or None when there are no filters."""
    if not wheres:
        return None
    mask = np.ones(len(store), bool)
    for w in wheres:
        if w.key in ("label", "superclass"):
            names = store.class_names if w.key == "label" else store.superclass_names
            column = store.labels if w.key == "label" else store.superclasses
            if not names or column is None:
                raise QueryError(f"this index has no {w.key}s to filter by; use path= or caption= for a folder")
            ids = []
            for v in w.values:
                i = match_class(v, names)
                if i is None:
                    close = difflib.get_close_matches(v.lower().replace(" ", "_"), names, n=3)
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise QueryError(f"no {w.key} named {v!r} in this index{hint}")
                ids.append(i)
            mask &= np.isin(column, ids)
        elif w.key == "path":  # a glob on the relative path (CIFAR indexes: on the file name in ``ref``)
            mask &= _glob_mask(store.items.get("path", store.items["ref"]), w.values)
        elif w.key == "taken":  # a date range on the ISO "taken" column (EXIF date, else the file's mtime)
            if "taken" not in store.items:
                raise QueryError("this index has no photo dates to filter by (index a folder or a list of photos)")
            low, high = taken_bounds(w)
            taken = taken_strings(store.items["taken"])
            mask &= np.fromiter((t is not None and (low is None or t >= low) and (high is None or t < high)
                                 for t in taken), bool, count=len(taken))
        elif w.key == "camera":  # a case-insensitive glob on "Make Model"
            if "camera" not in store.items:
                raise QueryError("this index has no camera names to filter by (index a folder or a list of photos)")
            mask &= _glob_mask(store.items["camera"], [v.lower() for v in w.values], lower=True)
        else:  # caption: a case-insensitive substring
            if "caption" not in store.items:
                raise QueryError("this index has no captions to filter by")
            mask &= _glob_mask(store.items["caption"], [f"*{v.lower()}*" for v in w.values], lower=True)
    return mask


def _glob_mask(column, patterns: Sequence[str], *, lower: bool = False) -> np.ndarray:
    def ok(value) -> bool:
        if value is None or (isinstance(value, float) and value != value):
            return False
        text = str(value).lower() if lower else str(value)
        return any(fnmatch.fnmatchcase(text, p) for p in patterns)

    return np.fromiter((ok(v) for v in column), bool, count=len(column))


# --------------------------------------------------------------------------- running


def run_query(searcher, terms: Sequence[Term], k: int, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
              raw: bool = False, where: Sequence[Where] = (), min_score: float | None = None,
              query: str | None = None, exclude_query_items: bool = True,
              encode_texts: Callable | None = None, encode_images: Callable | None = None,
              max_pixels: int = QUERY_IMAGE_MAX_PIXELS, restrict: np.ndarray | None = None):
    """Encode ``terms``, apply the filters (and ``restrict``, a boolean mask of allowed items) and search; returns
    the core ``SearchResult`` (+ terms, filters)."""
    store = searcher.store
    enc = encode_query(terms, store=store, encode_texts=encode_texts or searcher.encoder.encode_texts,
                       encode_images=encode_images or searcher.encoder.encode_images, templates=templates,
                       raw=raw, max_pixels=max_pixels)
    in_index = bool(where) and getattr(searcher.index, "accepts_where", False)  # pgvector: the filters become SQL
    allowed = None if in_index else where_mask(store, where)
    if restrict is not None:  # e.g. the page's "suspect labels only": a mask of the items that may be hits
        allowed = restrict if allowed is None else allowed & restrict
    items = [int(t.value) for t in terms if t.kind == "item" and t.weight > 0]
    if exclude_query_items and items:  # "more like this" shows the others, not the item itself
        allowed = np.ones(len(store), bool) if allowed is None else allowed.copy()
        allowed[items] = False
    text = query if query is not None else " ".join(
        ("- " if t.weight < 0 else "+ ") + (f"{abs(t.weight):g}:" if abs(t.weight) != 1 else "")
        + (f"#{t.value}" if t.kind == "item" else str(t.value)) for t in terms)[2:]
    result = searcher.search_vector(enc.vector, k, query=text, prompt=enc.prompt, class_hint=enc.class_hint,
                                    allowed=allowed, min_score=min_score, where=where if in_index else ())
    extra = {**result.extra, "terms": [t.to_json() for t in terms], "where": [w.to_json() for w in where],
             "min_score": min_score}
    return dataclasses.replace(result, extra=extra)


def page(searcher, result, k: int, *, offset: int = 0, sort: str = "score", collapse: float | None = None):
    """Results ``offset`` .. ``offset + k`` of ``result`` (searched for at least that many hits), near-identical
    hits collapsed into the best of them when ``collapse`` (a cosine threshold) is given, then ordered by
    ``sort`` (``score``, or ``taken`` / ``-taken``: the photo date, after the score cut)."""
    from cliplens.duplicates import collapse as group

    if sort not in SORT_KEYS:
        raise QueryError(f"unknown sort {sort!r}: use {', '.join(SORT_KEYS)}")
    store, hits = searcher.store, list(result.hits)
    if collapse is not None:
        groups = group(store.embeddings, [h.id for h in hits], collapse)
        by_id = {h.id: h for h in hits}
        hits = [dataclasses.replace(by_id[g[0]], duplicates=tuple(g[1:])) for g in groups]
    more = len(hits) > offset + k
    hits = [dataclasses.replace(h, rank=offset + j + 1) for j, h in enumerate(hits[offset : offset + k])]
    if sort != "score":
        if "taken" not in store.items:
            raise QueryError("this index has no photo dates to sort by (index a folder or a list of photos)")
        taken = taken_strings(store.items["taken"])
        dated = [h for h in hits if taken[h.id] is not None]
        undated = [h for h in hits if taken[h.id] is None]
        hits = sorted(dated, key=lambda h: taken[h.id], reverse=sort.startswith("-")) + undated
    precision = result.precision_at_k
    if result.query_class is not None and (offset or collapse is not None):
        precision = sum(bool(h.match) for h in hits) / len(hits) if hits else None
    extra = {**result.extra, "offset": offset, "more": more, "sort": sort,
             "collapse": {"threshold": collapse} if collapse is not None else None}
    return dataclasses.replace(result, hits=tuple(hits), k=k, precision_at_k=precision, extra=extra)


def fetch_size(k: int, offset: int, n: int, collapse: bool) -> int:
    """How many hits to search for to fill results ``offset`` .. ``offset + k`` (and know whether there are more)."""
    want = offset + k + 1
    return min(n, want * 3 if collapse else want)


def search_words(searcher, words: Sequence[str], k: int, *, images: Sequence[str] = (), similar: Sequence[int] = (),
                 where: Sequence[str] = (), min_score: float | None = None, template: str | None = None,
                 raw: bool = False, offset: int = 0, sort: str = "score", collapse: float | None = None,
                 paged: bool = False):
    """The CLI's ``search``: words (combined syntax), ``--image``, ``--similar``, ``--where``, ``--min-score``,
    ``--offset``, ``--sort`` and near-duplicate collapsing (``collapse``: a cosine threshold, see :func:`page`);
    ``paged``: also say whether there are more results (``more``), as a page does.

    A plain query (one text term, weight 1, one template, no filter, first page by score, nothing collapsed)
    takes the core ``Searcher.search`` path, so its result is exactly what it always was.
    """
    if paged or offset or sort != "score" or collapse is not None:
        n = len(searcher.store)
        if not isinstance(k, int) or not 1 <= k <= n:
            raise QueryError(f"k must be between 1 and the index size {n}, got {k}")
        found = search_words(searcher, words, fetch_size(k, offset, n, collapse is not None), images=images,
                             similar=similar, where=where, min_score=min_score, template=template, raw=raw)
        return page(searcher, found, k, offset=offset, sort=sort, collapse=collapse)
    terms = list(parse_terms(words)) if words else []
    terms += [_classify(f"image:{p}", 1.0, allow_paths=True) for p in images]
    terms += [Term("item", int(i)) for i in similar]
    if not terms:
        raise QueryError("nothing to search for: give words, an image or an item id",
                         fix={"image": None, "similar": None})
    templates = resolve_templates(template, allow_files=True)
    wheres = parse_where(where)
    plain = len(terms) == 1 and terms[0].kind == "text" and terms[0].weight == 1
    if plain and len(templates) == 1 and not wheres:
        return searcher.search(str(terms[0].value), k, template=templates[0], raw=raw, min_score=min_score)
    return run_query(searcher, terms, k, templates=templates, raw=raw, where=wheres, min_score=min_score,
                     query=" ".join(words) if words and not images and not similar else None)
