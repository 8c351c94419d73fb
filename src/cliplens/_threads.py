"""Process start-up settings for the threads of the numerical libraries (call before numpy is imported)."""

from __future__ import annotations

import os
import sys

# 2**4 cycles: OpenBLAS's helper threads go to sleep right after each product instead of spinning.
BLAS_THREAD_TIMEOUT = "4"


def calm_blas_threads() -> bool:
    """Make OpenBLAS's idle helper threads sleep at once, unless the user chose otherwise; True if set here.

    By default they spin for ~2**28 cycles (~0.1 s) after every product, holding a core. In a server that is
    the core the next query's text tower (ONNX Runtime, two threads) needs: measured with ViT-B/32 on two
    cores, first-time query encode + search over 10k, 10.5-10.8 -> 8.4-9.2 ms p50, with repeated queries and
    the search itself unchanged (~0.5 ms; waking a sleeping thread costs microseconds). OpenBLAS reads the
    setting once, when numpy loads it, so this only works before numpy is imported (``cliplens`` and
    ``python -m bench`` call it first thing); afterwards it changes nothing and returns False.
    """
    if "numpy" in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = BLAS_THREAD_TIMEOUT
    return True
