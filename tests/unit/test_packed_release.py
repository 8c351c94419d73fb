"""Packing gives back the checkpoint pages of the weights it replaced: the image tower is not held twice."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cliplens.packed import release_file_pages

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _resident(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                inside = len(head) == 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@LINUX
def test_released_pages_leave_memory_and_the_tensor_still_reads_the_files_bytes(tmp_path):
    data = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
    path = tmp_path / "weights.bin"
    data.tofile(path)
    weights = torch.from_file(str(path), shared=False, size=data.size, dtype=torch.float32)  # a private mapping
    assert float(weights.sum()) == pytest.approx(float(data.sum(dtype=np.float64)), rel=1e-4)  # every page read
    assert _resident(path) >= 15 << 20
    half = weights[: data.size // 2]
    released = release_file_pages([weights], keep=[half])  # the half still in use keeps its pages
    assert 7 << 20 <= released <= 8 << 20
    assert 7 << 20 <= _resident(path) <= 9 << 20
    assert release_file_pages([weights]) >= 15 << 20 and _resident(path) < 1 << 20
    assert torch.equal(weights, torch.from_numpy(data))  # read again: the file's bytes, faulted back in


def test_memory_not_mapped_from_a_file_is_never_touched():
    t = torch.arange(1 << 22, dtype=torch.float32)  # anonymous memory: madvise there would zero it
    assert release_file_pages([t]) == 0
    assert torch.equal(t, torch.arange(1 << 22, dtype=torch.float32))


@LINUX
def test_fast_bf16_tower_casts_tensor_by_tensor_and_gives_the_fp32_pages_back(tmp_path, monkeypatch):
    """``--precision fast`` (bf16): the fp32 tower is never copied whole, and its checkpoint pages go once cast."""
    from torch import nn

    from cliplens.fast import CastVisual

    visual = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024))
    sizes = [t.numel() for t in visual.parameters()]
    data = np.random.default_rng(1).standard_normal(sum(sizes)).astype(np.float32)  # 8 MiB, like a checkpoint
    path = tmp_path / "weights.bin"
    data.tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=data.size, dtype=torch.float32)
    with torch.no_grad():  # the parameters become views of the file, as safetensors' memory map makes them
        for p, piece in zip(visual.parameters(), torch.split(mapped, sizes)):
            p.data = piece.view(p.shape)
    copied = []
    original_deepcopy = torch.Tensor.__deepcopy__
    monkeypatch.setattr(torch.Tensor, "__deepcopy__",
                        lambda self, memo: copied.append(self.dtype) or original_deepcopy(self, memo))
    fast = CastVisual(visual)
    assert torch.float32 not in copied  # nothing fp32 was duplicated
    assert _resident(path) < 1 << 20  # the fp32 pages read for the cast are given back
    for a, b in zip(fast.inner.parameters(), visual.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))
    assert torch.equal(torch.cat([p.reshape(-1) for p in visual.parameters()]), torch.from_numpy(data))  # unchanged
    x = torch.randn(4, 1024)
    with torch.inference_mode():
        np.testing.assert_allclose(fast(x).numpy(), visual.to(torch.bfloat16)(x.to(torch.bfloat16)).float().numpy(),
                                   atol=1e-2)


def _map(path, *, writable: bool = False):
    """A private mapping of ``path`` (as the dynamic loader maps a library), every page read once; (mmap, address)."""
    import ctypes
    import mmap

    with open(path, "r+b" if writable else "rb") as f:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=prot)
    sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))  # resident now
    buf = (ctypes.c_char * len(m)).from_buffer(m) if writable else None
    return m, (ctypes.addressof(buf) if buf is not None else None), buf


def _library(tmp_path, folder: str, name: str, size: int = 4 << 20):
    path = tmp_path / folder / "lib" / name
    path.parent.mkdir(parents=True)
    data = np.random.default_rng(len(name)).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return path, data


@LINUX
def test_library_pages_that_hold_only_the_files_bytes_are_given_back_and_read_again(tmp_path):
    from cliplens.packed import release_library_pages

    path, data = _library(tmp_path, "nvidia", "libcublasLt.so.13")
    m, _, _ = _map(path)
    assert _resident(path) >= 4 << 20
    assert release_library_pages(("/nvidia/",)) >= 4 << 20
    assert _resident(path) < 256 << 10
    assert m[:] == data  # faulted in again: the file's bytes
    m.close()


@LINUX
def test_library_pages_the_loader_wrote_are_never_touched(tmp_path):
    """A relocated segment: written while writable, then made read-only (mprotect), as RELRO is. Its pages are
    anonymous copies; dropping them would bring back the file's unrelocated bytes, so the mapping is skipped."""
    import ctypes
    import mmap

    from cliplens.packed import release_library_pages

    path, data = _library(tmp_path, "torch", "libtorch_cpu.so")
    m, address, buf = _map(path, writable=True)
    m[:16] = b"relocated-bytes!"  # a private copy of the first page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(address, len(m), mmap.PROT_READ) == 0  # r--p now, like a library's .data.rel.ro
    release_library_pages(("/torch/",))
    assert m[:16] == b"relocated-bytes!" and m[16:] == data[16:]
    del buf
    m.close()


@LINUX
def test_writable_mappings_and_libraries_elsewhere_stay_resident(tmp_path):
    from cliplens.packed import release_library_pages

    inside, _ = _library(tmp_path, "nvidia", "libnvrtc.so.13")
    elsewhere, data = _library(tmp_path, "numpy", "libopenblas.so")
    w, _, buf = _map(inside, writable=True)  # writable: a data segment, skipped whatever it holds
    r, _, _ = _map(elsewhere)
    release_library_pages(("/nvidia/",))
    assert _resident(inside) >= 4 << 20 and _resident(elsewhere) >= 4 << 20
    assert r[:] == data
    del buf
    w.close()
    r.close()
