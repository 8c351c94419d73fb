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

The folder is built in a temporary folder beside it and renamed into place. On a model's first exact (or, on a bf16
CPU, fast) indexing run, :func:`prepare` has a helper process (:mod:`cliplens.imageonly_build`) load torch and
open_clip, write the entry and open_clip's embeddings of probe images, and exit; this process checks the graph
against them and indexes with it, so it never holds torch. A run that loaded torch anyway (the helper declined or
failed) builds it after indexing (:func:`build_cache`, ``cliplens.cli.core``). Models whose tower cannot be cached
are remembered in ``declined/`` (the reason inside). ``CLIPLENS_IMAGE_ONLY=0`` turns the building and the use off.
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
    from cliplens._cpu import has_bf16

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


class Declined(Exception):
    """This model's image tower cannot be cached (the reason is the message): indexing keeps torch."""


def write_entry(encoder, tmp: Path, *, reference=None, probe_images: int = 4) -> tuple[dict, np.ndarray, np.ndarray]:
    """Write ``encoder``'s image tower (a loaded exact torch :class:`~cliplens.encoder.Encoder` on the CPU) as an
    entry in the folder ``tmp``: the graph and its weights, then the torch tower's embeddings of probe images.
    Returns (meta, probe pixels, those embeddings); raises :class:`Declined` for a model whose tower cannot be
    cached. ``reference(pixels)``: the torch tower to compare with (default: the encoder's own)."""
    info = encoder.info
    if cache_folder(info) is None:
        raise Declined("random weights: nothing to key a cache on")
    if info.precision != "exact" or str(encoder.device) != "cpu":
        raise Declined(f"precision {info.precision} on {encoder.device}")
    cfg = getattr(encoder, "fast_config", None)
    if cfg is None:
        raise Declined(f"{info.name}'s preprocessing is one cliplens does not reproduce")
    from cliplens import vit_onnx

    visual = vit_onnx.unpacked_visual(encoder)
    if not vit_onnx.supported(visual):
        raise Declined(f"{info.name} is not a ViT in CLIP's form")
    grid = getattr(visual, "grid_size", None)
    s = cfg.size
    vit_onnx.write_graph(visual, tmp / "image.onnx")
    meta = {"format": FORMAT, "model": info.to_json(),
            "preprocess": {"size": s, "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation},
            "grid": [int(g) for g in grid] if grid else None, "vit": vit_onnx.tower_record(visual)}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (probe_images, 2 * s // 3, s + 17, 3), dtype=np.uint8)
    pixels = encoder.preprocess(images)
    want = (reference or encoder.encode_pixels)(pixels)
    return meta, pixels, np.asarray(want, np.float32)


def _agree(tmp: Path, meta: dict, pixels: np.ndarray, want: np.ndarray) -> ImageOnlyEncoder:
    """The entry in ``tmp`` as an encoder, once its embeddings of the probe pixels match ``want`` (the torch
    tower's) to fp32 rounding; records the parity in ``meta``. :class:`Declined` when they differ."""
    encoder = ImageOnlyEncoder(tmp, meta)
    got = encoder.encode_pixels(pixels)
    cosine, largest = float((want * got).sum(axis=1).min()), float(np.abs(want - got).max())
    if cosine < MIN_COSINE or largest > MAX_ABS:
        log.warning("image-only tower differs from torch (cosine %.7f, largest %.1e); not cached", cosine, largest)
        raise Declined(f"the image-only tower differs from torch (cosine {cosine:.7f}, largest {largest:.1e})")
    meta["parity"] = {"min_cosine": cosine, "max_abs": largest, "images": len(pixels)}
    return encoder


def build_cache(encoder, *, root: str | Path | None = None, probe_images: int = 4) -> Path | None:
    """Export ``encoder``'s image tower (a loaded exact torch :class:`~cliplens.encoder.Encoder` on the CPU) into
    its cache folder, after checking it against the torch tower on probe images; the folder, or None where it
    cannot be made (random weights, no ONNX Runtime, another device or precision, a preprocessing cliplens does not
    reproduce, an export or parity failure). Never raises for those: the torch path keeps working."""
    folder = cache_folder(encoder.info, root=root)
    if folder is None or not enabled():
        return None
    if (folder / "meta.json").is_file():
        return folder
    try:
        with cache_entry(folder) as tmp:
            meta, pixels, want = write_entry(encoder, tmp, probe_images=probe_images)
            _agree(tmp, meta, pixels, want)
            publish_cache_entry(tmp, folder, meta)
    except Declined as exc:
        log.info("image-only tower not cached: %s; indexing keeps torch", exc)
        return None
    except Exception as exc:
        log.warning("could not prepare the image-only tower (%s: %s); indexing keeps loading torch",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return None
    log.info("image-only tower cached in %s", folder)
    return folder if (folder / "meta.json").is_file() else None


def prepare(*, name: str, pretrained: str | None, weights: str | Path | None, device: str = "auto",
            precision: str = "exact", root: str | Path | None = None, announce: bool = True):
    """The first exact CPU indexing run of a model: build its image-only tower in a helper process
    (``python -m cliplens.imageonly_build``: torch and open_clip load there, and their ~0.8 GB goes when it exits),
    check it here against the open_clip tower's embeddings of probe images, cache it, and return it, so this run
    indexes without torch too. None where it is not for this run (another device, the cache turned off, no onnx,
    random weights, a model recorded as declined) or the helper declined or failed: the caller loads torch.
    Raises :class:`~cliplens.errors.ModelError` with the helper's words where the model cannot be loaded at all
    (an unknown name, weights neither on disk nor downloadable), as loading it here would have.

    ``precision="fast"``: where this CPU multiplies bf16, the same exact entry is cached (fast mode's tower is built
    from what it records: :func:`_fast_encoder`), and fast mode's encoder is returned, or None (the usual load)."""
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    from cliplens._cpu import has_bf16
    from cliplens.errors import ModelError

    if device not in ("auto", "cpu") or (device == "auto" and accelerator_present()) or not enabled():
        return None
    if precision not in ("exact", "fast") or (precision == "fast" and not has_bf16()):
        return None
    if importlib.util.find_spec("onnx") is None or not sys.executable:  # no onnx, or an embedded interpreter
        return None
    if weights is None and not pretrained and not name.startswith(("hf-hub:", "local-dir:")):
        return None  # random weights
    base = cache_root(root)
    declined = base / "declined" / f"{_request_key(name, pretrained, weights)}.json"
    if declined.is_file():
        return None
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare.", dir=base))
    try:
        if announce:
            print("preparing the image tower for torch-free indexing (once per model) ...", file=sys.stderr,
                  flush=True)
        request = {"folder": str(tmp), "name": name, "pretrained": pretrained,
                   "weights": str(weights) if weights is not None else None,
                   "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            run = subprocess.run([sys.executable, "-m", "cliplens.imageonly_build", json.dumps(request)],
                                 stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno() if _has_fileno() else None)
        except OSError as exc:  # no process could be started (a process limit, no memory to fork)
            log.warning("could not start the helper preparing the image-only tower (%s); loading torch", exc)
            return None
        try:
            result = json.loads((tmp / "result.json").read_text())
        except (OSError, ValueError):
            log.warning("the helper preparing the image-only tower exited with %s and no result; loading torch",
                        run.returncode)
            return None
        status = result.get("status")
        if status == "error":  # the model cannot be loaded: what loading it here would have said
            raise ModelError(result.get("message") or f"could not load {name}", fix=result.get("fix"))
        if status == "declined":  # a property of the model: remembered, so later runs load torch at once
            log.info("image-only tower not prepared: %s; indexing keeps torch", result.get("message"))
            _record_declined(declined, result)
            return None
        if status != "built":  # an export that failed (a full disk...): tried again next run
            log.warning("could not prepare the image-only tower (%s); indexing loads torch", result.get("message"))
            return None
        meta = result["meta"]
        with np.load(tmp / "probe.npz") as probe:
            pixels, want = probe["pixels"], probe["reference"]
        try:
            encoder = _agree(tmp, meta, pixels, want)
        except Declined as exc:
            _record_declined(declined, {"status": "declined", "message": str(exc)})
            return None
        for scratch in ("probe.npz", "result.json"):
            (tmp / scratch).unlink()
        folder = cache_folder(encoder.info, root=root)
        aside = None
        if folder.exists():  # find() passed it over (damaged), or another run has just published it: ours replaces it
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=base))
            os.replace(folder, aside / "entry")  # a process using it keeps its files open
        publish_cache_entry(tmp, folder, meta)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        encoder.folder = folder  # the session has its weights loaded; this names where they now are
        log.info("image-only tower cached in %s", folder)
        if precision == "fast":
            del encoder  # its session (the fp32 weights) goes before the bf16 tower is built
            return _fast_encoder(folder, meta)
        return encoder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


def _has_fileno() -> bool:
    try:
        sys.stderr.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # pytest's capture, an IDE's console
        return False


def _request_key(name: str, pretrained: str | None, weights: str | Path | None) -> str:
    """A key for one loading request (and this cliplens version, and the weights file's size and time)."""
    import hashlib

    from cliplens import __version__

    parts: list = [FORMAT, __version__, name, pretrained]
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        try:
            st = path.stat()
            parts += [str(path), st.st_size, st.st_mtime_ns]
        except OSError:
            parts += [str(path)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _record_declined(path: Path, result: dict) -> None:
    """Remember that this request's tower is not cached (why, in the file), so later runs load torch at once."""
    from cliplens._files import write_bytes_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, (json.dumps({"status": result.get("status"), "message": result.get("message")})
                                  + "\n").encode())
    except OSError:
        pass
