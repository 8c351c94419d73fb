"""Image sources: each turns files on disk into numpy arrays plus labels and names.

``cifar`` reads the official CIFAR-100 / CIFAR-10 python archives (find or download, verify md5,
unpickle with an allow-list, decode to uint8 (N, 32, 32, 3) RGB).
"""

from cliplens.datasets._pickle import safe_load_pickle
from cliplens.datasets.cifar import (
    CIFAR_LAYOUTS,
    CIFAR_URLS,
    OFFICIAL_MD5,
    SPLITS,
    CifarLayout,
    LabeledImages,
    default_data_dir,
    load_cifar,
)

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
