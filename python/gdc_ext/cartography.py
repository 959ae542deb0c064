"""From scores to actions: quadrants, per-sample multiplicities and loss weights, pruning.

Definitions: shared/method.md. Every function takes explicit parameters; nothing is hidden.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch

__all__ = ["QUADRANT_NAMES", "Quadrants", "quadrants", "multiplicities", "loss_weights", "prune"]

QUADRANT_NAMES = {0: "stable-easy", 1: "ambiguous-hard", 2: "hotspot-memorized", 3: "noisy-outlier",
                  -1: "unscored"}


class Quadrants(NamedTuple):
    """codes: [N] int8 (0..3, -1 unscored); tau_d, tau_m: the thresholds used."""

    codes: torch.Tensor
    tau_d: float
    tau_m: float

    def counts(self) -> dict:
        """Number of samples per quadrant name."""
        c = self.codes
        return {QUADRANT_NAMES[q]: int((c == q).sum()) for q in (0, 1, 2, 3, -1)}


def _as_f64(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
    return a


def quadrants(difficulty, memorization, alpha_d: float = 0.75, alpha_m: float = 0.75) -> Quadrants:
    """Quadrant codes by percentile thresholds over the scored samples (NumPy's linear
    interpolation): hard = d > tau_d, memorized = m > tau_m (strict: ties go low).

    difficulty, memorization: [N] (NaN difficulty = unscored). alpha_d, alpha_m in [0, 1].
    """
    for name, a in (("alpha_d", alpha_d), ("alpha_m", alpha_m)):
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {a}")
    d = _as_f64(difficulty, "difficulty")
    m = _as_f64(memorization, "memorization")
    if d.shape != m.shape:
        raise ValueError(f"difficulty {d.shape} and memorization {m.shape} must have the same shape")
    scored = ~np.isnan(d)
    codes = np.full(d.shape, -1, dtype=np.int8)
    if not scored.any():
        return Quadrants(torch.from_numpy(codes), float("nan"), float("nan"))
    tau_d = float(np.percentile(d[scored], 100 * alpha_d))
    tau_m = float(np.percentile(m[scored], 100 * alpha_m))
    codes[scored] = ((d[scored] > tau_d).astype(np.int8) + 2 * (m[scored] > tau_m).astype(np.int8))
    return Quadrants(torch.from_numpy(codes), tau_d, tau_m)


def _codes(q: Union[Quadrants, torch.Tensor]) -> torch.Tensor:
    codes = q.codes if isinstance(q, Quadrants) else torch.as_tensor(q)
    if codes.dim() != 1:
        raise ValueError(f"quadrant codes must be 1-D [N], got shape {tuple(codes.shape)}")
    if bool(((codes < -1) | (codes > 3)).any()):
        raise ValueError("quadrant codes must be in {-1, 0, 1, 2, 3}")
    return codes.to(torch.int64)


def multiplicities(q, gamma: float = 2.0, keep_outliers: bool = False, easy: float = 1.0,
                   unscored: float = 1.0) -> torch.Tensor:
    """Per-epoch sampling multiplicity [N] float64: 0 -> easy, 1 -> gamma, 2 -> 1,
    3 -> 0 (1 with keep_outliers), unscored -> `unscored`."""
    if not gamma > 1.0:
        raise ValueError(f"gamma must be > 1 (up-sampling of ambiguous-hard samples), got {gamma}")
    if easy < 0 or unscored < 0:
        raise ValueError("easy and unscored multiplicities must be >= 0")
    codes = _codes(q)
    table = torch.tensor([easy, gamma, 1.0, 1.0 if keep_outliers else 0.0, unscored], dtype=torch.float64)
    return table[torch.where(codes < 0, torch.full_like(codes, 4), codes)]


def loss_weights(q, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample loss weight [N] float32: hotspot-memorized (2) -> alpha, everything else 1."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (down-weighting of memorized samples), got {alpha}")
    codes = _codes(q)
    w = torch.ones(codes.shape, dtype=torch.float32)
    w[codes == 2] = alpha
    return w


def prune(scores, fraction: float, by: str = "memorization", seed: int = 0, eps_index: int = 0) -> torch.Tensor:
    """Ids kept after removing the top `fraction` of scored samples.

    by: "memorization" (the paper: highest m_i first, ties broken by higher difficulty, then id),
        "loss" (highest difficulty, i.e. mean burn-in loss), or "random" (a seeded uniform choice),
        so that baselines use exactly the same budget. Unscored samples are always kept.
    Returns sorted int64 ids [N - round(fraction * scored)].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    d = _as_f64(scores.difficulty, "difficulty")
    m_t = scores.memorization if scores.memorization.dim() == 1 else scores.memorization[:, eps_index]
    m = _as_f64(m_t, "memorization")
    ids = np.arange(len(d))
    scored = ids[~np.isnan(d)]
    k = int(round(fraction * len(scored)))
    if by == "memorization":
        order = scored[np.lexsort((scored, -d[scored], -m[scored]))]
    elif by == "loss":
        order = scored[np.lexsort((scored, -d[scored]))]
    elif by == "random":
        order = np.random.default_rng(seed).permutation(scored)
    else:
        raise ValueError(f"by must be 'memorization', 'loss' or 'random', got {by!r}")
    keep = np.ones(len(d), dtype=bool)
    keep[order[:k]] = False
    return torch.from_numpy(ids[keep]).to(torch.int64)
