"""Milvus backend: the same code talks to Milvus Lite (embedded, one file) or to a Milvus server or cluster.

- no URI: Milvus Lite in ``INDEX_DIR/milvus/milvus.db`` (the default; nothing to run);
- ``uri="http://host:19530"``: a server, with the token from the environment variable CLIPLENS_MILVUS_TOKEN.

A collection holds id (primary key = the store's row number), vector and the item fields (ref, label,
superclass and their names), so label and superclass filters run inside the database. Building upserts by id in
batches, so re-running it is idempotent; rows beyond the store's size (left by an earlier, larger index of the
same folder) are deleted. The collection records the store's fingerprint and refuses to serve another store.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from cliplens.errors import BackendError
from cliplens.index.backends import check_allowed, check_ids, check_queries, rescore, store_key

log = logging.getLogger(__name__)

DIR = "milvus"
LITE_FILE = "milvus.db"
TOKEN_ENV = "CLIPLENS_MILVUS_TOKEN"
STORE_PROPERTY = "cliplens.store_key"
MAX_TOPK = 16384  # Milvus's own limit on hits per query
_NAME_LEN = 255
_LABEL_FIELDS = ("label", "superclass")  # int64 columns filters use
_TEXT_FIELDS = {"ref": 65535, "label_name": 512, "superclass_name": 512}  # varchar columns and their max length


def _hint(store) -> str:
    return f"`cliplens build-index --index-dir {store.root} --backend milvus`"


def default_collection(store) -> str:
    """``cliplens_<index folder name>``: one collection per index folder, valid as a Milvus name."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", Path(store.root).name).strip("_") or "index"
    return f"cliplens_{slug}"[:_NAME_LEN]


class _DropUnimplemented(logging.Filter):
    """Milvus Lite serves pymilvus in-process over gRPC and does not implement every method pymilvus probes
    (``AllocTimestamp``); the client falls back by itself, but grpc logs each probe as an ERROR with a traceback.
    Only those records are dropped: any other gRPC server error is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "Method not implemented" in str(exc))


def _quiet_grpc_server() -> None:
    # gRPC's C core writes its own log lines to stderr (keepalive "too_many_pings" GOAWAYs from Milvus Lite under
    # load); errors that matter reach us as exceptions. A user who wants them sets GRPC_VERBOSITY themselves.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    grpc_log = logging.getLogger("grpc._server")
    if not any(isinstance(f, _DropUnimplemented) for f in grpc_log.filters):
        grpc_log.addFilter(_DropUnimplemented())
_VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_collection_name(name: str) -> str:
    """``name`` if Milvus accepts it as a collection name (a letter or _, then letters, digits, _; at most 255)."""
    if not isinstance(name, str) or len(name) > _NAME_LEN or not _VALID_NAME.fullmatch(name):
        shown = name[:40] + "..." if isinstance(name, str) and len(name) > 40 else name
        raise BackendError(f"{shown!r} is not a valid Milvus collection name: use letters, digits and _ (starting "
                           f"with a letter or _), at most {_NAME_LEN} characters")
    return name


def connect(store, *, uri: str | None = None, timeout: float = 10.0):
    """A MilvusClient for ``uri`` (a server) or for the Lite file inside the index folder; returns (client, uri)."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise BackendError("the milvus backend needs pymilvus: pip install 'cliplens[milvus]'") from None
    _quiet_grpc_server()
    token = ""
    if uri:
        token = os.environ.get(TOKEN_ENV, "")
    else:
        lite = Path(store.root) / DIR / LITE_FILE
        lite.parent.mkdir(parents=True, exist_ok=True)
        uri = str(lite)
    try:
        return MilvusClient(uri=uri, token=token, timeout=timeout), uri
    except Exception as exc:  # pymilvus raises MilvusException, grpc errors, ConnectionError, ...
        text = str(getattr(exc, "message", None) or exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        if uri.endswith(".db"):
            raise BackendError(f"cannot open Milvus Lite file {uri} ({reason}): is another process using it? "
                               "(is milvus-lite installed? pip install 'cliplens[milvus]')") from None
        raise BackendError(f"cannot reach Milvus at {uri} ({reason}): start the server or fix the Milvus URI; "
                           f"a server with authentication needs its token in ${TOKEN_ENV}",
                           fix={"milvus_uri": None}) from None


class MilvusIndex:
    """One Milvus collection mirroring one store. Create with :meth:`build` or :meth:`open`."""

    def __init__(self, *, client, collection: str, store, uri: str, search_params: dict | None = None):
        self.client = client
        self.collection = collection
        self.store = store
        self.uri = uri
        self.search_params = dict(search_params or {})  # e.g. {"ef": 64} for a server-side HNSW index
        self.columns = {c: store.items[c].astype(np.int64) for c in _LABEL_FIELDS if c in store.items}
        self.last_filter: str | None = None  # the filter expression of the latest search (what the database ran)

    def settings(self) -> dict:
        return {"collection": self.collection}

    def describe(self) -> str:
        return f"Milvus collection {self.collection} ({self.uri})"

    # ---------------------------------------------------------------- build / open
    @classmethod
    def build(cls, store, *, uri: str | None = None, collection: str | None = None, batch_size: int = 2000,
              index_type: str | None = None, index_params: dict | None = None, timeout: float = 10.0,
              progress: bool = True, search_params: dict | None = None) -> "MilvusIndex":
        """Create the collection if needed, upsert every item by id in batches, drop rows the store no longer has.

        ``index_type``: Milvus's vector index, by default FLAT (exact) on Milvus Lite and AUTOINDEX on a server.
        """
        from pymilvus import DataType, MilvusClient
        from tqdm import tqdm

        name = check_collection_name(collection) if collection else default_collection(store)
        client, uri = connect(store, uri=uri, timeout=timeout)
        n, dim = len(store), store.dim
        fields = [c for c in (*_LABEL_FIELDS, *_TEXT_FIELDS) if c in store.items]
        if client.has_collection(name):
            _check_shape(client, name, dim, fields, uri)
            # Mark it as being rebuilt first: a crash mid-way leaves a collection that refuses to be searched.
            client.alter_collection_properties(name, properties={STORE_PROPERTY: "building"})
        else:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                description=f"cliplens index of {Path(store.root).name}")
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            for c in fields:
                if c in _LABEL_FIELDS:
                    schema.add_field(c, DataType.INT64)
                else:
                    schema.add_field(c, DataType.VARCHAR, max_length=_TEXT_FIELDS[c])
            ip = client.prepare_index_params()
            index_type = index_type or ("FLAT" if uri.endswith(".db") else "AUTOINDEX")
            ip.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=index_params or {})
            client.create_collection(name, schema=schema, index_params=ip, consistency_level="Strong",
                                     properties={STORE_PROPERTY: "building"})
        items = store.items
        bar = tqdm(total=n, unit="vec", desc=f"milvus {name}", disable=not progress, dynamic_ncols=True)
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            vectors = np.asarray(store.embeddings[lo:hi], dtype=np.float32)
            rows = [{"id": i, "vector": vectors[i - lo], **{c: _py(items[c][i]) for c in fields}}
                    for i in range(lo, hi)]
            client.upsert(name, rows)
            bar.update(hi - lo)
        bar.close()
        client.delete(name, filter=f"id >= {n}")  # an earlier, larger index of this folder
        client.flush(name)
        client.alter_collection_properties(name, properties={STORE_PROPERTY: store_key(store)})
        log.info("upserted %d vectors into Milvus collection %s at %s", n, name, uri)
        return cls(client=client, collection=name, store=store, uri=uri, search_params=search_params)

    @classmethod
    def open(cls, store, *, uri: str | None = None, collection: str | None = None, timeout: float = 10.0,
             search_params: dict | None = None) -> "MilvusIndex":
        name = check_collection_name(collection) if collection else default_collection(store)
        client, uri = connect(store, uri=uri, timeout=timeout)
        if collection is None and not client.has_collection(name):  # the one cliplens collection there, if only one
            ours = sorted(c for c in client.list_collections() if str(c).startswith("cliplens_"))
            if len(ours) > 1:
                raise BackendError(f"no Milvus collection {name!r} at {uri}, and several others: {', '.join(ours)}; "
                                   "pick one with --milvus-collection")
            name = ours[0] if ours else name
        if not client.has_collection(name):
            raise BackendError(f"no Milvus collection {name!r} at {uri}: build it with {_hint(store)}")
        key = (client.describe_collection(name).get("properties") or {}).get(STORE_PROPERTY)
        if key != store_key(store):
            state = "is half built" if key == "building" else "was built for another index"
            raise BackendError(f"Milvus collection {name!r} at {uri} {state}: rebuild it with {_hint(store)}")
        client.load_collection(name)
        return cls(client=client, collection=name, store=store, uri=uri, search_params=search_params)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
               expr: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine. ``allowed`` becomes a database filter (by label or superclass where it is one);
        ``expr`` is an extra Milvus boolean expression, e.g. ``"superclass in [3, 7]"``."""
        q = check_queries(queries, self.store.dim)
        allowed = check_allowed(allowed, len(self.store))
        available = len(self.store) if allowed is None else int(allowed.sum())
        k = min(int(k), available)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if k > MAX_TOPK:
            raise BackendError(f"Milvus returns at most {MAX_TOPK} hits per query, asked for {k}: ask for fewer")
        parts = [p for p in (self.filter_expr(allowed), expr) if p]
        self.last_filter = " and ".join(f"({p})" for p in parts) if parts else None
        params = {"metric_type": "IP", "params": self.search_params}
        res = self.client.search(self.collection, data=[row for row in q], limit=k, filter=self.last_filter or "",
                                 output_fields=["id"], search_params=params)
        candidates = np.full((len(q), k), -1, dtype=np.int64)
        for row, hits in enumerate(res):
            ids = [int(h["id"]) for h in hits][:k]
            candidates[row, : len(ids)] = ids
        return rescore(q, candidates, self.store.embeddings, k)

    def filter_expr(self, allowed: np.ndarray | None) -> str | None:
        """The Milvus expression for a mask: ``label in [...]`` / ``superclass in [...]`` when the mask is exactly
        a set of classes (so the database filters on its own column), else a list of ids."""
        if allowed is None or allowed.all():
            return None
        exact_sets = []  # (number of values, column, values) for each column the mask is a set of values of
        for column, values in self.columns.items():
            chosen = np.unique(values[allowed])
            if np.array_equal(np.isin(values, chosen), allowed):
                exact_sets.append((len(chosen), column, chosen))
        if exact_sets:  # the shortest: a superclass filter reads "superclass in [3]", not five labels
            _, column, chosen = min(exact_sets, key=lambda t: t[0])
            return f"{column} in [{', '.join(map(str, chosen.tolist()))}]"
        ids = np.flatnonzero(allowed)
        if len(ids) <= len(allowed) - len(ids):
            return f"id in [{', '.join(map(str, ids.tolist()))}]"
        return f"id not in [{', '.join(map(str, np.flatnonzero(~allowed).tolist()))}]"

    def delete(self, ids) -> int:
        """Delete items from the collection; returns how many rows the database removed."""
        ids = check_ids(ids, len(self.store))
        if not len(ids):
            return 0
        res = self.client.delete(self.collection, ids=ids.tolist())
        return int(res.get("delete_count", len(ids)) if isinstance(res, dict) else len(ids))

    def close(self) -> None:
        self.client.close()


def _check_shape(client, name: str, dim: int, fields: list[str], uri: str) -> None:
    info = client.describe_collection(name)
    have = {f["name"]: f for f in info.get("fields", [])}
    vec_dim = int((have.get("vector", {}).get("params") or {}).get("dim", -1))
    missing = [f for f in ["id", *fields] if f not in have]
    if vec_dim != dim or missing:
        what = f"{vec_dim}-dimensional vectors" if vec_dim != dim else f"no {', '.join(missing)} field"
        raise BackendError(f"Milvus collection {name!r} at {uri} has {what}, this index needs {dim} dimensions and "
                           f"fields {', '.join(fields) or 'none'}: choose another collection name or drop that one")


def _py(value):
    return value.item() if isinstance(value, np.generic) else value
