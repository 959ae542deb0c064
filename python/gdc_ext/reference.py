"""The specification in code: a plain NumPy implementation that *does* build the T x N loss
matrix and computes every score of docs/method.md from it. Short and obvious on purpose;
the property tests check that the streaming kernels agree with it.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple, Union

import numpy as np

__all__ = ["token_nll", "token_p_correct", "loss_matrix", "energy_totals", "scores_from_matrix", "cartography_from_matrices",
           "last_observed", "gain", "excess", "relative_excess", "quadrants", "prune_order", "selection_order", "select",
           "cartography_regions"]


def token_nll(logits: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-token NLL and logit-gradient energy ||softmax - onehot||^2, in float64.

    logits: [R, V]; target: [R] int. Returns (nll [R], energy [R]).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(target)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    p = np.exp(z - lse[:, None])
    rows = np.arange(len(y))
    nll = lse - z[rows, y]
    energy = (p ** 2).sum(1) - 2 * p[rows, y] + 1
    return nll, energy


def token_p_correct(logits: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-token p(y) = softmax(z)[y] in float64 and argmax correctness (1.0 / 0.0) by torch's
    rule, the first index among equal maxima: z[y] > z[j] for every j < y and z[y] >= z[j] for
    every j > y.

    logits: [R, V]; target: [R] int. Returns (p_y [R], correct [R]).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(target)
    nll, _ = token_nll(z, y)
    correct = np.zeros(len(y))
    for r in range(len(y)):
        zy = z[r, y[r]]
        correct[r] = float(all(zy > z[r, j] for j in range(y[r])) and all(zy >= z[r, j] for j in range(y[r] + 1, z.shape[1])))
    return np.exp(-nll), correct


def loss_matrix(epochs: Iterable[Sequence[Tuple[np.ndarray, np.ndarray]]], num_samples: int) -> np.ndarray:
    """L[t, i] = mean of the token losses of sample i seen in epoch t; NaN where none was seen.

    epochs: for each epoch, a sequence of (sample_ids [R], token_losses [R]) batches, one id per
    token (ignored tokens already removed). Any per-token value gives its per-epoch sample mean
    the same way: p(y) gives P[t, i], argmax correctness the token accuracy A[t, i].
    """
    rows = []
    for batches in epochs:
        total = np.zeros(num_samples)
        count = np.zeros(num_samples)
        for ids, losses in batches:
            np.add.at(total, np.asarray(ids), np.asarray(losses, dtype=np.float64))
            np.add.at(count, np.asarray(ids), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rows.append(np.where(count > 0, total / count, np.nan))
    return np.array(rows).reshape(-1, num_samples)


def energy_totals(epochs: Iterable[Sequence[Tuple[np.ndarray, np.ndarray]]], num_samples: int) -> np.ndarray:
    """Sum over every token of every epoch of its logit-gradient energy, per sample."""
    total = np.zeros(num_samples)
    for batches in epochs:
        for ids, energy in batches:
            np.add.at(total, np.asarray(ids), np.asarray(energy, dtype=np.float64))
    return total


def scores_from_matrix(L: np.ndarray, burn_in: int, eps: Union[float, Sequence[float]]) -> dict:
    """Every per-sample score of method.md from the T x N matrix L (NaN = not observed).

    Returns a dict of arrays: difficulty [N], memorization and forgets ([N] for a float eps,
    [N, K] for a sequence of K, as CartoState.scores() gives them), transitions [N], observed [N],
    last_loss [N], min_loss [N], loss_mean [N], loss_std [N], gain [N] (see :func:`gain`).
    """
    L = np.asarray(L, dtype=np.float64)
    scalar_eps = np.ndim(eps) == 0
    eps = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    T, N = L.shape
    K = len(eps)
    out = {name: np.full(N, np.nan) for name in ("difficulty", "last_loss", "min_loss", "loss_mean", "loss_std")}
    out["forgets"] = np.zeros((N, K), dtype=np.int64)
    out["memorization"] = np.zeros((N, K))
    out["transitions"] = np.zeros(N, dtype=np.int64)
    out["observed"] = np.zeros(N, dtype=np.int64)
    for i in range(N):
        seen = [t for t in range(T) if not np.isnan(L[t, i])]
        values = L[seen, i]
        burn = [L[t, i] for t in seen if t + 1 <= burn_in]  # epochs are 1-based
        if burn:
            out["difficulty"][i] = np.mean(burn)
        out["observed"][i] = len(seen)
        out["transitions"][i] = max(len(seen) - 1, 0)
        for k in range(K):
            out["forgets"][i, k] = sum(1 for a, b in zip(values[:-1], values[1:]) if a < eps[k] and b > eps[k])
            if out["transitions"][i] > 0:
                out["memorization"][i, k] = out["forgets"][i, k] / out["transitions"][i]
        if seen:
            out["last_loss"][i] = values[-1]
            out["min_loss"][i] = values.min()
            out["loss_mean"][i] = values.mean()
            out["loss_std"][i] = values.std()
    out["gain"] = gain(L, burn_in)
    if scalar_eps:
        out["memorization"], out["forgets"] = out["memorization"][:, 0], out["forgets"][:, 0]
    return out


def cartography_from_matrices(P: np.ndarray, A: np.ndarray) -> dict:
    """The cartography statistics of docs/method.md ("Data cartography") from the T x N matrices
    P (P[t, i]: the mean token p(y) of sample i in epoch t) and A (its token accuracy), NaN where
    sample i was not observed in epoch t (the same entries in both).

    Learnt in epoch t: A[t, i] == 1 (every token argmax-correct). Returns a dict of [N] arrays:
    confidence (mean of P over observed epochs), variability (population std of P), correctness
    (learnt epochs), accuracy_last (A at the last observed epoch), forgetting (pairs of consecutive
    observations learnt -> not learnt), never_learnt (observed, never learnt), first_learned (the
    first learnt epoch, 1-based; NaN if none); NaN for the float ones where never observed.
    """
    P = np.asarray(P, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    T, N = P.shape
    out = {name: np.full(N, np.nan) for name in ("confidence", "variability", "accuracy_last", "first_learned")}
    out["correctness"] = np.zeros(N, dtype=np.int64)
    out["forgetting"] = np.zeros(N, dtype=np.int64)
    out["never_learnt"] = np.zeros(N, dtype=bool)
    for i in range(N):
        seen = [t for t in range(T) if not np.isnan(P[t, i])]
        if not seen:
            continue
        p, learnt = P[seen, i], A[seen, i] == 1.0
        out["confidence"][i] = p.mean()
        out["variability"][i] = p.std()
        out["accuracy_last"][i] = A[seen[-1], i]
        out["correctness"][i] = int(learnt.sum())
        out["forgetting"][i] = sum(1 for a, b in zip(learnt[:-1], learnt[1:]) if a and not b)
        out["never_learnt"][i] = not learnt.any()
        if learnt.any():
            out["first_learned"][i] = seen[int(np.argmax(learnt))] + 1  # epochs are 1-based
    return out


def cartography_regions(confidence: np.ndarray, variability: np.ndarray, fraction: float = 0.33) -> dict:
    """Swayamdipta et al.'s three regions as selections of round(fraction * n) of the n samples
    with a confidence (NaN: never observed, in no region): ambiguous = the highest variability,
    easy-to-learn = the highest confidence, hard-to-learn = the lowest confidence; ties by lower
    id. A plain sort with a key, on purpose. Returns {region: sorted ids}."""
    c = np.asarray(confidence, dtype=np.float64)
    v = np.asarray(variability, dtype=np.float64)
    ids = [i for i in range(len(c)) if not np.isnan(c[i])]
    k = int(round(fraction * len(ids)))
    by = {"ambiguous": lambda i: (-v[i], i), "easy-to-learn": lambda i: (-c[i], i), "hard-to-learn": lambda i: (c[i], i)}
    return {name: np.array(sorted(sorted(ids, key=key)[:k]), dtype=np.int64) for name, key in by.items()}


def last_observed(L: np.ndarray) -> np.ndarray:
    """last_i = L[t, i] at the last epoch t in which sample i was observed; NaN if never."""
    L = np.asarray(L, dtype=np.float64)
    last = np.full(L.shape[1], np.nan)
    for i in range(L.shape[1]):
        for t in range(L.shape[0]):
            if not np.isnan(L[t, i]):
                last[i] = L[t, i]
    return last


def gain(L: np.ndarray, burn_in: int) -> np.ndarray:
    """Learning gain [N]: gain_i = d_i - last_i (d_i the mean of L[t, i] over observed burn-in
    epochs t <= burn_in); NaN where d_i is NaN (unscored)."""
    L = np.asarray(L, dtype=np.float64)
    d = np.full(L.shape[1], np.nan)
    for i in range(L.shape[1]):
        burn = [L[t, i] for t in range(min(burn_in, L.shape[0])) if not np.isnan(L[t, i])]
        if burn:
            d[i] = np.mean(burn)
    return d - last_observed(L)


def excess(L: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reference-calibrated excess [N]: excess_i = ref_i - last_i (nats per token); NaN where
    sample i was never observed."""
    return np.asarray(reference, dtype=np.float64) - last_observed(L)


def relative_excess(L: np.ndarray, reference: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """Relative excess [N]: 1 - max(last_i, floor) / max(ref_i, floor) (ref_i >= 0); NaN where
    sample i was never observed."""
    last = last_observed(L)
    return 1.0 - np.where(np.isnan(last), np.nan, np.maximum(last, floor)) / np.maximum(
        np.asarray(reference, dtype=np.float64), floor)


def quadrants(difficulty: np.ndarray, memorization: np.ndarray, alpha_d: float = 0.75, alpha_m: float = 0.75):
    """Quadrant codes (0 stable-easy, 1 ambiguous-hard, 2 hotspot-memorized, 3 noisy-outlier,
    -1 unscored) and the thresholds (tau_d, tau_m), by NumPy percentiles over scored samples."""
    d = np.asarray(difficulty, dtype=np.float64)
    m = np.asarray(memorization, dtype=np.float64)
    scored = ~np.isnan(d)
    codes = np.full(len(d), -1, dtype=np.int8)
    if not scored.any():
        return codes, (np.nan, np.nan)
    tau_d = np.percentile(d[scored], 100 * alpha_d)
    tau_m = np.percentile(m[scored], 100 * alpha_m)
    hard = d > tau_d
    mem = m > tau_m
    codes[scored] = (hard.astype(np.int8) + 2 * mem.astype(np.int8))[scored]
    return codes, (float(tau_d), float(tau_m))


def prune_order(memorization: np.ndarray, difficulty: np.ndarray) -> np.ndarray:
    """Sample indices from most to least memorized, ties broken by higher difficulty, then id."""
    m = np.asarray(memorization, dtype=np.float64)
    d = np.nan_to_num(np.asarray(difficulty, dtype=np.float64), nan=-np.inf)
    return np.lexsort((np.arange(len(m)), -d, -m))


def selection_order(score: np.ndarray, tiebreak=None) -> np.ndarray:
    """Sample indices by any score: highest score first, ties by higher tiebreak (NaN lowest),
    then lower id; NaN scores (unscored) last, by id. A plain sort with a key, on purpose."""
    s = np.asarray(score, dtype=np.float64)
    t = np.zeros(len(s)) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)

    def key(i):
        if np.isnan(s[i]):
            return (1, 0.0, 0.0, i)
        return (0, -s[i], np.inf if np.isnan(t[i]) else -t[i], i)

    return np.array(sorted(range(len(s)), key=key), dtype=np.int64)


def select(score: np.ndarray, fraction: float, tiebreak=None) -> np.ndarray:
    """The selected (pruned) ids: the first round(fraction * N) of :func:`selection_order`."""
    order = selection_order(score, tiebreak)
    return order[:int(round(fraction * len(order)))]
