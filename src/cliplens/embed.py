"""Source -> batches -> encoder -> store.

Preprocessing (decode, resize, normalise: numpy and PIL, which release the GIL) runs in a thread pool a few
batches ahead of the model, so the CPU cores the model leaves idle between matrix products are not wasted.
On a GPU, fixed-size uint8 batches (CIFAR) skip the numpy step: the encoder resamples them on the device with the
same arithmetic (``Encoder.preprocesses_on_device``; :mod:`cliplens.gpu_preprocess`).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from cliplens.errors import IndexExistsError
from cliplens.store import IndexWriter

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Anything that can hand out its images by position: CIFAR arrays, an image folder, ..."""

    def __len__(self) -> int: ...

    def load(self, start: int, stop: int) -> Any:
        """Images [start, stop) as a uint8 (n,H,W,3) array or a list of PIL images."""
        ...


class ArraySource:
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


@dataclass(frozen=True)
class EmbedStats:
    count: int  # images embedded in this run (0 when the index was already complete)
    resumed_from: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


AUTO_BATCH_TOKENS = 3200  # CPU: image-tower tokens per batch (ViT-B/32: 64 images x 50 tokens); see choose_batch_size
AUTO_BATCH_LIMIT = 256


def choose_batch_size(encoder, *, limit: int = AUTO_BATCH_LIMIT) -> int:
    """The batch size used when none is given: a quick probe of the model and device, deterministic.

    On a GPU, the largest power of two up to ``limit`` whose batch of blank images runs without running out
    of memory. On a CPU, throughput stops growing once a batch holds a few thousand image tokens (measured
    for ViT-B/32 in docs/performance.md), and larger batches only cost memory, so: enough images for
    AUTO_BATCH_TOKENS tokens, as a power of two in [8, limit] (ViT-B/32: 64, ViT-B/16: 16). The same
    model on the same device always gets the same size, so a resumed run batches as the first one did.
    """
    if str(getattr(encoder, "device", "cpu")).startswith("cuda"):
        return _probe_gpu_memory(encoder, limit)
    grid = (getattr(encoder, "image_grid", None)  # the image-only encoder (cliplens.imageonly) records it
            or getattr(getattr(getattr(encoder, "model", None), "visual", None), "grid_size", None))
    if not grid:
        return min(64, limit)  # not a ViT (ResNet towers): the long-standing default
    tokens = int(np.prod(grid)) + 1
    size = 8
    while size * 2 <= limit and size * 2 * tokens <= AUTO_BATCH_TOKENS:
        size *= 2
    return size


def _probe_gpu_memory(encoder, limit: int) -> int:
    from cliplens.encoder import largest_batch_in_memory

    size = largest_batch_in_memory(encoder, limit)
    log.info("batch size %d (GPU memory probe)", size)
    return size


def embed_into(source: BatchSource, encoder, writer: IndexWriter, *, batch_size: int | None = None,
               checkpoint_every: int = 4,
               workers: int = 2, progress: bool = True, on_batch: Callable[[int], None] | None = None) -> EmbedStats:
    """Embed every image of ``source`` into ``writer``, resuming where a previous run stopped."""
    from tqdm import tqdm

    if batch_size is None:
        batch_size = choose_batch_size(encoder)
    n = len(source)
    done = writer.start()
    starts = list(range(done, n, batch_size))
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=done, unit="img", desc="embedding", disable=not progress, dynamic_ncols=True)

    on_device = getattr(encoder, "preprocesses_on_device", None)  # GPU encoders resample fixed-size batches there

    def prepare(start: int, stop: int) -> tuple[Any, bool]:
        images = source.load(start, stop)
        if on_device is not None and on_device(images):
            return images, True  # uint8 as loaded: encode_images preprocesses it on the device
        return encoder.preprocess(images), False

    # A batch is prepared as `2 x workers` chunks, so every worker helps with the first one (the model waits for
    # it) instead of one worker decoding it alone; the model still sees whole batches (the same float results).
    chunk = max(1, -(-batch_size // (2 * max(1, workers))))

    def submit(pool, start: int) -> list:
        stop = min(start + batch_size, n)
        return [pool.submit(prepare, s, min(s + chunk, stop)) for s in range(start, stop, chunk)]

    def gather(parts: list) -> tuple[Any, bool]:
        done_parts = [f.result() for f in parts]
        arrays = [a for a, _ in done_parts]
        return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), done_parts[0][1]

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            ahead = workers + 1  # batches in flight: enough to hide preprocessing, bounded memory (~ahead x 38 MB)
            futures = [submit(pool, s) for s in starts[:ahead]]
            for i, start in enumerate(starts):
                pixels, raw = gather(futures[i])
                if i + ahead < len(starts):
                    futures.append(submit(pool, starts[i + ahead]))
                futures[i] = None  # drop the reference: the pixels are large
                writer.write(start, encoder.encode_images(pixels) if raw else encoder.encode_pixels(pixels))
                stop = start + len(pixels)
                if (i + 1) % checkpoint_every == 0 or stop == n:
                    writer.checkpoint(stop)
                bar.update(len(pixels))
                if on_batch is not None:
                    on_batch(stop)
    except BaseException:
        close = getattr(writer, "close", None)
        if close is not None:
            close()  # the lock goes; the build stays resumable
        raise
    bar.close()
    return EmbedStats(count=n - done, resumed_from=done, seconds=time.perf_counter() - t0)


_IDENTITY_WORDS = {"count": "images", "weights_sha256": "weights", "pretrained": "pretrained tag", "model": "model",
                   "precision": "precision", "dtype": "dtype", "files": "source files", "source": "data set",
                   "split": "split", "batch_size": "batch size"}


def describe_identity_change(old: dict, new: dict) -> str:
    """``"images 10000 -> 2000, dtype float32 -> float16"``: what differs between two index identities."""
    parts = []
    for key in sorted(set(old) | set(new), key=lambda k: list(_IDENTITY_WORDS).index(k) if k in _IDENTITY_WORDS else 99):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        word = _IDENTITY_WORDS.get(key, key)
        short = key not in ("files", "weights_sha256")
        parts.append(f"{word} {a} -> {b}" if short else f"{word} differ")
    return ", ".join(parts) or "format"


def index_labeled(data, encoder, index_dir: str | Path, *, batch_size: int | None = None, dtype: str = "float32",
                  checkpoint_every: int = 4, progress: bool = True, store_images: bool = True,
                  embed_fn: Callable[..., EmbedStats] | None = None, rebuild: bool = False):
    """Index a labelled image set (``cliplens.sources.LabeledImages``): embeddings, items and manifest.

    A complete index of other settings (weights, precision, dtype, count, source files) already in ``index_dir``
    is never replaced unless ``rebuild``: a 2,000-image quick look must not silently cost a 10,000-image build.

    ``embed_fn`` replaces :func:`embed_into` (same signature), e.g. ``RayEngine(...).embed_into`` to embed on Ray.
    """
    info = encoder.info
    identity = {
        "model": info.name,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "precision": info.precision,
        "source": data.source,
        "split": data.split,
        "count": len(data),
        # the files' own hashes, not where they came from (an archive deleted after extraction changes nothing)
        "files": {"verified": data.fingerprint.get("verified"), "files": data.fingerprint.get("files")},
        "dtype": dtype,
        "batch_size": batch_size,  # batch shapes fix the float results: resuming must reuse them
    }
    if batch_size is None:  # the automatic size: the finished index's own, if it is otherwise this one (no probe)
        from cliplens.store import read_current_manifest

        current = read_current_manifest(index_dir)
        if current is not None and {**current.identity, "batch_size": None} == json.loads(json.dumps(identity)):
            identity["batch_size"] = current.identity["batch_size"]
        else:
            identity["batch_size"] = choose_batch_size(encoder)
        batch_size = identity["batch_size"]
    writer = IndexWriter(root=Path(index_dir), identity=identity, dim=info.embed_dim,
                         reserve_bytes=data.images.nbytes if store_images else 0)
    existing = writer.complete_identity()
    if existing is not None and existing != json.loads(json.dumps(identity)) and not rebuild:
        raise IndexExistsError(index_dir, describe_identity_change(existing, identity))
    if writer.is_complete():
        log.info("%s already holds this index; nothing to do", index_dir)
        from cliplens.store import IndexStore

        return IndexStore.open(index_dir).manifest, EmbedStats(0, len(data), 0.0)
    stats = (embed_fn or embed_into)(ArraySource(data.images), encoder, writer, batch_size=batch_size,
                                     checkpoint_every=checkpoint_every, progress=progress)
    superclass = data.coarse_labels if data.coarse_labels is not None else None
    items = {
        "id": np.arange(len(data), dtype=np.int64),
        "ref": list(data.refs),
        "label": data.labels.astype(np.int64),
        "label_name": [data.class_names[i] for i in data.labels],
    }
    if superclass is not None:
        items["superclass"] = superclass.astype(np.int64)
        items["superclass_name"] = [data.superclass_names[i] for i in superclass]
    manifest = {
        "model": dict(info.__dict__),
        "preprocess": info.preprocess,
        "source": {"name": data.source, "split": data.split, "fingerprint": data.fingerprint},
        "class_names": list(data.class_names),
        "superclass_names": list(data.superclass_names) if data.superclass_names else None,
        "fine_to_coarse": data.fine_to_coarse.tolist() if data.fine_to_coarse is not None else None,
        "stats": {"seconds": round(stats.seconds, 3), "images_per_second": round(stats.images_per_second, 2),
                  "resumed_from": stats.resumed_from, "batch_size": batch_size},
    }
    full = writer.finalize(items=items, manifest=manifest, images=data.images if store_images else None)
    return full, stats
