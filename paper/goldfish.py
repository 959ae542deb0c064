"""Goldfish loss (Hans et al. 2024, "Be like a Goldfish, Don't Memorize!") as a target mask.

A target token is dropped from the loss when a hash of the h tokens before it selects it, which
happens at rate 1/k. The hash depends only on the context, so every copy of a repeated passage
drops the *same* tokens: the model never sees those tokens as targets in that context and cannot
reproduce the passage verbatim, however often it is repeated. Applied by setting the dropped
targets to ignore_index (CartoLoss / cross_entropy skip them).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["goldfish_mask", "apply_target_mask"]

_FNV = np.uint64(0x100000001B3)
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (uint64 arithmetic wraps modulo 2^64 in NumPy): well-mixed low bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def goldfish_mask(tokens, k: int = 4, h: int = 4, seed: int = 0) -> torch.Tensor:
    """[N, L-1] bool: True where the next-token target ``tokens[:, t + 1]`` is dropped.

    tokens: [N, L] int token ids (inputs and targets of next-token prediction). The context of
    target t + 1 is tokens[:, t + 1 - h : t + 1]; positions before the start are a fixed pad value,
    so the first targets are hashed on a shorter context and every position is dropped at rate 1/k.
    k >= 1 (k = 1 drops everything), h >= 1; seed picks one of many hash functions.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1 (drop rate 1/k), got {k!r}")
    if int(h) != h or h < 1:
        raise ValueError(f"h must be an integer >= 1 (context width), got {h!r}")
    a = np.asarray(tokens.cpu().numpy() if hasattr(tokens, "cpu") else tokens)
    if a.ndim != 2:
        raise ValueError(f"tokens must be [N, L], got shape {a.shape}")
    n, L = a.shape
    pad = np.full((n, h), -1, dtype=np.int64)
    x = np.concatenate([pad, a.astype(np.int64)], 1).astype(np.uint64)  # -1 wraps to a value no token has
    with np.errstate(over="ignore"):
        hsh = np.full((n, L - 1), np.uint64(0xCBF29CE484222325) ^ _splitmix(np.uint64(seed)), dtype=np.uint64)
        for i in range(h):  # context token at offset i of the window ending just before target t + 1
            hsh = ((hsh ^ x[:, 1 + i:L + i]) * _FNV) & _MASK
        hsh = _splitmix(hsh)
    return torch.from_numpy(hsh % np.uint64(k) == 0)


def apply_target_mask(targets: torch.Tensor, mask: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """targets with the masked positions set to ignore_index (a copy)."""
    if targets.shape != mask.shape:
        raise ValueError(f"mask must have the targets' shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    return targets.masked_fill(mask.to(targets.device), ignore_index)
