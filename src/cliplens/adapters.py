"""Few-shot adapters on frozen CLIP embeddings, in numpy: Tip-Adapter, Tip-Adapter-F, a zero-shot-initialised probe.

**Tip-Adapter** (Zhang et al., ECCV 2022) adds a cache model to the zero-shot classifier. The cache keys are the
unit image embeddings of the K labelled shots, F (N, D), and its values their one-hot labels L (N, C)::

    logits(f) = 100 * f W^T  +  alpha * A(f F^T) L,        A(x) = exp(-beta * (1 - x))

where W (C, D) holds the unit class text vectors (100 is CLIP's logit scale). ``beta`` sharpens the affinities,
``alpha`` weighs the cache against zero-shot; both are chosen on a validation split (the paper's grid: beta in
(0.1, 7], alpha in (0.1, 3]). With alpha = 0 the logits are the zero-shot logits, exactly: the zero-shot scores are
computed as float32 products (as ``evaluate.zero_shot`` does) and scaled by 100 in float64, which is exact, so no
two classes change order.

**Tip-Adapter-F** treats the keys F as parameters and fine-tunes them for a few steps on the shots (cross-entropy,
Adam; the paper uses AdamW for 20 epochs over augmented views; here the embeddings are frozen, so every step is
one full batch over the shots without augmentation).

**Zero-shot-initialised probe**: a linear classifier ``100 * f W^T`` whose W starts at the text classifier, is
fine-tuned by Adam with an L2 pull back towards it, then blended with it WiSE-FT style,
``W_t = (1 - t) W_text + t W_tuned``; t is chosen on validation (t = 0 is zero-shot).

Only numpy crosses in and out; gradients are written out by hand (tests check them against finite differences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from cliplens import metrics as M

LOGIT_SCALE = 100.0  # CLIP's learned temperature, as the zero-shot classifier uses it
_CHUNK = 2048  # query rows per affinity block: 2048 x 1600 shots x 8 bytes = 26 MB


@dataclass(frozen=True)
class AdapterConfig:
    betas: tuple[float, ...] = tuple(np.round(np.linspace(0.5, 7.0, 14), 3))  # Tip-Adapter's sharpness grid
    alphas: tuple[float, ...] = tuple(np.round(np.linspace(0.25, 3.0, 12), 3))  # and its residual weight grid
    default_alpha: float = 1.0  # the paper's ImageNet values, used when there is no validation split (1 shot)
    default_beta: float = 5.5
    finetune_steps: int = 50  # Tip-Adapter-F: full-batch Adam steps on the shots
    finetune_lr: float = 1e-3
    probe_steps: int = 100  # zero-shot-initialised probe
    probe_lr: float = 5e-4
    probe_l2: float = 1.0  # strength of the pull towards the text classifier (per unit squared distance)
    blends: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
    default_blend: float = 0.5


def zero_shot_logits(x: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """float64 ``100 * x W^T`` from the float32 product: the same order of classes as ``evaluate.zero_shot``."""
    return (np.asarray(x, np.float32) @ np.asarray(class_emb, np.float32).T).astype(np.float64) * LOGIT_SCALE


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), np.float64)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def cache_logits(x: np.ndarray, keys: np.ndarray, values: np.ndarray, beta: float) -> np.ndarray:
    """``A(x F^T) L`` in blocks of rows (bounded memory)."""
    out = np.empty((len(x), values.shape[1]), np.float64)
    for i in range(0, len(x), _CHUNK):
        aff = np.asarray(x[i:i + _CHUNK], np.float64) @ np.asarray(keys, np.float64).T
        out[i:i + _CHUNK] = np.exp(-beta * (1.0 - aff)) @ values
    return out


def tip_logits(x: np.ndarray, class_emb: np.ndarray, keys: np.ndarray, values: np.ndarray, *, alpha: float,
               beta: float) -> np.ndarray:
    """Tip-Adapter's logits for query rows ``x`` (see the module docstring)."""
    zs = zero_shot_logits(x, class_emb)
    if alpha == 0:
        return zs
    return zs + alpha * cache_logits(x, keys, values, beta)


def search_alpha_beta(val_x: np.ndarray, val_y: np.ndarray, class_emb: np.ndarray, keys: np.ndarray,
                      values: np.ndarray, config: AdapterConfig) -> tuple[float, float, float]:
    """(alpha, beta, val top-1): the grid point with the best validation top-1; ties to the first in grid order."""
    zs = zero_shot_logits(val_x, class_emb)
    best = (config.default_alpha, config.default_beta, -1.0)
    for beta in config.betas:
        cache = cache_logits(val_x, keys, values, float(beta))
        for alpha in config.alphas:
            acc = M.topk_accuracy(zs + alpha * cache, val_y, 1)
            if acc > best[2]:
                best = (float(alpha), float(beta), acc)
    return best


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    p = softmax(logits)
    n = len(labels)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(n), labels], 1e-300))))
    p[np.arange(n), labels] -= 1.0
    return loss, p / n


def adam(param: np.ndarray, grad: Callable[[np.ndarray], np.ndarray], *, steps: int, lr: float,
         b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    """Plain Adam (Kingma & Ba) on one float64 array; returns the updated copy."""
    p = np.array(param, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, steps + 1):
        g = grad(p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def tip_key_grad(keys: np.ndarray, x: np.ndarray, y: np.ndarray, class_emb: np.ndarray, values: np.ndarray, *,
                 alpha: float, beta: float) -> tuple[float, np.ndarray]:
    """Cross-entropy of Tip-Adapter's logits on (x, y) and its gradient with respect to the cache keys."""
    x = np.asarray(x, np.float64)
    a = np.exp(-beta * (1.0 - x @ keys.T))  # (B, N)
    loss, g = cross_entropy(zero_shot_logits(x, class_emb) + alpha * (a @ values), y)
    ds = (alpha * g @ values.T) * a * beta  # d loss / d (x keys^T)
    return loss, ds.T @ x


def finetune_keys(keys: np.ndarray, x: np.ndarray, y: np.ndarray, class_emb: np.ndarray, values: np.ndarray, *,
                  alpha: float, beta: float, config: AdapterConfig) -> np.ndarray:
    """Tip-Adapter-F: the cache keys after ``finetune_steps`` Adam steps on the shots."""
    def grad(k):
        return tip_key_grad(k, x, y, class_emb, values, alpha=alpha, beta=beta)[1]

    return adam(keys, grad, steps=config.finetune_steps, lr=config.finetune_lr)


def probe_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, w0: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Loss (cross-entropy + l2/2 |W - W0|^2) of ``100 x W^T`` and its gradient with respect to W."""
    x = np.asarray(x, np.float64)
    loss, g = cross_entropy(LOGIT_SCALE * x @ w.T, y)
    diff = w - w0
    return loss + 0.5 * l2 * float(np.sum(diff * diff)), LOGIT_SCALE * g.T @ x + l2 * diff


def finetune_probe(x: np.ndarray, y: np.ndarray, class_emb: np.ndarray, config: AdapterConfig) -> np.ndarray:
    """The zero-shot-initialised probe's tuned weights (C, D), float64."""
    w0 = np.asarray(class_emb, np.float64)
    return adam(w0, lambda w: probe_grad(w, x, y, w0, config.probe_l2)[1], steps=config.probe_steps,
                lr=config.probe_lr)


def blend_logits(x: np.ndarray, class_emb: np.ndarray, tuned: np.ndarray, t: float) -> np.ndarray:
    """Logits of the WiSE blend ``(1 - t) W_text + t W_tuned``; t = 0 gives the zero-shot logits exactly."""
    if t == 0:
        return zero_shot_logits(x, class_emb)
    w = (1 - t) * np.asarray(class_emb, np.float64) + t * tuned
    return LOGIT_SCALE * np.asarray(x, np.float64) @ w.T
