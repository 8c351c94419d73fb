"""The image tower with its matrix products prepacked for oneDNN, in fp32 (exact mode) or bf16 (fast mode).

A ViT-B/32 forward pass on a CPU is ~92% matrix products. ``F.linear`` re-lays out each weight for the
kernel on every call; oneDNN's linear with a weight packed once runs the same fp32 arithmetic faster
(measured here, one core, 16 images: 1352 vs 1554 ms fp32, 736 vs 810 ms bf16), and takes the activation
as a fused post-op, so the MLP's activation costs no extra pass over memory. What changes per block:

- ``mlp``: ``c_fc`` (packed, activation fused) then ``c_proj`` (packed). QuickGELU, ``x * sigmoid(1.702 x)``,
  equals ``silu(1.702 x) / 1.702``: the 1.702 is folded into ``c_fc`` and the 1/1.702 into ``c_proj``,
  so it becomes oneDNN's fused ``swish``. ``nn.GELU`` maps to the fused ``gelu`` (erf or tanh).
- ``attn`` (``nn.MultiheadAttention``, self-attention, batch first): packed input projection, torch's
  ``scaled_dot_product_attention``, packed output projection. Same call and result as the module it
  replaces.

Anything else (another block type, cross-attention, an activation without a fused form) is left as it is.
:func:`pack_visual` checks the packed tower against the original on a probe batch before keeping it, and
keeps the original where the check fails or this torch has no oneDNN: results within fp32 rounding of
the reference (max abs difference ~3e-6 on ViT-B/32, cosine 0.9999998) are what "exact" means here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QUICK_GELU_SCALE = 1.702
_ROWS_HINT = 16 * 50  # rows per product the weights are laid out for: 16 images x 50 tokens (any count works)


def available() -> bool:
    """True where torch has oneDNN's packed linear (x86 and ARM builds of torch do)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """``post(x @ weight.T + bias)`` with the weight packed once; ``post`` is a oneDNN post-op name."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, post: str = "none",
                 algorithm: str = ""):
        super().__init__()
        weight = weight.detach().contiguous()
        self.out_features = weight.shape[0]
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.post, self.algorithm = post, algorithm

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post, [], self.algorithm)


def _is_quick_gelu(act: nn.Module) -> bool:
    if type(act).__name__ != "QuickGELU":
        return False
    probe = torch.linspace(-6, 6, 97)  # the name is a hint; the arithmetic is the test
    with torch.inference_mode():
        return bool(torch.allclose(act(probe), probe * torch.sigmoid(QUICK_GELU_SCALE * probe), atol=1e-6))


class PackedMLP(nn.Module):
    """open_clip's ``c_fc -> activation -> c_proj`` with the activation fused into ``c_fc``."""

    def __init__(self, fc: PackedLinear, proj: PackedLinear):
        super().__init__()
        self.fc, self.proj = fc, proj

    @classmethod
    def from_mlp(cls, mlp: nn.Module) -> PackedMLP | None:
        fc, act, proj = (getattr(mlp, name, None) for name in ("c_fc", "gelu", "c_proj"))
        if not (isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)) or len(list(mlp.children())) != 3:
            return None
        if _is_quick_gelu(act):
            return cls.from_weights(fc.weight, fc.bias, proj.weight, proj.bias, activation="quickgelu")
        if type(act) is nn.GELU:
            return cls.from_weights(fc.weight, fc.bias, proj.weight, proj.bias, activation=f"gelu:{act.approximate}")
        return None

    @classmethod
    def from_weights(cls, fc_w, fc_b, proj_w, proj_b, *, activation: str) -> PackedMLP:
        """From the two linears' tensors; ``activation``: ``quickgelu``, or ``gelu:none`` / ``gelu:tanh``."""
        if activation == "quickgelu":  # x * sigmoid(1.702 x) == silu(1.702 x) / 1.702
            s = QUICK_GELU_SCALE
            return cls(PackedLinear(fc_w * s, None if fc_b is None else fc_b * s, post="swish"),
                       PackedLinear(proj_w / s, proj_b))
        return cls(PackedLinear(fc_w, fc_b, post="gelu", algorithm=activation.split(":", 1)[1]),
                   PackedLinear(proj_w, proj_b))

    def forward(self, x):
        return self.proj(self.fc(x))


class PackedSelfAttention(nn.Module):
    """``nn.MultiheadAttention(q, q, q)`` for batch-first self-attention, with packed projections."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.qkv = PackedLinear(attn.in_proj_weight, attn.in_proj_bias)
        self.out = PackedLinear(attn.out_proj.weight, attn.out_proj.bias)
        self.num_heads, self.embed_dim = attn.num_heads, attn.embed_dim

    @classmethod
    def from_weights(cls, in_w, in_b, out_w, out_b, *, num_heads: int) -> PackedSelfAttention:
        """From the projections' tensors (``in_proj_weight`` and ``bias``, ``out_proj``'s), as a checkpoint holds them."""
        from types import SimpleNamespace

        return cls(SimpleNamespace(in_proj_weight=in_w, in_proj_bias=in_b, num_heads=num_heads,
                                   embed_dim=out_w.shape[0], out_proj=SimpleNamespace(weight=out_w, bias=out_b)))

    @classmethod
    def supports(cls, attn) -> bool:
        return (type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
                and attn.in_proj_weight is not None and attn.bias_k is None and not attn.add_zero_attn
                and attn.dropout == 0.0)

    def forward(self, q, k=None, v=None, need_weights: bool = False, attn_mask=None):
        if (k is not None and k is not q) or (v is not None and v is not q) or need_weights:
            raise ValueError("PackedSelfAttention computes self-attention without weights only")
        n, length, width = q.shape
        heads = self.num_heads
        qkv = self.qkv(q).view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).reshape(n, length, width)), None


def pack_blocks(visual: nn.Module, *, release: bool = False) -> int:
    """Pack ``visual.transformer.resblocks`` in place; returns how many modules were replaced.

    ``release``: once a module is packed, give back the file pages its original weights occupy
    (:func:`release_file_pages`), so the tower is never held twice; the originals stay usable (a read brings
    their bytes back from the file).
    """
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    replaced = 0
    for block in blocks if blocks is not None else ():
        old = []
        if PackedSelfAttention.supports(getattr(block, "attn", None)):
            old.append(block.attn)
            block.attn = PackedSelfAttention(block.attn)
            replaced += 1
        mlp = getattr(block, "mlp", None)
        packed = PackedMLP.from_mlp(mlp) if mlp is not None else None
        if packed is not None:
            old.append(mlp)
            block.mlp = packed
            replaced += 1
        if release and old:
            release_file_pages([t for m in old for t in m.parameters()], keep=[*block.parameters(), *block.buffers()])
    return replaced


def pack_visual(visual: nn.Module, *, min_cosine: float = 0.99999, probe_images: int = 2) -> bool:
    """Pack ``visual`` in place if that keeps its output (every probe embedding within ``min_cosine``).

    Returns True when the tower is now packed. On failure the original modules are put back.
    """
    if not available():
        return False
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or getattr(visual, "cliplens_packed", False):
        return bool(getattr(visual, "cliplens_packed", False))
    size = getattr(visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    dtype = next(visual.parameters()).dtype
    probe = torch.from_numpy(np.random.default_rng(0).standard_normal((probe_images, 3, *size), np.float32)).to(dtype)
    saved = [(b, b.attn, b.mlp) for b in blocks if hasattr(b, "attn") and hasattr(b, "mlp")]
    try:
        with torch.inference_mode():
            want = visual(probe).float()
            if pack_blocks(visual, release=True) == 0:
                return False
            got = visual(probe).float()
        cosine = float(F.cosine_similarity(got, want, dim=-1).min())
    except Exception as exc:  # an operator this torch build lacks, an unusual block: the original stays
        cosine, reason = float("nan"), f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    else:
        reason = f"cosine {cosine:.7f} < {min_cosine}"
    if cosine >= min_cosine:
        visual.cliplens_packed = True
        del saved
        trim_heap()
        return True
    for block, attn, mlp in saved:
        block.attn, block.mlp = attn, mlp
    log.warning("image tower stays unpacked (%s)", reason)
    return False


def trim_heap() -> int:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``); 1 if some was, else 0.

    Packing frees the weights' temporary copies (the QuickGELU scaling, the unpacked blocks) in pieces the
    allocator keeps for reuse: measured for ViT-B/32, 131 MB of the process's memory after packing in fp32 and
    225 MB in bf16, which indexing never reuses. Elsewhere (macOS, musl) it does nothing.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        return int(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return 0


LIBRARY_FOLDERS = ("/torch/lib/", "/nvidia/", "/cusparselt/", "/triton/")  # torch's shared libraries and CUDA's


def release_library_pages(folders: tuple[str, ...] = LIBRARY_FOLDERS) -> int:
    """Give back the resident pages of read-only shared-library mappings under ``folders`` that hold only the file's
    own bytes; returns the bytes released.

    ``import torch`` maps its CUDA libraries even on a machine without a GPU, and the dynamic loader reads part of
    them: measured 231 MB of file pages resident after the import (cublasLt 60 MB, libtorch_cpu 52, nvJitLink 31,
    nvrtc 27, ...), counted in the process's memory for the whole run though a CPU run never executes them. A
    mapping that is not writable and has no anonymous pages (smaps: ``Anonymous: 0 kB``) holds nothing but the
    file's bytes, so ``madvise(MADV_DONTNEED)`` only unmaps them: they stay in the page cache, and a later access
    faults the same bytes in again (the pages a CPU run does use come back on first use). Mappings the loader
    wrote (relocations: anonymous pages) and writable ones are never touched. Anywhere else (no /proc, another OS)
    it does nothing.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    spans, span, path, perms = [], None, "", ""
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
                    lo, hi = head[0].split("-")
                    span, perms = (int(lo, 16), int(hi, 16)), head[1]
                    path = head[5].strip() if len(head) == 6 else ""
                elif head[0] == "Anonymous:" and span is not None:
                    if (int(head[1]) == 0 and "w" not in perms and perms.endswith("p")
                            and any(folder in path for folder in folders)):
                        spans.append(span)
                    span = None
    except (OSError, ValueError, IndexError):
        return 0
    if not spans:
        return 0
    dontneed = _dontneed()
    return sum(hi - lo for lo, hi in spans if dontneed(lo, hi))


def _dontneed():
    """``dontneed(lo, hi)``: ``madvise(MADV_DONTNEED)`` on the pages [lo, hi), True where it was done (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return lambda lo, hi: libc.madvise(lo, hi - lo, 4) == 0  # 4: MADV_DONTNEED


def file_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files (a memory-mapped checkpoint), from /proc."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/") and parts[1].endswith("p"):
                    lo, hi = parts[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return spans


def _span(t) -> tuple[int, int] | None:
    """The bytes a plain CPU tensor occupies; None for an opaque one (oneDNN's packed layout) or an empty one."""
    if t is None or t.device.type != "cpu" or t.numel() == 0 or t.is_mkldnn:
        return None
    try:
        start = t.data_ptr()
    except RuntimeError:  # no storage to point at
        return None
    return start, start + t.numel() * t.element_size()


def release_file_pages(dead, *, keep=(), maps: list[tuple[int, int]] | None = None) -> int:
    """Give back the resident pages of the ``dead`` tensors (nothing uses them any more) that lie in a private
    file mapping; returns the bytes released. Pages shared with a tensor in ``keep`` stay.

    Weights loaded from a safetensors checkpoint are views of the memory-mapped file: packing reads them (their
    pages become resident) and makes its own copy, so without this the process holds the image tower twice
    (~350 MB for ViT-B/32) for as long as the rest of the file stays mapped (the text tower lives in it).
    ``madvise(MADV_DONTNEED)`` on a private file mapping drops the pages: a later read would fault in the file's
    bytes again (a private change would be lost, which is why only whole pages inside dead tensors and outside
    every kept one are released). Anywhere else (no /proc, another OS, memory not mapped from a file) it does
    nothing. ``maps``: the process's file mappings as :func:`file_maps` read them, for a caller releasing
    tensor by tensor (reading /proc/self/maps takes ~3 ms with torch loaded).
    """
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    spans = maps if maps is not None else file_maps()
    if not spans:
        return 0
    kept = [span for span in map(_span, keep) if span is not None]
    dontneed = _dontneed()
    page, released = mmap.PAGESIZE, 0
    for span in map(_span, dead):
        if span is None:
            continue
        lo, hi = -(-span[0] // page) * page, span[1] // page * page  # whole pages inside the tensor
        if hi <= lo or not any(a <= lo and hi <= b for a, b in spans):
            continue
        pieces = [(lo, hi)]
        for a, b in kept:  # minus every page a kept tensor touches
            a, b = a // page * page, -(-b // page) * page
            pieces = [part for x, y in pieces for part in ((x, min(y, a)), (max(x, b), y)) if part[0] < part[1]]
        for x, y in pieces:
            if dontneed(x, y):
                released += y - x
    return released
