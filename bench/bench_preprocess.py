"""open_clip's per-image PIL eval transform vs ``cliplens.preprocess.preprocess_batch``.

Both run in this process on the same 512 random 32x32 RGB images (CIFAR-sized); each is timed
5 times, alternating, and the medians are reported in images per second, with their ratio.

    python bench/bench_preprocess.py [--n 512] [--repeats 5] [--size 224] [--torch-threads N]

On a busy machine torch's intra-op threads can slow the reference badly; compare with
``--torch-threads 1`` (and OPENBLAS_NUM_THREADS=1 for ours) before quoting a ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from cliplens.preprocess import ClipPreprocessConfig, preprocess_batch


def _median_seconds(fns, repeats: int) -> list[float]:
    """Median wall time of each function; runs alternate so load drifts hit both alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the reference")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    images = np.random.default_rng(0).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    transform = open_clip.image_transform(args.size, is_train=False)
    config = ClipPreprocessConfig(size=args.size)
    out = np.empty((args.n, 3, args.size, args.size), dtype=np.float32)

    def reference() -> torch.Tensor:  # what a DataLoader over PIL images does, minus the workers
        return torch.stack([transform(Image.fromarray(image)) for image in images])

    def ours() -> np.ndarray:
        return preprocess_batch(images, config, out=out)

    max_diff = float(np.abs(reference().numpy() - ours()).max())  # also warms both paths up
    t_ref, t_ours = _median_seconds([reference, ours], args.repeats)
    threads = torch.get_num_threads()
    print(f"{args.n} images 32x32 -> {args.size}x{args.size}, median of {args.repeats} runs")
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    print(f"torch threads {threads}, CPUs {os.cpu_count()}, OPENBLAS_NUM_THREADS {blas}")
    print(f"open_clip per-image PIL transform: {args.n / t_ref:10.1f} images/s")
    print(f"cliplens preprocess_batch        : {args.n / t_ours:10.1f} images/s")
    print(f"speed-up: {t_ref / t_ours:.2f}x   max abs diff: {max_diff:.3g}")


if __name__ == "__main__":
    main()
