"""Batch size: image-tower throughput (images/s) per batch size, for the exact and fast encoders.

This is the measurement behind ``cliplens.embed.choose_batch_size`` (the default when ``--batch-size`` is
not given): preprocessed pixels go straight to ``Encoder.encode_pixels``, so only the model is timed.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import Report, Stats

SIZES = (8, 16, 32, 64, 128)


def run(*, encoders: dict, images: int, reps: int, sizes=SIZES, command: str) -> Report:
    from cliplens.embed import choose_batch_size

    any_encoder = next(iter(encoders.values()))
    s = any_encoder.info.image_size
    report = Report("batch", "Image tower throughput by batch size (images/s)",
                    {"command": command, "images_per_measurement": images, "reps": reps, "sizes": list(sizes),
                     "auto_batch_size": {k: choose_batch_size(e) for k, e in encoders.items()}})
    pixels = np.random.default_rng(0).standard_normal((max(images, max(sizes)), 3, s, s)).astype(np.float32)
    rates: dict[str, dict[int, list[float]]] = {k: {b: [] for b in sizes} for k in encoders}
    for enc in encoders.values():
        enc.encode_pixels(pixels[:2])  # warm-up
    for _ in range(reps):
        for size in sizes:  # sizes interleaved within each repetition: load drifts hit them all
            count = max(size, images // size * size)
            for name, enc in encoders.items():
                t0 = time.perf_counter()
                for i in range(0, count, size):
                    enc.encode_pixels(pixels[i : i + size])
                rates[name][size].append(count / (time.perf_counter() - t0))
    rows = []
    for size in sizes:
        rows.append([str(size)] + [Stats.of(rates[name][size]).text() for name in encoders])
    report.table(f"images/s, median (min-max) of {reps}; auto batch size: "
                 + ", ".join(f"{k} {v}" for k, v in report.config["auto_batch_size"].items()),
                 ["batch size", *[f"{k} ({e.info.precision})" for k, e in encoders.items()]], rows)
    report.data = {name: {str(b): Stats.of(v).to_json() for b, v in per.items()} for name, per in rates.items()}
    return report
