"""What this CPU can multiply fast, read from /proc/cpuinfo without importing torch (the image-only path asks before
it decides whether to load torch at all)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=4)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_int8_dot(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX-INT8)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512_BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})
