"""The CLIP model, its preprocessing and its tokenizer, created together by one factory.

This is the only module that imports open_clip or hands torch tensors around: everything it returns is a
float32 numpy array of L2-normalised rows, so the rest of cliplens never sees torch.

Correctness notes (see DESIGN.md):
- OpenAI's ViT-B/32 weights were trained with QuickGELU. ``ViT-B-32`` + ``openai`` loads, warns and computes
  the wrong activations, so a tag that needs QuickGELU switches the model to its ``-quickgelu`` config.
- CLIP's text tower is causal and pools at the end-of-text token, so positions after the longest EOT in a batch
  never change the result: ``encode_texts`` runs only that prefix of the 77-token context (exact, and several
  times faster for short queries).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from cliplens._files import cached_sha256
from cliplens.errors import ModelError
from cliplens.manifest import ModelInfo  # noqa: F401  (recorded in manifests; defined there)
from cliplens.preprocess import ClipPreprocessConfig, preprocess_batch, preprocess_pil

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32-quickgelu"
DEFAULT_PRETRAINED = "openai"
SMALL_TEXT_BATCH = 32  # up to this many texts (queries, prompt ensembles) are encoded on one thread; see Encoder
PRECISIONS = ("exact", "fast")  # fast: a faster image tower (cliplens.fast), recorded as "fast:<backend>"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but torch sees no CUDA GPU: use the CPU", fix={"device": "cpu"})
    return device


def _check_model_name(name: str) -> None:
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; `python -m open_clip` lists them, e.g. {DEFAULT_MODEL}")


def _resolve_tag(name: str, tag: str) -> tuple[str, str, bool]:
    """Return (model name, checkpoint path, quick_gelu) for a pretrained tag, downloading only if allowed."""
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(name, tag)
    if not cfg and not name.endswith("-quickgelu"):
        cfg = oc_pretrained.get_pretrained_cfg(name + "-quickgelu", tag)
    if not cfg:
        tags = oc_pretrained.list_pretrained_tags_by_model(name)
        raise ModelError(f"model {name!r} has no pretrained tag {tag!r}; known tags: {', '.join(tags) or 'none'}")
    quick_gelu = bool(cfg.get("quick_gelu", False))
    if quick_gelu and not name.endswith("-quickgelu"):
        # The trap DESIGN.md warns about: plain ViT-B-32 + openai silently uses the wrong activation.
        log.warning("%s/%s was trained with QuickGELU: using %s-quickgelu", name, tag, name)
        name = name + "-quickgelu"
    path = _local_checkpoint(cfg)
    if path is None:
        path = _download_checkpoint(cfg, f"{name}/{tag}")
    if not path:
        raise ModelError(f"open_clip knows no download location for {name}/{tag}; give a local weights file",
                     fix={"weights": None})
    return name, str(path), quick_gelu


def _local_checkpoint(cfg: dict) -> str | None:
    """The checkpoint of a pretrained config when it is already on disk (no network call), else None."""
    from cliplens import _hub

    if cfg.get("file"):
        return cfg["file"]
    return _hub.cached_checkpoint(cfg["hf_hub"]) if cfg.get("hf_hub") else None


def _download_checkpoint(cfg: dict, label: str) -> str:
    """Fetch a checkpoint through open_clip, but only after one quick check that the hub can be reached."""
    from open_clip import pretrained as oc_pretrained

    from cliplens import _hub

    hub = cfg.get("hf_hub", "")
    if hub and not _hub.hub_reachable():
        raise ModelError(_hub.missing_weights_message(label, hub))
    try:
        with _hub.quiet_hub():
            return oc_pretrained.download_pretrained(cfg)
    except Exception as exc:  # huggingface_hub raises many types; all mean "not here, not fetchable"
        where = f"the Hugging Face cache ({_hub.hub_cache_dir()})"
        fetch = f"`{_hub.download_command(hub)}`" if hub else "open_clip"
        raise ModelError(
            f"weights for {label} are not in {where} and could not be downloaded ({type(exc).__name__}); fetch "
            f"them on a connected machine with {fetch} and copy the cache, or pass --weights PATH to a checkpoint file"
        ) from None


def missing_weights(model: str, pretrained: str | None, weights=None) -> str | None:
    """A one-line description of the weights when they are neither on disk nor downloadable now, else None.

    Lets a command that also needs data say both problems at once instead of one per run.
    """
    from open_clip import pretrained as oc_pretrained

    from cliplens import _hub

    if weights is not None or not pretrained or model.startswith(("hf-hub:", "local-dir:")):
        return None
    cfg = oc_pretrained.get_pretrained_cfg(model, pretrained) or oc_pretrained.get_pretrained_cfg(
        model + "-quickgelu", pretrained)
    if not cfg or _local_checkpoint(cfg) or not cfg.get("hf_hub") or _hub.hub_reachable():
        return None
    return _hub.missing_weights_message(f"{model}/{pretrained}", cfg["hf_hub"])


class Encoder:
    """A loaded CLIP model. Build it with :func:`load_encoder`; tests pass any model with the same methods."""

    def __init__(self, *, model, tokenizer, transform, info: ModelInfo, device: str, text_cache_size: int = 4096,
                 image_workers: int = 1, image_tower=None):
        if image_tower is not None:  # a variant of the image tower (cliplens.fast.image_tower), composed here
            model.visual = image_tower
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform  # open_clip's own eval transform: the reference for PIL inputs
        self.info = info
        self.device = device
        try:
            self.fast_config: ClipPreprocessConfig | None = ClipPreprocessConfig.from_open_clip(model)
        except ValueError:
            self.fast_config = None  # a resize mode the batched path does not reproduce: use open_clip's
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_size = text_cache_size
        # CPU: a batch runs as this many slices at once, one core each (see _encode_pixels_sliced)
        self.image_workers = max(1, int(image_workers)) if str(device) == "cpu" else 1
        self._image_pool = None
        # CPU, exact: the image tower's matrix products get prepacked for oneDNN on first use (cliplens.packed)
        self.pack_images = str(device) == "cpu"
        # CUDA: fixed-size uint8 batches (CIFAR) are resampled on the GPU (cliplens.gpu_preprocess, the same
        # arithmetic as preprocess_batch); False sends them through numpy like everything else
        self.device_preprocess = str(device).startswith("cuda")
        self._visual_ready = False
        self._visual_dtype = None  # set when _prepare_visual casts the image tower itself (CUDA: fp16)
        self._visual_lock = threading.Lock()  # packing runs once, maybe on a background thread
        self.text_runner = None  # cliplens.fast may set a faster runner of the same text prefix (fp32)
        self._text_speedup: dict | None = None  # speed_up_text's arguments, applied at the first text encoded
        self._text_lock = threading.Lock()

    # ---------------------------------------------------------------- images
    def preprocess(self, images) -> np.ndarray:
        """uint8 (N,H,W,3) array or PIL images -> float32 (N,3,S,S), equal to open_clip's eval transform."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"expected uint8 images of shape (N,H,W,3), got {images.dtype} {images.shape}")
            if self.fast_config is not None:
                return preprocess_batch(images, self.fast_config)
            from PIL import Image

            images = [Image.fromarray(a) for a in images]
        out = []
        for im in images:
            if self.fast_config is not None and im.mode == "RGB":  # the same bits, without torch (preprocess_pil)
                # fast mode resamples only the centre crop (within a grey level of exact; preprocess_pil)
                out.append(preprocess_pil(im, self.fast_config, crop_only=self.info.precision.startswith("fast")))
            else:  # palette, RGBA, etc.: open_clip's transform is the definition of right
                out.append(self.transform(im).numpy())
        if not out:
            return np.zeros((0, 3, self.info.image_size, self.info.image_size), np.float32)
        return np.stack(out)

    @property
    def visual_dtype(self):
        """The dtype the image tower was cast to for its device (CUDA: torch.float16), or None (it runs as loaded,
        under autocast on a GPU). Known once the tower has been readied, by the first image encoded."""
        return self._visual_dtype

    def preprocesses_on_device(self, images) -> bool:
        """True when :meth:`encode_images` resamples ``images`` on the encoder's device instead of in numpy."""
        return (self.device_preprocess and self.fast_config is not None and isinstance(images, np.ndarray)
                and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3)

    def _encode_on_device(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N,H,W,3) -> unit vectors, preprocessed where the model runs: only 3 KB per CIFAR image travel."""
        import torch

        from cliplens.gpu_preprocess import preprocess_on_device

        self._ensure_visual()
        with torch.inference_mode():  # outside autocast: the resampling is float64 on purpose
            # np.require: a copy only of a read-only or strided batch (torch wants writable memory)
            uint8 = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
            pixels = preprocess_on_device(uint8, self.fast_config)
        if pixels.device.type == "cpu":  # asked for on a CPU (tests): the CPU tower, sliced and packed
            return self.encode_pixels(pixels.numpy())
        return self._encode_tensor(pixels)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (N,3,S,S) preprocessed pixels -> float32 (N,D) unit vectors."""
        self._ensure_visual()
        if self.image_workers > 1 and len(pixels) > 1 and not getattr(self.model.visual, "slices_batches", False):
            return self._encode_pixels_sliced(pixels)
        return self._encode_pixels_once(pixels)

    def prepare_images_in_background(self) -> None:
        """Start readying the image tower (packing: about 1.5 s for ViT-B/32) on a thread of its own, so it runs
        while the first batches decode; the first :meth:`encode_pixels` waits for it. For indexers that know
        images are coming."""
        if not self._visual_ready:
            threading.Thread(target=self._ensure_visual, name="cliplens-pack", daemon=True).start()

    def _ensure_visual(self) -> None:
        if not self._visual_ready:
            with self._visual_lock:
                if not self._visual_ready:
                    self._prepare_visual()

    def _prepare_visual(self) -> None:
        """Pack the fp32 image tower once, here rather than at load: a text-only session never pays for it."""
        visual = self.model.visual
        if getattr(visual, "cliplens_fast", None):  # fast backends pack their own, in their prepare()
            prepare = getattr(visual, "prepare", None)
            if prepare is not None:
                prepare()
        elif self.pack_images:
            from cliplens.packed import pack_visual

            if pack_visual(visual):
                log.debug("image tower packed for oneDNN (fp32)")
        elif self.device.startswith("cuda"):
            from cliplens import gpu_tower

            if gpu_tower.prepare(visual):  # fp16 weights, no autocast (else the tower stays under autocast)
                import torch

                self._visual_dtype = torch.float16
                log.debug("image tower in fp16 for CUDA (cliplens.gpu_tower)")
        self._visual_ready = True

    def _encode_pixels_once(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._encode_tensor(torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device))

    def _encode_tensor(self, x) -> np.ndarray:
        import torch

        if self._visual_dtype is not None:  # a tower already in its own dtype (CUDA, cliplens.gpu_tower)
            with torch.inference_mode():
                return _normalise(self.model.encode_image(x.to(self._visual_dtype)))
        with torch.inference_mode(), self._autocast():
            return _normalise(self.model.encode_image(x))

    def _encode_pixels_sliced(self, pixels: np.ndarray) -> np.ndarray:
        """The batch cut into one slice per core, the slices encoded concurrently on one thread each.

        Same kernels and fp32 arithmetic (bit-identical to one call for ViT-B/32 here); measured 1.28x the
        images/s of one call on all cores on 2 cores, because no operator waits for its threads to meet
        (docs/performance.md). Each worker sets only its own OpenMP thread count, so torch's process-wide
        settings, and with them text encoding and any other torch code in the process, are left as they were.
        """
        slices = np.array_split(pixels, min(self.image_workers, len(pixels)))
        return np.concatenate(list(self._workers().map(self._encode_pixels_once, slices)))

    def _workers(self):
        """image_workers threads, each running torch on one thread of its own."""
        from concurrent.futures import ThreadPoolExecutor

        if self._image_pool is None:
            self._image_pool = ThreadPoolExecutor(self.image_workers, thread_name_prefix="cliplens-encode",
                                                  initializer=_one_thread_here)
        return self._image_pool

    def encode_images(self, images) -> np.ndarray:
        if self.preprocesses_on_device(images):
            return self._encode_on_device(images)
        return self.encode_pixels(self.preprocess(images))

    # ---------------------------------------------------------------- text
    def clear_text_cache(self) -> None:
        """Forget cached text embeddings (benchmarks time first-time queries with this)."""
        self._text_cache.clear()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> float32 (N,D) unit vectors; repeated strings come from an LRU cache."""
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            for text, vec in zip(missing, self._encode_texts_uncached(missing)):
                self._text_cache[text] = vec
        out = np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, self.info.embed_dim), np.float32)
        for t in texts:
            self._text_cache.move_to_end(t)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return out

    def speed_up_text(self, *, cache_dir=None, tolerance: float = 1e-5,
                      prefixes: Sequence[str] = ("a photo of a",)) -> bool:
        """Run the text tower in ONNX Runtime, fp32, for a process that answers many queries (``serve``).

        Same arithmetic to fp32 rounding (checked on the spot: largest difference <= 1e-5 of the largest
        value; ~1e-6 measured for ViT-B/32), about twice as fast for a query's few tokens, but the first use
        per model exports the tower (seconds, cached on disk) and each process loads it (~0.5 s): worth it
        for a server, not for one ``cliplens search``. True when the text tower now runs there; False (torch
        stays) where onnxruntime is not installed or the model's text tower is not CLIP's own.
        """
        if self.text_runner is not None:
            return True
        from cliplens.fast import text_runner

        self.text_runner = text_runner(self, cache_dir=cache_dir, tolerance=tolerance, prefixes=prefixes)
        return self.text_runner is not None

    def speed_up_text_when_used(self, **kwargs) -> None:
        """:meth:`speed_up_text` with these arguments, done when the first text is encoded: an indexing run that
        never encodes text never loads a text runtime (fast mode; ~0.4 GB of memory and a second of start-up)."""
        self._text_speedup = kwargs

    def _apply_text_speedup(self) -> None:
        if self._text_speedup is not None:
            with self._text_lock:  # taken before building: the check inside speed_up_text encodes text itself
                kwargs, self._text_speedup = self._text_speedup, None
                if kwargs is not None and self.speed_up_text(**kwargs):
                    log.info("text tower in ONNX Runtime fp32")

    def _encode_texts_uncached(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        self._apply_text_speedup()
        if len(texts) <= SMALL_TEXT_BATCH and self.text_runner is None and self.image_workers > 1:
            # A query's few rows are too little work to share between threads: on one thread it takes as long
            # on an idle machine and stays fast on a busy one, where threads wait for each other at every
            # operator (measured: docs/performance.md). The image workers are such threads.
            return self._workers().submit(self._encode_texts_here, texts, batch_size).result()
        return self._encode_texts_here(texts, batch_size)

    def _encode_texts_here(self, texts: list[str], batch_size: int, *, normalise: bool = True) -> np.ndarray:
        import torch

        self._apply_text_speedup()

        finish = _normalise if normalise else (lambda feats: feats.float().cpu().numpy())
        chunks = [np.zeros((0, self.info.embed_dim), np.float32)]
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
                chunks.append(finish(self._encode_tokens(tokens)))
        return np.concatenate(chunks)

    def encode_texts_raw(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> float32 (N,D) text features *before* L2 normalisation (not cached).

        Only "average-first" prompt ensembling needs these raw norms; everything else uses encode_texts.
        """
        return self._encode_texts_here(list(texts), batch_size, normalise=False)

    def _encode_tokens(self, tokens):
        """CLIP text tower on the prefix that matters: exact because attention is causal and pooling is at EOT."""
        m = self.model
        if not (hasattr(m, "token_embedding") and getattr(m, "text_pool_type", None) == "argmax" and m.attn_mask is not None):
            return m.encode_text(tokens)  # other text towers (HF, SigLIP): the model's own path
        length = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the highest id in CLIP's vocabulary
        tokens = tokens[:, :length]
        if self.text_runner is not None:
            return self.text_runner(tokens)
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[np.arange(x.shape[0]), tokens.argmax(dim=-1)]
        if m.text_projection is not None:
            x = m.text_projection(x) if hasattr(m.text_projection, "weight") else x @ m.text_projection
        return x

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):  # fp16 autocast on GPU only; CPU stays fp32 (exact)
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()


def _omp_set_num_threads():
    """OpenMP's own omp_set_num_threads (per calling thread), or None where torch was built without OpenMP."""
    import ctypes

    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None


def _one_thread_here() -> None:
    """Make torch (and MKL, which follows OpenMP) use one thread in the calling thread only."""
    import torch

    torch.get_num_threads()  # torch initialises a thread's OpenMP settings lazily, once: let it do so first
    _omp_set_num_threads()(1)


def _normalise(feats) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def load_encoder(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    weights: str | Path | None = None,
    device: str = "auto",
    precision: str = "exact",
    image_workers: int | None = None,
    fast_backend: str = "auto",
) -> Encoder:
    """Create model + eval transform + tokenizer from one open_clip config, so they cannot drift apart.

    Weights come from ``weights`` (a local checkpoint file) when given, else from the pretrained tag through
    open_clip's own resolution: the Hugging Face hub cache (honouring HF_HOME and HF_HUB_OFFLINE).

    ``precision="fast"`` composes the encoder with a faster image tower (``fast_backend``, default the first
    that runs here; :mod:`cliplens.fast`) and, on the CPU, the text tower in ONNX Runtime (fp32).
    """
    import open_clip

    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
    if precision == "fast":
        from cliplens.fast import check_backend

        check_backend(fast_backend)
    device = resolve_device(device)
    quick_gelu = False
    if model.startswith(("hf-hub:", "local-dir:")):
        # A self-describing model folder (config + weights): open_clip resolves both; the tag does not apply.
        if weights is not None:
            raise ModelError(f"{model} carries its own weights: give no weights file, or use a built-in model name")
        checkpoint, pretrained = _schema_checkpoint(model), None
        load_from = None  # open_clip finds the weights itself through the schema
    else:
        _check_model_name(model)
        if weights is not None:
            weights = Path(weights).expanduser()
            if not weights.is_file():
                raise ModelError(f"weights file {weights} does not exist: pass the path of an open_clip/OpenAI checkpoint")
            _check_checkpoint_file(weights)
            checkpoint, pretrained = str(weights), None
        elif pretrained:
            model, checkpoint, quick_gelu = _resolve_tag(model, pretrained)
        else:
            checkpoint = None  # random weights: only useful for tests and benchmarks
        load_from = checkpoint
    try:
        # open_clip reads .safetensors with safetensors and anything else with torch.load(weights_only=True): a
        # pickle naming any global beyond tensors and plain containers is refused by torch, never run
        clip, transform = _create_model(model, load_from, device)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # RuntimeError, UnpicklingError, KeyError, StopIteration, AssertionError on shapes...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load {model} from {checkpoint}: {first}; is it a checkpoint for this model?") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    quick_gelu = quick_gelu or _uses_quick_gelu(clip)
    cfg = ClipPreprocessConfig.from_open_clip(clip) if _fast_ok(clip) else None
    image_size = clip.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    info = ModelInfo(
        name=model,
        pretrained=pretrained if weights is None else None,
        weights_path=checkpoint,
        weights_sha256=cached_sha256(checkpoint) if checkpoint else None,
        embed_dim=int(_embed_dim(clip)),
        image_size=image_size,
        context_length=int(getattr(clip, "context_length", 77)),
        quick_gelu=quick_gelu,
        preprocess=_describe(cfg, image_size),
        precision=precision,
    )
    if image_workers is None:  # CPU: one slice of each image batch per core (measured faster; see Encoder)
        import torch

        image_workers = torch.get_num_threads() if device == "cpu" and _omp_set_num_threads() else 1
    tower = None
    if precision == "fast":
        from cliplens import fast

        tower, backend = fast.image_tower(clip.visual, info, device=device, backend=fast_backend)
        info = dataclasses.replace(info, precision=f"fast:{backend}")  # a resumed run must use the same path
    encoder = Encoder(model=clip, tokenizer=tokenizer, transform=transform, info=info, device=device,
                      image_workers=image_workers, image_tower=tower)
    if device == "cpu":
        from cliplens.packed import release_library_pages

        release_library_pages()  # torch's CUDA libraries, read at import, never run on the CPU
    if precision == "fast" and device == "cpu":
        log.info("precision fast: image tower %s", backend)
        encoder.speed_up_text_when_used(tolerance=1e-4)
    return encoder


class _NotRandom(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _create_model(model: str, checkpoint: str | None, device: str):
    """(model, eval transform) from open_clip's factory, holding the weights once.

    open_clip builds the model with random weights (a full copy of them, and a second or so initialising it),
    then reads the checkpoint (a second copy) and copies it in: twice the weights at the peak (1.2 GB for
    ViT-B/32). Here the same factory call builds it on the ``meta`` device (shapes only, no memory), open_clip's
    own ``load_checkpoint`` (conversions, resizing, strict key check) then *assigns* the checkpoint's tensors
    as the parameters, and the few buffers a checkpoint does not hold (the text tower's causal mask) are made
    as open_clip makes them. Anything else left unmade, or a model open_clip builds otherwise (a self-describing
    ``hf-hub:``/``local-dir:`` model, another device), takes open_clip's usual path. The result is the same
    model (tests/unit/test_encoder.py compares every tensor).
    """
    import functools

    import open_clip
    import torch

    def usual():
        clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=checkpoint, device=device)
        return clip, transform

    if checkpoint is None or device != "cpu" or Path(checkpoint).suffix in (".npz", ".npy"):
        return usual()
    root, quiet = logging.getLogger(), _NotRandom()
    root.addFilter(quiet)  # open_clip warns that the model "initialized randomly": it is not, weights follow
    try:
        with torch.device("meta"):
            clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=checkpoint, device="meta",
                                                                       load_weights=False)
    finally:
        root.removeFilter(quiet)
    dtypes = {(id(m), name): t.dtype for m in clip.modules() for name, t in _own_tensors(m)}
    clip.load_state_dict = functools.partial(clip.load_state_dict, assign=True)  # this instance only
    try:
        open_clip.load_checkpoint(clip, checkpoint, strict=True, weights_only=True)
    finally:
        del clip.load_state_dict
    for module in clip.modules():
        for name, t in _own_tensors(module):
            if t.is_meta:  # not in the checkpoint
                if name != "attn_mask" or t.ndim != 2 or t.shape[0] != t.shape[1]:
                    log.debug("%s: %s is not in the checkpoint; loading the usual way", model, name)
                    return usual()
                setattr(module, name, torch.full(tuple(t.shape), float("-inf"), dtype=t.dtype).triu_(1))
            elif t.dtype != dtypes[(id(module), name)]:  # a float16 checkpoint: cast as copying into the model casts
                t.data = t.data.to(dtypes[(id(module), name)])
    return clip, transform


def _own_tensors(module) -> list:
    """(name, tensor) of ``module``'s own parameters and buffers (not its children's)."""
    return [(n, t) for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
            if t is not None]


# How a checkpoint file starts: a zip (torch.save since 1.6), a legacy pickle (protocol 2+), or safetensors
# (an 8-byte little-endian header length, then a JSON header).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def _check_checkpoint_file(path: Path) -> None:
    """ModelError in one line unless ``path`` starts like a checkpoint; the contents are checked on loading."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"cannot read weights file {path} ({exc.strerror})") from None
    safetensors = len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < size and head[8:9] == b"{"
    if path.suffix == ".safetensors" and not safetensors:
        raise ModelError(f"{path} is not a safetensors file (truncated or something else): pass an open_clip "
                         "checkpoint (.safetensors, .pt or .bin)")
    if not (safetensors or head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise ModelError(f"{path} is not a model checkpoint (neither a PyTorch file nor safetensors): pass an "
                         "open_clip checkpoint (.safetensors, .pt or .bin)")


def _schema_checkpoint(model: str) -> str:
    """The weights file behind an ``hf-hub:`` or ``local-dir:`` model, for the manifest's sha256."""
    from open_clip import factory, pretrained as oc_pretrained

    schema, ident = model.split(":", 1)
    try:
        path = (oc_pretrained.download_pretrained_from_hf(ident) if schema == "hf-hub"
                else factory._find_checkpoint_in_dir(Path(ident)))
    except Exception as exc:  # not cached and not downloadable
        raise ModelError(f"cannot find the weights of {model} ({type(exc).__name__}): "
                         "check the name, or the Hugging Face cache when offline") from None
    if not path:
        raise ModelError(f"no checkpoint file in {ident}: put open_clip_model.safetensors there")
    return str(path)


def _embed_dim(clip) -> int:
    proj = getattr(clip, "text_projection", None)
    if proj is not None:
        return proj.weight.shape[0] if hasattr(proj, "weight") else proj.shape[-1]
    return clip.visual.output_dim


def _uses_quick_gelu(clip) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in clip.visual.modules())


def _fast_ok(clip) -> bool:
    try:
        ClipPreprocessConfig.from_open_clip(clip)
        return True
    except ValueError:
        return False


def _describe(cfg: ClipPreprocessConfig | None, image_size: int) -> str:
    if cfg is None:
        return f"open_clip eval transform ({image_size}px)"
    return (
        f"resize shortest side to {cfg.size} ({cfg.interpolation}, PIL-exact), center crop {cfg.size}, "
        f"mean {list(cfg.mean)}, std {list(cfg.std)}"
    )


def largest_batch_in_memory(encoder, limit: int) -> int:
    """The largest power-of-two batch up to ``limit`` that an accelerator encodes without running out of memory."""
    import torch

    s = encoder.info.image_size
    size = 1 << (max(1, limit).bit_length() - 1)
    while size > 8:
        try:
            encoder.encode_pixels(np.zeros((size, 3, s, s), np.float32))
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    return size
