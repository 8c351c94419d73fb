"""2-D projections of 10,000 x 512 clustered unit vectors: time and neighbourhood quality of each library.

``python bench/bench_map.py [--n 10000] [--out bench/results]``. The reference is scikit-learn's t-SNE (the
library already in the ``eval`` extra); openTSNE, umap-learn and PCA run on the same data in the same process and
their times are printed as ratios to it. Quality: the share of points whose 10 nearest neighbours in 2-D are
mostly of their own class (10-NN majority-vote accuracy), the structure the map is meant to show.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def data(n: int, dim: int = 512, classes: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 1.6 * rng.normal(size=(n, dim))  # overlapping clusters, like CLIP's classes
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def knn_accuracy(points: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k + 1).fit(points, labels)
    idx = clf.kneighbors(points, return_distance=False)[:, 1:]
    votes = np.array([np.bincount(labels[row]).argmax() for row in idx])
    return float(np.mean(votes == labels))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cliplens.embedmap import project

    load0 = os.getloadavg()[0]
    x, labels = data(args.n)
    raw = knn_accuracy(x, labels)
    rows = []
    for method, lib in (("tsne", "sklearn"), ("tsne", "opentsne"), ("umap", "umap-learn"), ("pca", "numpy")):
        t0 = time.perf_counter()
        pts = project(x, method=method, seed=0, library=lib)
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "library": lib, "seconds": round(seconds, 2), "knn10_accuracy_2d":
                     round(knn_accuracy(pts, labels), 4)})
        print(rows[-1], flush=True)
    ref = rows[0]["seconds"]
    lines = [f"# 2-D projection of {args.n} x 512 (cores: {os.cpu_count()}, load before {load0:.1f}, after "
             f"{os.getloadavg()[0]:.1f})", "",
             f"10-NN accuracy in 512-D: {raw:.3f}; umap-learn's time includes numba's first-call compilation, as "
             "`cliplens map` pays it", "", "| method | library | seconds | time / sklearn t-SNE | 10-NN acc 2-D |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['library']} | {r['seconds']:.1f} | {r['seconds'] / ref:.2f} |"
                     f" {r['knn10_accuracy_2d']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "map.json").write_text(json.dumps({"n": args.n, "knn10_accuracy_512d": raw, "rows": rows}, indent=2))
    (args.out / "map.md").write_text(text)


if __name__ == "__main__":
    main()
