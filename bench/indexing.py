"""Indexing throughput, end to end: the reference pipeline vs cliplens exact and fast, same inputs, one process.

Reference (what users run today): read the files, open_clip's eval transform per PIL image, ``encode_image``
fp32 eager under ``torch.no_grad`` in batches of 64, L2-normalise, ``np.save``.
Ours: ``load_cifar`` + ``index_labeled`` (CIFAR-format), ``index_folder`` (JPEG folder): decode, batched
preprocessing in threads ahead of the model, encode, resumable store with manifest and items.

Each repetition runs every variant once, in turn, so slow drifts in machine load hit them all alike.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import Report, Stats, ratio
from bench.data import read_cifar_rows, write_cifar100, write_jpegs

log = logging.getLogger(__name__)
REFERENCE_BATCH = 64


def reference_embed(model, transform, images, *, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """open_clip's way: a PIL eval transform per image, fp32 eager encode_image per batch, normalise."""
    import torch
    from PIL import Image

    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            pils = [Image.fromarray(a) if isinstance(a, np.ndarray) else a for a in chunk]
            x = torch.stack([transform(im) for im in pils])
            f = model.encode_image(x)
            feats.append(torch.nn.functional.normalize(f, dim=-1).numpy())
    return np.concatenate(feats)


def _reference_cifar(model, transform, folder: Path, out: Path) -> np.ndarray:
    feats = reference_embed(model, transform, read_cifar_rows(folder))
    np.save(out, feats)
    return feats


def _reference_jpegs(model, transform, paths: list[Path], out: Path) -> np.ndarray:
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    feats = reference_embed(model, transform, images)
    np.save(out, feats)
    return feats


def _ours_cifar(encoder, folder: Path, index_dir: Path, batch_size: int | None) -> np.ndarray:
    from cliplens.sources import load_cifar
    from cliplens.embed import index_labeled
    from cliplens.store import IndexStore

    data = load_cifar("cifar100", "test", data_dir=folder, verify=False, download=False, progress=False)
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    index_labeled(data, encoder, index_dir, progress=False, store_images=False, **kwargs)
    return np.asarray(IndexStore.open(index_dir).embeddings)


def _ours_jpegs(encoder, root: Path, index_dir: Path, batch_size: int | None) -> np.ndarray:
    from cliplens.folder_index import FolderIndexOptions, index_folder
    from cliplens.store import IndexStore

    options = FolderIndexOptions(progress=False) if batch_size is None else FolderIndexOptions(progress=False,
                                                                                                batch_size=batch_size)
    index_folder(root, encoder, index_dir, options=options)
    store = IndexStore.open(index_dir)
    order = np.argsort([str(p) for p in store.items["path"]])  # the reference reads files in sorted order
    return np.asarray(store.embeddings)[order]


def run(*, reference, encoders: dict, workdir: Path, n: int, reps: int, jpegs: int, batch_size: int | None,
        command: str) -> Report:
    """``reference`` = (model, transform, tokenizer); ``encoders`` = {variant name: cliplens Encoder}."""
    model, transform, _ = reference
    report = Report("indexing", "Indexing throughput (images/s, end to end)",
                    {"command": command, "n": n, "reps": reps, "jpegs": jpegs, "reference_batch": REFERENCE_BATCH,
                     "batch_size": batch_size or "cliplens default",
                     "variants": {k: e.info.precision for k, e in encoders.items()}})
    cifar = write_cifar100(workdir / "cifar", n)
    photos = sorted(write_jpegs(workdir / "photos", jpegs)) if jpegs else []
    suites = [("cifar", f"CIFAR-format 32x32, N = {n}", n)]
    if photos:
        suites.append(("jpeg", f"folder of {len(photos)} JPEGs, 1-4 megapixels", len(photos)))
    for key, caption, count in suites:
        jobs = {"reference": lambda out, k=key: (_reference_cifar(model, transform, cifar, out) if k == "cifar"
                                                  else _reference_jpegs(model, transform, photos, out))}
        for name, enc in encoders.items():
            jobs[name] = lambda out, k=key, e=enc: (_ours_cifar(e, cifar.parent, out, batch_size) if k == "cifar"
                                                     else _ours_jpegs(e, photos[0].parent, out, batch_size))
        (workdir / "out").mkdir(parents=True, exist_ok=True)
        _warm_up(reference, encoders)
        seconds: dict[str, list[float]] = {name: [] for name in jobs}
        outputs: dict[str, np.ndarray] = {}
        for rep in range(reps):
            for name, job in jobs.items():
                target = workdir / "out" / f"{key}-{name}-{rep}"
                target = target.with_suffix(".npy") if name == "reference" else target
                t0 = time.perf_counter()
                outputs[name] = job(target)
                seconds[name].append(time.perf_counter() - t0)
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                log.info("%s %s rep %d: %.1f img/s", key, name, rep, count / seconds[name][-1])
        ref_rate = Stats.of([count / s for s in seconds["reference"]])
        rows, data = [], {}
        for name in jobs:
            rate = Stats.of([count / s for s in seconds[name]])
            # Paired: this variant against the reference run just before it, in the same repetition, so a
            # change in machine load between repetitions cancels out.
            paired = Stats.of([r / s for r, s in zip(seconds["reference"], seconds[name])])
            cos = np.einsum("ij,ij->i", outputs[name].astype(np.float64), outputs["reference"].astype(np.float64))
            precision = "fp32 eager" if name == "reference" else encoders[name].info.precision
            rows.append([name, precision, rate.text(), ratio(rate.median, ref_rate.median),
                         paired.text("{:.2f}x"), f"{cos.mean():.7f}", f"{cos.min():.7f}"])
            data[name] = {"images_per_second": rate.to_json(), "seconds": seconds[name], "precision": precision,
                          "ratio_to_reference": rate.median / ref_rate.median, "paired_ratio": paired.to_json(),
                          "cosine_to_reference": {"mean": float(cos.mean()), "min": float(cos.min())}}
        report.table(f"{caption}: images/s, median (min-max) of {reps}",
                     ["pipeline", "precision", "images/s", "vs reference (medians)", "vs reference (paired, per rep)",
                      "mean cosine", "min cosine"], rows)
        report.data[key] = data
    report.notes.append("reference: per-image PIL eval transform + encode_image fp32 eager (torch.no_grad), "
                        f"batch {REFERENCE_BATCH}, np.save; ours: the full `cliplens index` path (decode, batched "
                        "preprocessing in threads, encode, resumable store with manifest and items).")
    report.notes.append("cosine: each embedding against the reference's embedding of the same image.")
    return report


def _warm_up(reference, encoders: dict) -> None:
    """One small batch through every model first: oneDNN/ONNX Runtime set-up is not what is being measured."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    model, transform, _ = reference
    reference_embed(model, transform, images)
    for enc in encoders.values():
        enc.encode_images(images)
