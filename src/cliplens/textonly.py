"""Text queries without torch: CLIP's text tower as a cached ONNX file, run by ONNX Runtime, fed by a pure-Python
tokenizer.

A one-shot ``cliplens search "tractor"`` used to spend ~4 s importing torch and open_clip and loading both towers
to encode eight tokens. Here the text tower is exported once per model (weights sha256) with torch, through
:mod:`cliplens.fast`'s exporter (``TextSuffix``: the same graph ``cliplens serve`` runs), into

    $CLIPLENS_HOME/cache/textonly/<model>-<sha256[:16]>-v<FORMAT>/
        text.onnx        the graph (small)
        text.weights     its weights, external data: ONNX Runtime memory-maps them, so a session opens in ~0.1 s
                         and only the pages a query touches are read (the token table is 100 MB; a query reads
                         a few rows of it)
        prefixes.npz     keys/values of the default template's beginning ("a photo of a"), so queries run only
                         the tokens after it (exact: attention is causal)
        meta.json        written last: its presence means the folder is complete; the measured parity to torch

The folder is built in a temporary folder beside it and renamed into place. Later processes import only numpy
and onnxruntime. Parity with the torch text tower on the same weights is tested (tests/unit/test_textonly.py:
largest difference <= 1e-5), and re-checked at build time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cliplens._files import cache_entry, cliplens_home, publish_cache_entry
from cliplens.errors import ModelError

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_PREFIXES = ("a photo of a",)  # the beginning of the default template "a photo of a {}."
PARITY_TOLERANCE = 1e-5  # largest |difference| / largest |value| accepted at build time
_PROBES = ("a photo of a tractor.", "a photo of a tulip in a field", "", "an émoji 🚜 & <b>html</b>", "x " * 100)


def available() -> bool:
    """True where ONNX Runtime is installed (``pip install 'cliplens[fast]'``)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def cache_folder(model_name: str, weights_sha256: str | None, *, root: str | Path | None = None) -> Path | None:
    """Where the text-only tower of this model lives (None for random weights: nothing stable to key on)."""
    if not weights_sha256:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    base = Path(root) if root is not None else cliplens_home() / "cache" / "textonly"
    return base / f"{safe}-{weights_sha256[:16]}-v{FORMAT}"


def causal_mask(past: int, length: int) -> np.ndarray:
    """Additive mask (length, past + length): every token sees the past and itself and earlier tokens."""
    mask = np.zeros((length, past + length), np.float32)
    mask[:, past:][np.triu_indices(length, 1)] = -np.inf
    return mask


class OrtTextRunner:
    """``TextSuffix`` in ONNX Runtime: int64 token ids (N, L) -> float32 features (N, D), numpy in and out.

    Keeps the keys/values of known prefixes (:meth:`add_prefix_kv`): when every row starts with one and it ends
    before every row's end-of-text, only the tokens after it run. ``prepack``: let ONNX Runtime repack the matrix
    products' weights at load (~0.7 s and a second copy of them, then each query about twice as fast: a server);
    without it a session opens in ~0.1 s and shares the memory-mapped weights (one-shot queries).
    """

    def __init__(self, model, *, layers: int, heads: int, head_dim: int, threads: int | None = None,
                 prepack: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or max(1, len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                            providers=["CPUExecutionProvider"])
        self._empty = np.zeros((layers, heads, 0, head_dim), np.float32)
        self.prefixes: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def add_prefix_kv(self, ids: Sequence[int], keys: np.ndarray, values: np.ndarray) -> None:
        self.prefixes[tuple(int(i) for i in ids)] = (np.ascontiguousarray(keys, np.float32),
                                                     np.ascontiguousarray(values, np.float32))

    def _shared_prefix(self, ids: np.ndarray) -> tuple[int, ...]:
        """The longest kept prefix that every row starts with and that ends before every row's end-of-text."""
        ends = ids.argmax(axis=1)
        for key in sorted(self.prefixes, key=len, reverse=True):
            p = len(key)
            if p <= ends.min() and (ids[:, :p] == np.asarray(key)).all():
                return key
        return ()

    def run(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        key = self._shared_prefix(ids)
        past_k, past_v = self.prefixes[key] if key else (self._empty, self._empty)
        p, rest = len(key), ids[:, len(key):]
        feeds = {"input0": rest, "input1": np.arange(p, p + rest.shape[1], dtype=np.int64),
                 "input2": causal_mask(p, rest.shape[1]), "input3": past_k, "input4": past_v}
        return self.session.run(None, feeds)[0]


class TextOnlyEncoder:
    """Encodes texts like :class:`cliplens.encoder.Encoder` (float32 unit rows), with no torch in the process.

    ``info`` is the index's model record (name, weights sha256, ...), so ``Searcher`` checks it as usual.
    Images need the full encoder: :meth:`encode_images` says so.
    """

    text_only = True

    def __init__(self, folder: Path, info, *, prepack: bool = False, threads: int | None = None,
                 meta: dict | None = None):
        from cliplens.tokenizer import ClipTokenizer

        meta = meta if meta is not None else json.loads((folder / "meta.json").read_text())
        self.folder, self.info, self.meta = folder, info, meta
        self.tokenizer = ClipTokenizer(context_length=meta["context_length"])
        self.runner = OrtTextRunner(folder / "text.onnx", layers=meta["layers"], heads=meta["heads"],
                                    head_dim=meta["head_dim"], threads=threads, prepack=prepack)
        with np.load(folder / "prefixes.npz") as kept:
            for i, ids in enumerate(meta["prefix_ids"]):
                self.runner.add_prefix_kv(ids, kept[f"k{i}"], kept[f"v{i}"])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, int(self.meta["embed_dim"])), np.float32)
        ids = self.tokenizer(texts)
        ids = ids[:, : int(ids.argmax(axis=1).max()) + 1]  # nothing after the last end-of-text matters (causal)
        feats = self.runner.run(ids).astype(np.float32, copy=False)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def encode_images(self, images) -> np.ndarray:
        raise ModelError("this text-only encoder has no image tower; load the full model for image queries")


def open_cached(info, *, root: str | Path | None = None, prepack: bool = False,
                threads: int | None = None) -> TextOnlyEncoder | None:
    """The cached text-only encoder for ``info``'s model (name and weights sha256), or None when there is none."""
    folder = cache_folder(info.name, info.weights_sha256, root=root)
    if folder is None or not (folder / "meta.json").is_file() or not available():
        return None
    try:
        return TextOnlyEncoder(folder, info, prepack=prepack, threads=threads)
    except Exception as exc:  # a damaged cache is no reason to fail: the caller loads the full model instead
        log.warning("ignoring the text-only cache %s (%s: %s)", folder, type(exc).__name__, str(exc)[:160])
        return None


def build_cache(encoder, *, root: str | Path | None = None, prefixes: Sequence[str] = DEFAULT_PREFIXES) -> Path | None:
    """Export ``encoder``'s text tower (a loaded torch :class:`~cliplens.encoder.Encoder`) into its cache folder.

    Returns the folder, or None where it cannot be made (no weights sha256, no ONNX Runtime or onnx, a text tower
    that is not CLIP's own, a tokenizer that is not CLIP's default one, parity off). Never raises for those:
    the torch path keeps working.
    """
    info = encoder.info
    folder = cache_folder(info.name, info.weights_sha256, root=root)
    if folder is None or (folder / "meta.json").is_file():
        return folder if folder is not None and (folder / "meta.json").is_file() else None
    try:
        from cliplens import fast
        from cliplens.tokenizer import ClipTokenizer

        if not (available() and fast.text_supported(encoder.model) and _same_tokenizer(encoder.tokenizer)):
            return None
        with cache_entry(folder) as tmp:
            meta = fast.export_text_tower(encoder, tmp, prefixes, tokenizer=ClipTokenizer(
                context_length=encoder.tokenizer.context_length), fmt=FORMAT)
            error = _parity(encoder, tmp, meta)
            if error > PARITY_TOLERANCE:
                log.warning("text-only tower differs by %.1e (relative) from torch; not cached", error)
                return None
            meta["parity_relative_max_error"] = error
            publish_cache_entry(tmp, folder, meta)
    except Exception as exc:
        log.warning("could not prepare the text-only tower (%s: %s); text queries keep loading torch",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return None
    log.info("text-only tower cached in %s", folder)
    return folder if (folder / "meta.json").is_file() else None


def _same_tokenizer(tokenizer) -> bool:
    """True for open_clip's default CLIP tokenizer (what :class:`~cliplens.tokenizer.ClipTokenizer` reproduces)."""
    from cliplens.tokenizer import ClipTokenizer

    if type(tokenizer).__name__ != "SimpleTokenizer" or getattr(tokenizer, "reduction_fn", None) is not None:
        return False
    if getattr(getattr(tokenizer, "clean_fn", None), "__name__", "") != "_clean_lower":
        return False
    ours = ClipTokenizer(context_length=tokenizer.context_length)
    return bool((ours(list(_PROBES)) == tokenizer(list(_PROBES)).numpy()).all())


def _parity(encoder, folder: Path, meta: dict) -> float:
    """Largest |ONNX - torch| / largest |torch| over probe texts, with and without the kept prefix."""
    from cliplens import fast

    ours = TextOnlyEncoder(folder, encoder.info, prepack=False, meta=meta)
    texts = [*_PROBES, "a photo of a dog.", "a photo of a red tractor in the snow"]
    ids = ours.tokenizer(texts)
    ids = ids[:, : int(ids.argmax(axis=1).max()) + 1]
    want = fast.text_features(encoder, ids)  # the torch text tower, on the same token ids
    got_whole = ours.runner.session.run(None, {
        "input0": ids, "input1": np.arange(ids.shape[1], dtype=np.int64), "input2": causal_mask(0, ids.shape[1]),
        "input3": ours.runner._empty, "input4": ours.runner._empty})[0]
    with_prefix = [t for t in texts if t.startswith("a photo of a ")]
    pids = ours.tokenizer(with_prefix)
    pids = pids[:, : int(pids.argmax(axis=1).max()) + 1]
    got_prefix = ours.runner.run(pids)
    want_prefix = fast.text_features(encoder, pids)
    scale = max(float(np.abs(want).max()), 1e-12)
    return max(float(np.abs(got_whole - want).max()) / scale, float(np.abs(got_prefix - want_prefix).max()) / scale)
