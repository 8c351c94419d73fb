"""Inputs for the whole-process benchmarks: a labelled 10,000-item index made without embedding 10,000 images.

The vectors are seeded random unit rows (a search's cost does not depend on their values), stored through the real
``index_labeled`` driver, so the folder (manifest, embeddings.npy, items.parquet, thumbnails) is exactly what
``cliplens index cifar100`` writes, under the stand-in model's identity (name, weights sha256).
"""

from __future__ import annotations

from pathlib import Path


from bench.data import unit_vectors, write_cifar100


def _random_embed(source, encoder, writer, *, batch_size, seed: int = 0, **_):
    """An ``embed_fn`` (the Ray engine's slot) that writes seeded random unit vectors instead of running the model."""
    from cliplens.embed import EmbedStats

    n = len(source)
    writer.start()
    writer.write(0, unit_vectors(n, writer.dim, seed=seed))
    writer.checkpoint(n)
    return EmbedStats(count=n, resumed_from=0, seconds=0.0)


class _InfoOnly:
    """What ``index_labeled`` needs of an encoder when ``embed_fn`` does the embedding: its identity."""

    def __init__(self, info):
        self.info = info
        self.device = "cpu"
        self.model = None


def make_labelled_index(root: Path, info, n: int, *, data_dir: Path) -> Path:
    """A complete CIFAR-100-format index of ``n`` items at ``root`` (``info``: the model's ModelInfo)."""
    from cliplens.sources import load_cifar
    from cliplens.embed import index_labeled

    write_cifar100(data_dir, n)
    data = load_cifar("cifar100", "test", data_dir=data_dir, verify=False, progress=False)
    index_labeled(data, _InfoOnly(info), root, batch_size=64, progress=False, embed_fn=_random_embed)
    return root
