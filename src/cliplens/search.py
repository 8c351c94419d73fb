"""The single entry point for queries, shared by the CLI, the evaluation and the web app."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from cliplens.errors import CliplensError, QueryError
from cliplens.index import ExactIndex, VectorIndex
from cliplens.prompts import match_class, wrap_query
from cliplens.store import IndexStore

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    id: int
    score: float  # cosine similarity, higher is better, whatever the backend
    ref: str
    label: str | None = None
    superclass: str | None = None
    match: bool | None = None  # label equals the class the query names (None when the query names none)
    duplicates: tuple[int, ...] = ()  # near-identical items collapsed into this hit (cliplens.duplicates)

    def to_json(self) -> dict:
        out = {"rank": self.rank, "id": self.id, "score": round(self.score, 6), "label": self.label,
               "superclass": self.superclass, "ref": self.ref, "match": self.match}
        if self.duplicates:
            out["duplicates"] = list(self.duplicates)
        return out


@dataclass(frozen=True)
class SearchResult:
    query: str
    prompt: str  # what was actually encoded
    k: int
    hits: tuple[Hit, ...]
    query_class: str | None = None  # the class the query names, when the index has labels
    precision_at_k: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"query": self.query, "prompt": self.prompt, "k": self.k, "query_class": self.query_class,
                "hits": [h.to_json() for h in self.hits], "precision_at_k": self.precision_at_k, **self.extra}


class Searcher:
    """Encoder + store + vector index. The encoder is passed in, so tests can use a tiny one."""

    def __init__(self, *, encoder, store: IndexStore, index: VectorIndex | None = None, check_model: bool = True):
        if check_model:
            store.check_model(encoder.info)
        self.encoder = encoder
        self.store = store
        self._exact = index is None
        self.index = index if index is not None else ExactIndex(store.embeddings)
        self._english = tuple(n.replace("_", " ") for n in store.class_names)

    def refreshed(self) -> "Searcher":
        """This searcher, or one over the index folder's newer generation once one is complete.

        Only for the default exact index: a FAISS or Milvus backend was built for one generation and is rebuilt
        with ``cliplens build-index``, so a searcher using one stays on the generation it was built for.
        """
        store = self.store.refreshed()
        if store is self.store or not self._exact:
            return self
        try:
            return Searcher(encoder=self.encoder, store=store)
        except CliplensError as exc:  # e.g. rebuilt with another model: keep answering from the old one
            log.warning("staying on generation %s of %s (%s)", self.store.generation, self.store.root, exc)
            return self

    def search(self, text: str, k: int = 10, *, template: str = DEFAULT_TEMPLATE, raw: bool = False,
               allowed: np.ndarray | None = None, min_score: float | None = None) -> SearchResult:
        """Wrap ``text`` in ``template`` (unless ``raw``), encode it and rank the index by cosine similarity.

        ``allowed`` (bool (N,)) restricts the ranking to some items; hits scoring below ``min_score`` are dropped.
        """
        self._check_k(k)
        prompt = wrap_query(text, template, raw=raw)
        query = self.encoder.encode_texts([prompt])[0]
        return self.search_vector(query, k, query=text, prompt=prompt, class_hint=text, allowed=allowed,
                                  min_score=min_score)

    def search_vector(self, vector: np.ndarray, k: int, *, query: str, prompt: str, class_hint: str | None = None,
                      allowed: np.ndarray | None = None, min_score: float | None = None, where=()) -> SearchResult:
        """``where``: parsed filters for an index that runs them itself (``accepts_where``, e.g. pgvector's SQL)."""
        self._check_k(k)
        extra = {"where": tuple(where)} if where else {}
        scores, ids = self.index.search(np.asarray(vector, np.float32)[None], k, allowed=allowed, **extra)
        target = match_class(class_hint, self.store.class_names) if (class_hint and self.store.has_labels) else None
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if min_score is None or s >= min_score]
        hits = tuple(self._hit(rank, i, s, target) for rank, (i, s) in enumerate(pairs, 1))
        precision = None
        if target is not None and hits:
            precision = sum(h.match for h in hits) / len(hits)
        return SearchResult(query=query, prompt=prompt, k=k, hits=hits,
                            query_class=self._english[target] if target is not None else None,
                            precision_at_k=precision)

    def _hit(self, rank: int, item_id: int, score: float, target: int | None) -> Hit:
        items = self.store.items
        label = superclass = None
        match = None
        if self.store.has_labels:
            lab = int(items["label"][item_id])
            label = self._english[lab]
            if self.store.superclass_names:
                superclass = self.store.superclass_names[int(items["superclass"][item_id])].replace("_", " ")
            if target is not None:
                match = lab == target
        return Hit(rank=rank, id=item_id, score=score, ref=str(items["ref"][item_id]), label=label,
                   superclass=superclass, match=match)

    def _check_k(self, k: int) -> None:
        n = len(self.store)
        if not isinstance(k, (int, np.integer)) or k < 1 or k > n:
            raise QueryError(f"k must be between 1 and the index size {n}, got {k}")
