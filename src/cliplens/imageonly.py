"""Indexing without torch: the exact (fp32) image tower as a cached ONNX file, run by ONNX Runtime.

An exact indexing run on the CPU spent 3-4 s before its first image (``import torch``, open_clip and the
torchvision it imports, the weights, packing the tower) and held about 1.1 GB before any work (this machine's CUDA
build of torch alone is 509 MB resident). Once the image tower is cached per weights, a later exact ``cliplens
index`` of the same model imports numpy, PIL and ONNX Runtime only: the session opens in ~0.3 s and a batch of 64
holds ~0.5 GB (200 photos, whole process: 0.85 GB against 1.65 GB; docs/startup.md). The arithmetic is the same to
fp32 rounding (checked when the cache is built, against the torch tower that built the index: every probe
embedding within cosine 0.99999 and 1e-5; measured for ViT-B/32 0.99999994 and 2.1e-7), so an index may be
extended by either path. ONNX Runtime's fp32 products are a little slower per image here than the packed torch
tower (1.55-1.65 against 1.47-1.50 s per batch of 64): the start-up it saves is worth about a thousand images.

    $CLIPLENS_HOME/cache/imageonly/<model>-<sha256[:16]>-v<FORMAT>/
        image.onnx           the graph (small), written from the weights (cliplens.vit_onnx), not traced
        image.onnx.weights   its fp32 weights, external data
        meta.json            written last (its presence means the folder is complete): the model's record
                             (ModelInfo), the preprocessing, the patch grid, the parity measured

The folder is built in a temporary folder beside it and renamed into place, after an exact CPU indexing run that
loaded torch anyway (``cliplens.cli.core``). ``CLIPLENS_IMAGE_ONLY=0`` turns both the building and the use off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cliplens._files import cache_entry, cliplens_home, publish_cache_entry
from cliplens.manifest import ModelInfo
from cliplens.preprocess import ClipPreprocessConfig, preprocess_batch, preprocess_pil

log = logging.getLogger(__name__)

FORMAT = 1
MIN_COSINE = 0.99999  # every probe embedding, ONNX Runtime against torch
MAX_ABS = 1e-5  # largest difference of a unit-vector component


def enabled() -> bool:
    """False when ``CLIPLENS_IMAGE_ONLY=0`` (or ``false``/``no``/``off``), or ONNX Runtime is not installed."""
    import importlib.util

    if os.environ.get("CLIPLENS_IMAGE_ONLY", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return importlib.util.find_spec("onnxruntime") is not None


def accelerator_present() -> bool:
    """True where ``--device auto`` may pick a GPU (an NVIDIA device node, or Apple silicon): told without torch."""
    if sys.platform == "darwin":
        return True  # MPS
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def cache_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else cliplens_home() / "cache" / "imageonly"


def cache_folder(info: ModelInfo, *, root: str | Path | None = None) -> Path | None:
    """Where ``info``'s image tower is cached (None for random weights: nothing stable to key on)."""
    if not info.weights_sha256:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in info.name)
    return cache_root(root) / f"{safe}-{info.weights_sha256[:16]}-v{FORMAT}"


class ImageOnlyEncoder:
    """Encodes images like :class:`cliplens.encoder.Encoder` (float32 unit rows), with no torch in the process.

    Inputs as the indexers hand them over: uint8 (N,H,W,3) arrays (CIFAR) or RGB PIL images (folders decode to
    RGB); the preprocessing is cliplens' own, equal to open_clip's eval transform (tests/unit/test_preprocess.py).
    A batch runs as one slice per core, each on one ONNX Runtime thread, concurrently (as ``Encoder`` does).
    """

    image_only = True
    device = "cpu"
    SLICE_IMAGES = 8  # images per run: 8, 16 and 32 measured equally fast, and 8 holds the least (0.53 vs 0.81 GB)

    _pool_init = None  # run by each slice's thread first (the torch variant sets one thread there)

    def __init__(self, folder: Path, meta: dict | None = None, *, threads: int | None = None):
        import onnxruntime as ort

        self._setup(folder, meta)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.folder / "image.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.image_workers = threads or max(1, len(os.sched_getaffinity(0)))

    def _setup(self, folder: Path, meta: dict | None) -> None:
        meta = meta if meta is not None else json.loads((Path(folder) / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"cache format {meta.get('format')!r}, expected {FORMAT}")
        self.folder, self.meta = Path(folder), meta
        self.info = ModelInfo(**meta["model"])
        self.fast_config = ClipPreprocessConfig(**meta["preprocess"])
        self.image_grid = tuple(int(g) for g in meta["grid"]) if meta.get("grid") else None
        self._pool = None

    def preprocess(self, images) -> np.ndarray:
        """uint8 (N,H,W,3) array or RGB PIL images -> float32 (N,3,S,S), equal to open_clip's eval transform."""
        cfg, s = self.fast_config, self.fast_config.size
        crop_only = self.info.precision.startswith("fast")  # FastTowerEncoder: only the crop resampled
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"expected uint8 images of shape (N,H,W,3), got {images.dtype} {images.shape}")
            return preprocess_batch(images, cfg)
        out = []
        for im in images:
            if im.mode != "RGB":  # open_clip resizes other modes as they are: only the torch encoder has that path
                raise ValueError(f"the image-only encoder takes RGB images, got mode {im.mode}")
            out.append(preprocess_pil(im, cfg, crop_only=crop_only))
        return np.stack(out) if out else np.zeros((0, 3, s, s), np.float32)

    def prepare_images_in_background(self) -> None:  # the session is ready once made
        return None

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (N,3,S,S) preprocessed pixels -> float32 (N,D) unit vectors."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if len(pixels) == 0:
            return np.zeros((0, int(self.info.embed_dim)), np.float32)
        count = max(min(self.image_workers, len(pixels)), -(-len(pixels) // self.SLICE_IMAGES))
        if count == 1:
            feats = self._run(pixels)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.image_workers, thread_name_prefix="cliplens-image",
                                                initializer=self._pool_init)
            feats = np.concatenate(list(self._pool.map(self._run, np.array_split(pixels, count))))
        feats = feats.astype(np.float32, copy=False)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), np.float32(1e-12))

    def encode_images(self, images) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))

    def encode_texts(self, texts):
        from cliplens.errors import ModelError

        raise ModelError("this image-only encoder has no text tower; load the full model for text")


def find(*, name: str, pretrained: str | None, weights: str | Path | None, device: str = "auto",
         precision: str = "exact", root: str | Path | None = None) -> ImageOnlyEncoder | None:
    """The cached image-only encoder that loading (name, pretrained, weights) would equal, or None: none cached,
    another device asked for (or ``auto`` with a GPU present), or the cache turned off. ``precision="fast"``: the
    bf16 tower built from the checkpoint without open_clip (:func:`_fast_encoder`), or None."""
    from cliplens.indexing.lazy import same_request

    if precision not in ("exact", "fast") or device not in ("auto", "cpu"):
        return None
    if device == "auto" and accelerator_present():
        return None
    if not enabled():
        return None
    base = cache_root(root)
    if not base.is_dir():
        return None
    for folder in sorted(base.glob(f"*-v{FORMAT}")):
        try:
            meta = json.loads((folder / "meta.json").read_text())
            info = ModelInfo(**meta["model"])
        except (OSError, ValueError, TypeError, KeyError):
            continue  # incomplete or foreign: not a cache entry
        if not same_request(info, name=name, pretrained=pretrained, weights=weights, precision="exact"):
            continue
        if precision == "fast":
            return _fast_encoder(folder, meta)
        try:
            return ImageOnlyEncoder(folder, meta)
        except Exception as exc:  # a damaged cache is no reason to fail: the caller loads the torch model instead
            log.warning("ignoring the image-only cache %s (%s: %s)", folder, type(exc).__name__, str(exc)[:160])
            return None
    return None


def _fast_encoder(folder: Path, meta: dict):
    """Fast mode's bf16 tower built from the checkpoint without open_clip (:mod:`cliplens.vit_torch`), where this
    CPU multiplies bf16 (what ``auto`` picks then), the entry records the tower and the checkpoint is safetensors;
    else None (the usual fast load)."""
    from cliplens.fast import has_bf16

    checkpoint = meta["model"].get("weights_path") or ""
    if not (has_bf16() and meta.get("vit") and checkpoint.endswith(".safetensors")):
        return None
    try:
        from cliplens.vit_torch import FastTowerEncoder

        return FastTowerEncoder(folder, meta, checkpoint=checkpoint)
    except Exception as exc:  # a checkpoint of another layout: the usual load decides what to say
        log.warning("fast tower not built from %s (%s: %s); loading the model", checkpoint, type(exc).__name__,
                    str(exc)[:160])
        return None


def build_cache(encoder, *, root: str | Path | None = None, probe_images: int = 4) -> Path | None:
    """Export ``encoder``'s image tower (a loaded exact torch :class:`~cliplens.encoder.Encoder` on the CPU) into
    its cache folder, after checking it against the torch tower on probe images; the folder, or None where it
    cannot be made (random weights, no ONNX Runtime, another device or precision, a preprocessing cliplens does not
    reproduce, an export or parity failure). Never raises for those: the torch path keeps working."""
    info = encoder.info
    folder = cache_folder(info, root=root)
    if folder is None or info.precision != "exact" or str(encoder.device) != "cpu" or not enabled():
        return None
    if (folder / "meta.json").is_file():
        return folder
    cfg = getattr(encoder, "fast_config", None)
    if cfg is None:
        return None
    try:
        from cliplens import vit_onnx

        visual = vit_onnx.unpacked_visual(encoder)
        if not vit_onnx.supported(visual):
            log.info("image-only tower: %s is not a ViT in CLIP's form; indexing keeps torch", info.name)
            return None
        grid = getattr(visual, "grid_size", None)
        with cache_entry(folder) as tmp:
            s = cfg.size
            vit_onnx.write_graph(visual, tmp / "image.onnx")
            meta = {"format": FORMAT, "model": info.to_json(),
                    "preprocess": {"size": s, "mean": list(cfg.mean), "std": list(cfg.std),
                                   "interpolation": cfg.interpolation},
                    "grid": [int(g) for g in grid] if grid else None, "vit": vit_onnx.tower_record(visual)}
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (probe_images, 2 * s // 3, s + 17, 3), dtype=np.uint8)
            pixels = encoder.preprocess(images)
            want = encoder.encode_pixels(pixels)
            got = ImageOnlyEncoder(tmp, meta).encode_pixels(pixels)
            cosine, largest = float((want * got).sum(axis=1).min()), float(np.abs(want - got).max())
            if cosine < MIN_COSINE or largest > MAX_ABS:
                log.warning("image-only tower differs from torch (cosine %.7f, largest %.1e); not cached",
                            cosine, largest)
                return None
            meta["parity"] = {"min_cosine": cosine, "max_abs": largest, "images": probe_images}
            publish_cache_entry(tmp, folder, meta)
    except Exception as exc:
        log.warning("could not prepare the image-only tower (%s: %s); indexing keeps loading torch",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return None
    log.info("image-only tower cached in %s", folder)
    return folder if (folder / "meta.json").is_file() else None
