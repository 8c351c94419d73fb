"""Image sources: each turns files on disk into numpy arrays plus labels and names.

``cifar`` reads the official CIFAR-100 / CIFAR-10 python archives (find or download, verify md5,
unpickle with an allow-list, decode to uint8 (N, 32, 32, 3) RGB).
"""

# Imported on first use (PEP 562): ``cliplens.sources.folder`` (queries, the web) must not pull in the CIFAR
# reader and its download stack (urllib, tqdm), ~0.1 s of a torch-free query's start-up.
_EXPORTS = {"safe_load_pickle": "cliplens.sources._pickle", **{name: "cliplens.sources.cifar" for name in (
    "CIFAR_LAYOUTS", "CIFAR_URLS", "OFFICIAL_MD5", "SPLITS", "CifarLayout", "LabeledImages", "default_data_dir",
    "load_cifar")}}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CIFAR_LAYOUTS",
    "CIFAR_URLS",
    "OFFICIAL_MD5",
    "SPLITS",
    "CifarLayout",
    "LabeledImages",
    "default_data_dir",
    "load_cifar",
    "safe_load_pickle",
]
