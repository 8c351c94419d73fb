"""``--precision fast``: faster towers that still agree with the exact ones (measured: docs/performance.md).

Image tower (indexing time is almost all image tower: ViT-B/32 is ~4.4 GMACs per image), backends in the
order ``auto`` tries them (:data:`AUTO_ORDER`):

- ``bf16``: bfloat16 weights, on CPUs with AVX512_BF16 or AMX (mean cosine 0.99995 to fp32), matrix
  products prepacked for oneDNN (:mod:`cliplens.packed`).
- ``onnx-int8``: exported to ONNX, matrix products quantised to int8 (weights per output channel,
  activations per slice of images: "dynamic"), run by ONNX Runtime, whose int8 kernels use AVX-512 VNNI /
  AVX-VNNI where the CPU has them (:func:`has_int8_dot`). The fastest (mean cosine 0.99986); needs
  ``pip install 'cliplens[fast]'``.
- ``torch-int8``: ``quantize_dynamic`` on the Linear layers (the MLPs; attention's packed input projection
  is not a Linear and stays fp32). No extra dependency.
- ``onnx-fp32`` (never picked by ``auto``): the ONNX graph unquantised, for comparison.

Text tower: stays fp32, but runs in ONNX Runtime where it is installed (:func:`text_runner`): for
the few rows of a query, its matrix products stream prepacked weights about twice as fast as torch's, and
the keys and values of the prompt's known beginning ("a photo of a") are kept, so only the tokens after it
run. ``cliplens serve`` does the same in exact mode (``Encoder.speed_up_text``).

ONNX exports are cached on disk, keyed by the weights' sha256 and the library versions. On a GPU
``fast`` changes nothing: the encoder already runs fp16 autocast there. Nothing here modifies an encoder:
:func:`image_tower` and :func:`text_runner` build the faster parts, and :func:`cliplens.encoder.load_encoder`
composes the encoder from them when it is made (the image backend takes the place of ``model.visual``: same
call and output, so pipeline and store are unchanged; ``ModelInfo.precision`` records ``fast:<backend>``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cliplens._cpu import cpu_flags, has_bf16, has_int8_dot  # noqa: F401  (fast's API, torch-free there)
from cliplens.errors import ModelError
from cliplens.textonly import OrtTextRunner, causal_mask

log = logging.getLogger(__name__)

BACKENDS = ("onnx-int8", "torch-int8", "bf16", "onnx-fp32")
# What ``auto`` tries, in order: the fastest backend that kept mean cosine >= 0.999 AND top-10 overlap >= 0.95 in
# `python -m bench agreement` (bf16), then the int8 ones, faster still but measured at a top-10 overlap of 0.90 for
# text queries on the random stand-in weights (every swap a near-tie; docs/performance.md).
AUTO_ORDER = ("bf16", "onnx-int8", "torch-int8")
_ONNX_OPSET = 17
_COPIED_ATTRS = ("preprocess_cfg", "image_size", "output_dim", "image_mean", "image_std", "patch_size", "grid_size")


def onnxruntime_available() -> bool:
    """True where ONNX Runtime and onnx (its quantiser needs it) are installed; told without importing them:
    importing ``onnxruntime.quantization`` (and with it onnx) took 0.58 s of every fast-mode start, bf16 or not."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def available_backends() -> tuple[str, ...]:
    """Backends this machine can run, in the order ``auto`` tries them, then the comparison-only ones."""
    out = []
    if onnxruntime_available():
        out.append("onnx-int8")
    if set(torch.backends.quantized.supported_engines) - {"none"}:  # x86/fbgemm on Intel and AMD, qnnpack on ARM
        out.append("torch-int8")
    if has_bf16():
        out.append("bf16")
    if onnxruntime_available():
        out.append("onnx-fp32")
    return tuple(out)


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ModelError(f"unknown fast backend {backend!r}: use auto or one of {', '.join(BACKENDS)}")


def image_tower(visual, info, *, device: str = "cpu", backend: str = "auto",
                cache_dir: str | Path | None = None) -> tuple[object | None, str]:
    """A faster equivalent of the image tower ``visual`` and the name of its backend; nothing is modified.

    :func:`cliplens.encoder.load_encoder` composes the encoder from it (``precision="fast"``). ``auto`` takes the
    first backend of :data:`AUTO_ORDER` that this machine runs and that builds; an explicit backend that cannot
    run raises :class:`ModelError`. On an accelerator the tower stays (None, "fp16-autocast"): the encoder
    already runs fp16 autocast there.
    """
    check_backend(backend)
    if not str(device).startswith("cpu"):
        log.info("precision fast on %s: the encoder already runs fp16 autocast there", device)
        return None, "fp16-autocast"
    runnable = available_backends()
    if backend == "auto":
        candidates = [b for b in AUTO_ORDER if b in runnable]
        if not candidates:
            raise ModelError("no fast backend runs on this machine: use exact precision", fix={"precision": "exact"})
    elif backend not in runnable:
        need = {"onnx-int8": "onnxruntime (pip install 'cliplens[fast]')", "onnx-fp32": "onnxruntime",
                "torch-int8": "a torch build with a quantized engine", "bf16": "a CPU with AVX512_BF16 or AMX"}
        raise ModelError(f"fast backend {backend} cannot run here: it needs {need[backend]}")
    else:
        candidates = [backend]
    for name in candidates:
        try:
            fast = _build(name, visual, image_size=info.image_size, model_name=info.name,
                          weights_sha256=info.weights_sha256, cache_dir=cache_dir)
        except Exception as exc:  # an exporter or quantiser failing on an unusual model: try the next one
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            if backend != "auto":
                raise ModelError(f"fast backend {name} failed on {info.name} ({type(exc).__name__}: {first}); "
                                 "use exact precision", fix={"precision": "exact"}) from None
            log.warning("fast backend %s failed on %s (%s: %s); trying the next", name, info.name,
                        type(exc).__name__, first)
            continue
        for attr in _COPIED_ATTRS:
            if hasattr(visual, attr) and not hasattr(fast, attr):
                setattr(fast, attr, getattr(visual, attr))
        fast.cliplens_fast = name
        if name.endswith("int8") and not has_int8_dot():
            log.info("this CPU has no int8 dot-product instructions (VNNI): %s gains less here", name)
        return fast, name
    raise ModelError(f"every fast backend failed on {info.name}: use exact precision", fix={"precision": "exact"})


def _variant(name: str) -> str:
    """The cache key of an ONNX backend: int8 models quantised with 7-bit weights (no VNNI) are another file."""
    return f"{name}-7bit" if name == "onnx-int8" and not has_int8_dot() else name


def _build(name: str, visual, *, image_size: int, model_name: str, weights_sha256: str | None, cache_dir):
    if name in ("onnx-int8", "onnx-fp32"):
        model = onnx_model_bytes(visual, (torch.zeros(2, 3, image_size, image_size),), quantize=name == "onnx-int8",
                                 dynamic_axes={"input0": {0: "batch"}, "features": {0: "batch"}},
                                 cache=_cache_path(cache_dir, model_name, weights_sha256, _variant(name)))
        return OrtVisual(model)
    if name == "torch-int8":
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (no dependency)
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(visual), {torch.nn.Linear}, dtype=torch.qint8)
    return CastVisual(visual)


class CastVisual(torch.nn.Module):
    """The image tower with bfloat16 weights, prepacked for oneDNN where it can be; float32 in, float32 out.

    Memory: each float tensor is cast on its own (the fp32 tower is never copied whole), and the file pages the
    fp32 weights occupied once read are given back (:func:`cliplens.packed.release_file_pages`), so the process
    holds the tower once, in bf16. Packing (about a second) waits for :meth:`prepare`, which the encoder runs on a
    background thread while the first images decode (``Encoder.prepare_images_in_background``), or the first call.
    """

    def __init__(self, visual):
        super().__init__()
        from cliplens.packed import file_maps, release_file_pages

        maps, memo = file_maps(), {}
        for t in [*visual.parameters(), *visual.buffers()]:
            if t.is_floating_point():
                cast = t.detach().to(torch.bfloat16)
                memo[id(t)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cast
                release_file_pages([t], maps=maps)  # read once for the cast: its pages go now, not after the whole tower
        self.inner = copy.deepcopy(visual, memo)  # the module tree copied; its float tensors are the bf16 casts
        self._packed = False

    def prepare(self) -> None:
        if not self._packed:
            from cliplens.packed import pack_visual

            pack_visual(self.inner, min_cosine=0.999)  # bf16 packed vs bf16 unpacked: both ~0.99995 to fp32
            self._packed = True

    def forward(self, x):
        self.prepare()
        return self.inner(x.to(torch.bfloat16)).float()


class OrtVisual(torch.nn.Module):
    """An ONNX Runtime session behind the image tower's call: float32 (N,3,S,S) -> float32 (N,D).

    A batch is cut into slices of at most SLICE_IMAGES images, run concurrently on one ORT thread per core
    (ORT releases the GIL): measured faster than one run on all cores, most of all on a busy machine, where
    intra-op threads wait for each other at every operator.
    """

    slices_batches = True  # the encoder need not cut batches for it
    SLICE_IMAGES = 16  # images per run at most: 8-16 measured fastest for int8 ViT-B/32 (64 vs 55 img/s as 2 x 32)

    def __init__(self, model_bytes: bytes, *, workers: int | None = None):
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.workers = workers or max(1, torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cliplens-ort") if self.workers > 1 else None

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]

    def forward(self, x):
        pixels = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self._pool is None or len(pixels) < 2:
            return torch.from_numpy(self._run(pixels))
        count = max(min(self.workers, len(pixels)), -(-len(pixels) // self.SLICE_IMAGES))
        slices = np.array_split(pixels, count)
        return torch.from_numpy(np.concatenate(list(self._pool.map(self._run, slices))))


# --------------------------------------------------------------------------- text tower


class TextSuffix(torch.nn.Module):
    """CLIP's text tower on the tokens that follow a known prefix -> features (N, D) at each row's end-of-text.

    Inputs: ``tokens`` (N, L) ids after the prefix (end-of-text among them), ``positions`` (L,) their positions
    (P..P+L-1), ``attn_mask`` (L, P+L) additive (0 where a token may look, -inf after it: causal), and the
    prefix's keys and values per layer, ``past_k``/``past_v`` (layers, heads, P, head_dim), shared by every row.
    With P = 0 (empty keys and values) it is the whole tower on the tokens, as ``Encoder._encode_tokens``
    computes it. The attention is written out (``scaled_dot_product_attention`` on the same weights) because
    the traced graph of ``nn.MultiheadAttention`` fixes the sequence length, and here L and P change.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, attn_mask, past_k, past_v):
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding[positions]
        x = _text_blocks(m, x, attn_mask=attn_mask, past=(past_k, past_v))
        x = m.ln_final(x)[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)]  # pooled at end-of-text
        return m.text_projection(x) if hasattr(m.text_projection, "weight") else x @ m.text_projection


def _text_blocks(m, x, *, attn_mask=None, past=None, keep: list | None = None):
    """The text transformer's blocks on ``x`` (N, L, width), attention written out.

    ``past``: keys and values (layers, heads, P, head_dim) of P earlier tokens that every row attends to first,
    with ``attn_mask`` (L, P+L); without them, causal attention over ``x`` alone. ``keep``: a list that gets
    each layer's (keys, values) of the first row.
    """
    n = x.shape[0]
    for i, block in enumerate(m.transformer.resblocks):
        attn = block.attn
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, -1, attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        if keep is not None:
            keep.append((k[0], v[0]))
        if past is not None:
            k = torch.cat([past[0][i].unsqueeze(0).expand(n, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1][i].unsqueeze(0).expand(n, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=past is None)
        x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(n, -1, attn.embed_dim)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


def prefix_keys_values(model, ids) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values (layers, heads, P, head_dim) of a token prefix (P,) in every layer of the text tower.

    The causal mask means no later token changes them, so they are computed once per prefix (fp32, torch).
    """
    m = model
    ids = torch.as_tensor(ids, dtype=torch.long)[None]
    kept: list = []
    with torch.inference_mode():
        _text_blocks(m, m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]], keep=kept)
    return (torch.stack([k for k, _ in kept]).float().numpy(), torch.stack([v for _, v in kept]).float().numpy())


_causal_mask = causal_mask  # kept: the name this module used
# TextSuffix's inputs whose sizes change between calls (tokens, positions, mask, past keys/values)
TEXT_AXES = {"input0": {0: "batch", 1: "length"}, "input1": {0: "length"}, "input2": {0: "length", 1: "total"},
             "input3": {2: "past"}, "input4": {2: "past"}, "features": {0: "batch"}}


def text_supported(model) -> bool:
    """True for open_clip's own CLIP text tower (causal, batch-first, argmax pooling), which TextSuffix mirrors."""
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    return (hasattr(model, "token_embedding") and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None and blocks is not None
            and getattr(model.transformer, "batch_first", True)
            and all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) for b in blocks))


class OrtText(OrtTextRunner):
    """The text tower in ONNX Runtime, fp32, with the keys and values of known prompt prefixes kept.

    Small-batch matrix products there stream prepacked weights about twice as fast as torch. When every row of a
    batch starts with a prefix added by :meth:`add_prefix` (the tokens of "a photo of a", say), only the tokens
    after it are run, against the prefix's stored keys and values: exact, as attention is causal (ViT-B/32,
    "a photo of a tractor.": 3 tokens instead of 8, 6.9 vs 9.2 ms on two threads). Otherwise the whole row runs.
    The numpy side is :class:`cliplens.textonly.OrtTextRunner`; this adds torch tensors in and out.
    """

    def __init__(self, model_bytes, model, *, threads: int | None = None):
        attn = model.transformer.resblocks[0].attn
        super().__init__(model_bytes, layers=len(model.transformer.resblocks), heads=attn.num_heads,
                         head_dim=attn.head_dim, threads=threads or max(1, torch.get_num_threads()))
        self.model = model  # the torch tower, for the prefixes' keys and values

    def add_prefix(self, ids) -> None:
        """Keep the keys and values of a token prefix: start-of-text and the tokens after it, no end-of-text."""
        key = tuple(int(i) for i in ids)
        if key and key not in self.prefixes:
            self.add_prefix_kv(key, *prefix_keys_values(self.model, key))

    def __call__(self, tokens):
        return torch.from_numpy(self.run(tokens.detach().cpu().numpy()))


def _prefix_ids(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of ``text`` as the start of a longer prompt: start-of-text and its tokens, without end-of-text."""
    ids = tokenizer([text])[0]
    return tuple(int(i) for i in ids[: int(ids.argmax())])


def text_runner(encoder, *, cache_dir: str | Path | None = None, tolerance: float = 1e-4,
                prefixes: Sequence[str] = ("a photo of a",)):
    """A runner of ``encoder``'s text tower in ONNX Runtime (fp32), or None where it cannot run or differs;
    the encoder installs it itself (:meth:`cliplens.encoder.Encoder.speed_up_text`). Nothing is modified here.

    ``prefixes``: prompt beginnings whose keys and values are kept (default: the ``single`` template's).
    Checked on the spot against the torch path, with and without a kept prefix (largest difference relative
    to the largest value, ~1e-6 for ViT-B/32); anything further off is refused with a warning and the torch
    path kept.
    """
    model = encoder.model
    if not (onnxruntime_available() and str(encoder.device).startswith("cpu") and text_supported(model)):
        return None
    probe = encoder.tokenizer(["a photo of a tractor.", "a photo of a tulip in a field"])
    probe = probe[:, : int(probe.argmax(dim=-1).max()) + 1]
    head = _prefix_ids(encoder.tokenizer, "a photo of a")
    try:
        past = prefix_keys_values(model, head[:2])
        rest = probe[:, 2:]
        example = (rest, torch.arange(2, 2 + rest.shape[1]), torch.from_numpy(_causal_mask(2, rest.shape[1])),
                   torch.from_numpy(past[0]), torch.from_numpy(past[1]))
        axes = TEXT_AXES
        cache = _cache_path(cache_dir, encoder.info.name, encoder.info.weights_sha256, "textsuffix")
        data = onnx_model_bytes(TextSuffix(model).eval(), example, dynamic_axes=axes, cache=cache)
        runner = OrtText(data, model)
        with torch.inference_mode():
            want = encoder._encode_tokens(probe).float()
        got_whole = runner(probe)
        runner.add_prefix(head)
        got_after_prefix = runner(probe)
        for text in prefixes:
            runner.add_prefix(_prefix_ids(encoder.tokenizer, text))
    except Exception as exc:  # an exporter failing on an unusual text tower: the torch path stays
        log.warning("fast: text tower stays in torch (%s: %s)", type(exc).__name__, str(exc).splitlines()[0][:160])
        return None
    scale = want.abs().max().clamp_min(1e-12)
    error = max(float((got - want).abs().max() / scale) for got in (got_whole, got_after_prefix))
    if error > tolerance:
        log.warning("fast: ONNX text tower differs by %.1e (relative); keeping the torch path", error)
        return None
    return runner


def export_text_tower(encoder, out: Path, prefixes: Sequence[str], *, tokenizer, fmt: int) -> dict:
    """Write ``encoder``'s text tower for :mod:`cliplens.textonly` into ``out`` (text.onnx + its weights, the kept
    prefixes' keys and values) and return the cache's meta; ``tokenizer``: the torch-free one that will read it."""
    import onnx

    model = encoder.model
    tok = tokenizer
    probe = tok(["a photo of a tractor.", "a photo of a tulip in a field"])
    probe = torch.from_numpy(probe[:, : int(probe.argmax(axis=1).max()) + 1])
    past = prefix_keys_values(model, probe[0, :2])
    rest = probe[:, 2:]
    example = (rest, torch.arange(2, 2 + rest.shape[1]), torch.from_numpy(causal_mask(2, rest.shape[1])),
               torch.from_numpy(past[0]), torch.from_numpy(past[1]))
    data = onnx_model_bytes(TextSuffix(model).eval(), example, dynamic_axes=TEXT_AXES)
    onnx.save_model(onnx.load_from_string(data), str(out / "text.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="text.weights", size_threshold=1024)
    ids, arrays = [], {}
    for i, text in enumerate(prefixes):
        row = tok([text])[0]
        head = [int(t) for t in row[: int(row.argmax())]]  # start-of-text and the words, no end-of-text
        arrays[f"k{i}"], arrays[f"v{i}"] = prefix_keys_values(model, head)
        ids.append(head)
    np.savez(out / "prefixes.npz", **arrays)
    attn = model.transformer.resblocks[0].attn
    meta = {"format": fmt, "model": encoder.info.name, "weights_sha256": encoder.info.weights_sha256,
            "embed_dim": int(encoder.info.embed_dim), "context_length": int(encoder.tokenizer.context_length),
            "layers": len(model.transformer.resblocks), "heads": int(attn.num_heads), "head_dim": int(attn.head_dim),
            "tokenizer": "clip-bpe (clean=lower)", "prefixes": list(prefixes), "prefix_ids": ids}
    return meta


def text_features(encoder, ids: np.ndarray) -> np.ndarray:
    """The torch text tower's features (before normalisation) of token ids (N, L), for parity checks."""
    with torch.inference_mode():
        return encoder._encode_tokens(torch.from_numpy(np.ascontiguousarray(ids))).float().numpy()


# --------------------------------------------------------------------------- ONNX export and quantisation


def _cache_path(cache_dir, model_name: str, weights_sha256: str | None, variant: str) -> Path | None:
    if weights_sha256 is None:
        return None  # random weights (tests, benchmarks): nothing stable to key a cache on
    import onnxruntime

    from cliplens import __version__
    from cliplens._files import cliplens_home

    key = "|".join((model_name, str(weights_sha256), variant, torch.__version__, onnxruntime.__version__, __version__))
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir is not None else cliplens_home() / "cache" / "onnx"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return root / f"{safe}-{variant}-{digest}.onnx"


def onnx_model_bytes(module, example, *, dynamic_axes: dict, quantize: bool = False,
                     cache: Path | None = None) -> bytes:
    """``module`` as a serialised ONNX model (int8 matrix products when ``quantize``), from ``cache`` or made now."""
    if cache is not None and cache.is_file():
        log.info("fast: using the cached ONNX model %s", cache)
        return cache.read_bytes()
    log.info("fast: exporting %s to ONNX%s (once per model)", type(module).__name__, " and quantising" * quantize)
    with tempfile.TemporaryDirectory(prefix="cliplens-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(module, example, path, dynamic_axes=dynamic_axes)
        if quantize:
            quantize_onnx(path, Path(tmp) / "model.int8.onnx")
            path = Path(tmp) / "model.int8.onnx"
        data = path.read_bytes()
    if cache is not None:
        from cliplens._files import write_bytes_atomic

        try:
            write_bytes_atomic(cache, data)
        except OSError as exc:  # a read-only home is no reason to fail: the model is in memory
            log.warning("could not cache the ONNX model at %s (%s)", cache, exc)
    return data


def export_onnx(module, example, path: str | Path, *, dynamic_axes: dict) -> None:
    """Export with the TorchScript exporter (no extra dependency); inputs named input0.., output ``features``."""
    names = [f"input{i}" for i in range(len(example))]
    # Grad mode on: under no_grad nn.MultiheadAttention takes its fused fast path, which ONNX cannot express.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in favour of dynamo (needs onnxscript)
        torch.onnx.export(module, tuple(example), str(path), input_names=names, output_names=["features"],
                          dynamic_axes=dynamic_axes, opset_version=_ONNX_OPSET, dynamo=False)


class _QuietRoot(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # ORT's quantiser advises pre-processing on the root logger
        return "pre-processing before quantization" not in record.getMessage()


def quantize_onnx(src: str | Path, dst: str | Path) -> None:
    """int8 dynamic quantisation of the matrix products: weights per output channel, activations per batch.

    Per-channel weights measured closer to fp32 than per-tensor at the same speed; quantising only
    MatMul/Gemm (not the patch-embedding Conv) measured faster and closer than ORT's default op set.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Without an int8 dot-product instruction (VNNI), ONNX Runtime's x86 kernels multiply u8 x s8 pairs with
    # AVX2's vpmaddubsw, whose 16-bit sums saturate: on such a CPU the tiny test model measured mean cosine 0.990
    # to fp32 with 8-bit weights and 0.99991 with 7-bit ones (``reduce_range``), which cannot saturate.
    reduce_range = not has_int8_dot()

    quiet = _QuietRoot()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], reduce_range=reduce_range)
    finally:
        root.removeFilter(quiet)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, min) cosine between matching rows of two sets of unit vectors."""
    cos = np.einsum("ij,ij->i", np.asarray(a, np.float64), np.asarray(b, np.float64))
    return float(cos.mean()), float(cos.min())
