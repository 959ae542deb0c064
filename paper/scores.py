"""Every per-sample score the reproduction compares, and how a budget is spent on it.

All scores are oriented "higher = more suspected of memorization" and are [N] float64 with NaN
for an unscored sample (sorted last). Definitions: docs/method.md ("Scores beyond the paper").

This is the one place where the reproduction computes scores from the ``Scores`` fields; when
the library gains ``Scores.gain`` / ``Scores.excess(reference)`` and ``prune(by=...)`` for them,
the helpers below become thin calls to it (the tests check the two agree where both exist).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["as_np", "gain", "excess", "neg_last", "memorization_at", "duplicate_counts", "score_table",
           "select_top", "METHOD_SCORE", "auroc", "recall_at", "detection_metrics", "RECALL_PS"]

RECALL_PS = (0.01, 0.02, 0.05, 0.10)


def as_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def gain(scores) -> np.ndarray:
    """Learning gain d_i - last_i: hard early, easy late."""
    return as_np(scores.difficulty) - as_np(scores.last_loss)


def excess(scores, reference) -> np.ndarray:
    """Reference-calibrated excess ref_i - last_i (reference [N], nats per token)."""
    ref = as_np(reference)
    last = as_np(scores.last_loss)
    if ref.shape != last.shape:
        raise ValueError(f"reference must be [N] = {last.shape}, got shape {ref.shape}")
    return ref - last


def neg_last(scores) -> np.ndarray:
    """-last_i: the loss attack on the streaming state."""
    return -as_np(scores.last_loss)


def memorization_at(scores, eps_index: int) -> np.ndarray:
    """m_i at the eps_index-th tracked threshold ([N] whatever the number of thresholds)."""
    m = as_np(scores.memorization)
    return m if m.ndim == 1 else m[:, eps_index]


def duplicate_counts(train) -> np.ndarray:
    """[N] float64: how many *other* training samples are exactly identical to sample i (a
    data-only baseline: it needs no model)."""
    a = np.ascontiguousarray(np.asarray(train.numpy() if hasattr(train, "numpy") else train))
    if a.ndim != 2:
        raise ValueError(f"train must be [N, L], got shape {a.shape}")
    if len(a) == 0:
        return np.zeros(0)
    _, inv, counts = np.unique(a, axis=0, return_inverse=True, return_counts=True)
    return (counts[inv.reshape(-1)] - 1).astype(np.float64)


def score_table(scores, eps_grid: Sequence[float], eps_index: int, references: Dict[str, np.ndarray],
                duplicates: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    """name -> [N] score (higher = more suspected). m at every tracked eps, m at the fixed rule's
    eps, d, gain, -last, excess per reference, the unigram reference alone, duplicate count,
    random (seeded)."""
    d = as_np(scores.difficulty)
    out: Dict[str, np.ndarray] = {}
    for j, e in enumerate(eps_grid):
        out[f"m@{e:g}"] = memorization_at(scores, j)
    out["m"] = memorization_at(scores, eps_index)
    out["d"] = d.copy()
    out["gain"] = gain(scores)
    out["-last"] = neg_last(scores)
    for name, ref in references.items():
        out[f"excess_{name}"] = excess(scores, ref)
    if "unigram" in references:  # the reference alone: a data-only baseline (rare tokens look "memorized")
        out["ref_unigram"] = as_np(references["unigram"])
    out["duplicates"] = np.asarray(duplicates, dtype=np.float64)
    out["random"] = np.where(np.isnan(d), np.nan, np.random.default_rng(10_000 + seed).random(len(d)))
    return out


# intervention method -> score_table key; "memorization" breaks ties by d (the paper's pruning)
METHOD_SCORE = {"memorization": "m", "gain": "gain", "excess": "excess_unigram", "excess_zlib": "excess_zlib",
                "loss": "d", "last": "-last", "duplicates": "duplicates", "random": "random"}


def select_top(values, fraction: float, tiebreak: Optional[np.ndarray] = None, scored=None) -> np.ndarray:
    """Ids of the top ``round(fraction * N)`` samples by ``values``, ties broken by higher
    ``tiebreak`` then lower id, unscored samples (``scored`` [N] bool; default: finite values)
    last in id order: the budget and order of the library's ``gdc_ext.prune``. Sorted int64."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    v = as_np(values)
    ok = ~np.isnan(v) if scored is None else np.asarray(scored, bool)
    ids = np.flatnonzero(ok)
    k = int(round(fraction * len(v)))
    vv = np.nan_to_num(v[ids], nan=-np.inf)
    keys = [ids, -vv] if tiebreak is None else [ids, -np.nan_to_num(as_np(tiebreak)[ids], nan=-np.inf), -vv]
    order = np.concatenate([ids[np.lexsort(keys)], np.flatnonzero(~ok)])
    return np.sort(order[:k]).astype(np.int64)


# ------------------------------------------------------------------------------------- detection
def auroc(values, positive, negative=None) -> float:
    """P(score of a positive > score of a negative) + half the ties (NaN scores count lowest).
    positive, negative: [N] bool (negative default: not positive)."""
    from paper.metrics import auc

    v = as_np(values)
    pos = np.asarray(positive, bool)
    neg = ~pos if negative is None else np.asarray(negative, bool)
    if not pos.any() or not neg.any():
        return float("nan")
    ok = ~np.isnan(v)
    v = np.where(ok, v, v[ok].min() - 1.0 if ok.any() else 0.0)  # unscored: below every scored sample
    return auc(v[pos], v[neg])


def recall_at(selected: np.ndarray, positive) -> float:
    """Share of the positives that a selected id set covers."""
    pos = np.flatnonzero(np.asarray(positive, bool))
    return float(np.isin(pos, selected).mean()) if len(pos) else float("nan")


def detection_metrics(values, positive, negative=None, tiebreak=None, ps: Sequence[float] = RECALL_PS,
                      scored=None) -> dict:
    """{'auroc': ..., 'recall@1%': ...}: AUROC positives vs negatives; recall of the positives by
    the top p of all samples (the selection an intervention at budget p would make)."""
    out = {"auroc": auroc(values, positive, negative)}
    for p in ps:
        out[f"recall@{p:.0%}"] = recall_at(select_top(values, p, tiebreak, scored), positive)
    return out
