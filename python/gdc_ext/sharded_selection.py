"""Scores, quantile thresholds, quadrants and top-k selection on a sharded state, exact.

Each rank holds the scores of the ids it owns (:class:`ShardedScores`). What needs the whole
corpus is found by a distributed selection that never gathers per-sample values:

- the k-th smallest value over all ranks (:func:`kth_smallest`): a radix select over the values'
  order-preserving 64-bit keys, four rounds of a 65536-bin histogram summed over the ranks
  (O(65536) integers per round, whatever N), each rank keeping only its candidates;
- quantiles (:func:`quantile`): the one or two order statistics NumPy's linear interpolation
  reads, then NumPy's own interpolation formula (``_lerp``), so the threshold equals
  ``np.quantile`` / ``np.percentile`` on the gathered values bit for bit (-0.0 and 0.0 compare
  equal there and may come out either way);
- top-k (:func:`top_k_mask`): the k-th element of the selection order (score, then tiebreak,
  then id) by at most three selections, then each rank marks its own elements ahead of it: the
  union is exactly :func:`gdc_ext.cartography.top_k`'s set, with its ties.

With torch.distributed uninitialised (or one rank) the same code runs without collectives.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from gdc_ext import _dist
from gdc_ext._seed import check_seed
from gdc_ext.cartography import Quadrants, _check_by, resolve_eps, score_values
from gdc_ext.state import Scores, check_reference

__all__ = ["ShardedScores", "kth_smallest", "quantile", "top_k_mask", "float_keys", "hash_uniform"]

_SIGN = np.uint64(1 << 63)
_DIGIT_BITS = 16
_CHUNK = 1 << 18  # values per chunk of the first radix round (bounds its temporaries)
_LITTLE = sys.byteorder == "little"


# ------------------------------------------------------------------------------------------ keys
def float_keys(x: np.ndarray) -> np.ndarray:
    """uint64 keys ordered as the float64 values ``x`` (no NaN): -0.0 and 0.0 get the same key."""
    b = np.ascontiguousarray(np.asarray(x, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0: -0.0 -> 0.0
    return np.where(b >= _SIGN, ~b, b | _SIGN)


def _key_to_float(k: int) -> float:
    k = int(k)
    b = (k ^ (1 << 63)) if k >> 63 else (~k & 0xFFFFFFFFFFFFFFFF)
    return float(np.array([b], dtype=np.uint64).view(np.float64)[0])


def kth_smallest(keys: np.ndarray, k: int, group=None) -> int:
    """The ``k``-th smallest (0-based) of the uint64 ``keys`` of all ranks together (0 <= k <
    their total count, the same k on every rank). Four radix rounds of 16 bits: a histogram of
    the candidates' next digit, summed over the ranks, fixes that digit; each rank keeps its
    candidates with it. Collective: four all-reduces of 65536 int64."""
    return _radix(np.asarray(keys, dtype=np.uint64), int(k), group, 64 - _DIGIT_BITS, 0)


def _radix(cand: np.ndarray, k: int, group, shift: int, prefix: int) -> int:
    """Radix rounds from bit ``shift`` down over uint64 candidates sharing the bits above it
    (``prefix``); ``k`` counts within them."""
    mask = np.uint64((1 << _DIGIT_BITS) - 1)
    for sh in range(shift, -1, -_DIGIT_BITS):
        digits = ((cand >> np.uint64(sh)) & mask).astype(np.intp)
        d, k = _pick_digit(np.bincount(digits, minlength=1 << _DIGIT_BITS), k, group)
        prefix |= d << sh
        cand = cand[digits == d]
    return prefix


def _pick_digit(hist: np.ndarray, k: int, group) -> tuple[int, int]:
    """The digit whose bin holds the k-th of the histograms summed over the ranks, and k within it."""
    cum = np.cumsum(_dist.all_reduce(hist.astype(np.int64), "sum", group))
    if not 0 <= k < int(cum[-1]):
        raise ValueError(f"kth_smallest: k = {k} is outside the {int(cum[-1])} candidates")
    d = int(np.searchsorted(cum, k, side="right"))
    return d, k - (int(cum[d - 1]) if d else 0)


def _top16(c: np.ndarray, negate: bool) -> np.ndarray:
    """The top 16 bits of the order keys of a chunk of float64 values (of -values with ``negate``),
    read from the values' own top 16 bits: a copy of 2 bytes per value."""
    c = (-c if negate else c) + 0.0  # + 0.0: -0.0 -> 0.0, so that both get one key
    t = c.view(np.uint16)[3::4] if _LITTLE else c.view(np.uint16)[0::4]
    # positive: set the sign bit; negative: flip every bit (the order of float_keys)
    return t ^ ((t >> np.uint16(15)) * np.uint16(0x7FFF) | np.uint16(0x8000))


def kth_smallest_float(values: np.ndarray, k: int, group=None, *, negate: bool = False) -> float:
    """The ``k``-th smallest (0-based) non-NaN value of ``values`` over all ranks (of ``-values``
    with ``negate``, i.e. the k-th largest, returned negated back: the value itself). NaN entries
    are left out. The first radix round reads each value's top 16 bits in chunks (2 bytes per value
    kept, no 8-byte key array); the next rounds run on the values in the chosen bin. Collective."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    top = np.empty(v.size, dtype=np.uint16)
    hist = np.zeros(1 << _DIGIT_BITS, dtype=np.int64)
    any_nan = False
    for lo in range(0, v.size, _CHUNK):
        c = v[lo:lo + _CHUNK]
        t = top[lo:lo + _CHUNK]
        t[:] = _top16(c, negate)
        nan = np.isnan(c)
        if nan.any():
            any_nan = True
            hist += np.bincount(t[~nan], minlength=1 << _DIGIT_BITS)
        else:
            hist += np.bincount(t, minlength=1 << _DIGIT_BITS)
    d, k = _pick_digit(hist, int(k), group)
    pos = np.flatnonzero(top == np.uint16(d))
    del top
    cand = v[pos]
    if any_nan:
        cand = cand[~np.isnan(cand)]
    key = _radix(float_keys(-cand if negate else cand), k, group, 64 - 2 * _DIGIT_BITS, d << (64 - _DIGIT_BITS))
    x = _key_to_float(key)
    return -x if negate else x


def _count(mask_or_n, group) -> int:
    return int(_dist.all_reduce(np.array([int(mask_or_n)], dtype=np.int64), "sum", group)[0])


# ------------------------------------------------------------------------------------------ quantiles
def _lerp(a: np.float64, b: np.float64, t: np.float64) -> np.float64:
    """NumPy's ``_lerp`` (numpy/lib/_function_base_impl.py), for scalars."""
    diff = b - a
    with np.errstate(invalid="ignore", over="ignore"):
        out = a + diff * t
        if t >= 0.5:
            out = b - diff * (1 - t)
    return out


def quantile(values: np.ndarray, q, group=None, *, omit_nan: bool = False) -> float:
    """``np.quantile(gathered values, q)`` (linear interpolation) over every rank's ``values``
    (float64, 1-D), bit for bit, without gathering them; NaN when there is none or any is NaN
    (as NumPy), unless ``omit_nan``: then NaN entries are left out (the quantile of the others).
    ``q``: a float in [0, 1] (as NumPy computes it: pass ``np.true_divide(p, 100)`` for
    ``np.percentile(..., p)``). Collective: a few all-reduces of O(65536) values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n_nan = int(np.count_nonzero(np.isnan(v)))
    n, n_nan = (int(x) for x in _dist.all_reduce(np.array([v.size - n_nan, n_nan], dtype=np.int64), "sum", group))
    if n == 0 or (n_nan and not omit_nan):
        return float("nan")
    q = np.float64(q)
    virtual = (n - 1) * q  # NumPy's virtual index for 'linear': (n - 1) * q, in float64
    if virtual >= n - 1:
        prev_idx, lo, hi = -1, n - 1, n - 1
    elif virtual < 0:
        prev_idx, lo, hi = 0, 0, 0
    else:
        prev_idx = int(np.floor(virtual))
        lo, hi = prev_idx, prev_idx + 1
    gamma = np.float64(virtual - np.intp(prev_idx))
    a = np.float64(kth_smallest_float(v, lo, group))
    if hi == lo:
        b = a
    else:
        # NaN compares False: left out; -0.0 <= 0.0: the keys' order
        at_or_below = _count(int(np.count_nonzero(v <= a)), group)
        if at_or_below > hi:
            b = a
        else:  # the next order statistic: the smallest value above a
            local_min = np.min(v, where=v > a, initial=np.inf)
            b = np.float64(_dist.all_reduce(np.array([local_min], dtype=np.float64), "min", group)[0])
    return float(_lerp(a, b, gamma))


# ------------------------------------------------------------------------------------------ top-k
def top_k_mask(score: np.ndarray, k: int, tiebreak: Optional[np.ndarray] = None, start: int = 0,
               group=None) -> np.ndarray:
    """[n] bool over this rank's elements: the ones among the first ``k`` of the selection order of
    :func:`gdc_ext.cartography.selection_order` over all ranks (highest ``score`` first, ties by
    higher ``tiebreak`` (NaN lowest), then lower id; NaN scores last, by id). Element j of this
    rank has id ``start + j`` (ids increase with j and are unique over the ranks). Collective
    (the same ``k`` on every rank)."""
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    scored = ~np.isnan(s)
    total, n_scored = (int(x) for x in _dist.all_reduce(np.array([s.size, int(scored.sum())], dtype=np.int64),
                                                         "sum", group))
    k = min(int(k), total)
    mask = np.zeros(s.size, dtype=bool)
    if k == 0:
        return mask
    if k >= n_scored:  # every scored sample, then the unscored by id
        mask[scored] = True
        r = k - n_scored
        if r > 0:
            un = np.flatnonzero(~scored)
            ids = (un + int(start)).astype(np.uint64)
            last = kth_smallest(ids, r - 1, group)
            mask[un[ids <= np.uint64(last)]] = True
        return mask
    # the k-th highest score: the (k-1)-th smallest key of -score over the scored
    s_star = kth_smallest_float(s, k - 1, group, negate=True)  # the k-th highest score
    above = s > s_star
    mask |= above
    r = k - _count(int(above.sum()), group)
    tied = np.flatnonzero(s == s_star)
    if r == _count(tied.size, group):
        mask[tied] = True
        return mask
    t = np.zeros(tied.size) if tiebreak is None else \
        np.nan_to_num(np.asarray(tiebreak, dtype=np.float64).reshape(-1)[tied], nan=-np.inf)
    t_star = kth_smallest_float(t, r - 1, group, negate=True)
    t_above = t > t_star
    mask[tied[t_above]] = True
    r -= _count(int(t_above.sum()), group)
    tied = tied[t == t_star]
    ids = (tied + int(start)).astype(np.uint64)
    last = kth_smallest(ids, r - 1, group)
    mask[tied[ids <= np.uint64(last)]] = True
    return mask


# ------------------------------------------------------------------------------------------ random
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _stream_key(*words: int) -> np.uint64:
    key = np.zeros(1, dtype=np.uint64)
    for w in words:
        key = _mix64(key ^ np.array([w & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)) + _GOLDEN
    return key[0]


def hash_uniform(ids: np.ndarray, *words: int) -> np.ndarray:
    """[n] float64 uniforms in [0, 1), one per id, a function of (``words``, id) only: the same
    for an id whichever rank computes it (a counter-based generator keyed by ``words``, e.g.
    (tag, seed, epoch); splitmix64 of key + id * golden ratio)."""
    key = _stream_key(*words)
    with np.errstate(over="ignore"):
        z = np.asarray(ids).astype(np.uint64) * _GOLDEN + key
        z = _mix64(z)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


_RANDOM_TAG = 0x72616E646F6D  # "random": the stream of by="random" on shards


# ------------------------------------------------------------------------------------------ scores
@dataclass(repr=False)
class ShardedScores:
    """The scores of the ids one rank owns, ``[start, start + n)``, and the selections over all ranks.

    local: the :class:`~gdc_ext.Scores` of the owned ids (row j is id ``start + j``; every
        per-sample tensor is [n]); start: the first owned id; num_samples: N over all ranks;
        process_group: the group the state is sharded over.

    The selection methods are collective (every rank calls them with the same arguments) and
    return this rank's part: codes / ids of its own samples. Their union over the ranks equals
    what :mod:`gdc_ext.cartography` gives on the single-process scores, bit for bit (same
    thresholds, same ties), except ``by="random"``: one process draws a permutation of all N ids,
    which no rank can hold, so on shards the random score is a seeded uniform per id
    (:func:`hash_uniform`): the same whatever the world size, not the single-process order.
    ``reference`` arguments take this rank's [n] slice or the whole [N] (sliced here).
    """

    local: Scores
    start: int
    num_samples: int
    process_group: object = None

    @property
    def num_local(self) -> int:
        return int(self.local.difficulty.shape[0])

    @property
    def stop(self) -> int:
        return self.start + self.num_local

    @property
    def ids(self) -> torch.Tensor:
        """[n] int64: the owned ids, in row order."""
        return torch.arange(self.start, self.stop, dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"ShardedScores(ids=[{self.start}, {self.stop}) of N={self.num_samples}, epochs={self.local.epoch}, "
                f"burn_in={self.local.burn_in}, eps={self.local.eps})")

    # ----------------------------------------------------------------------------- values
    def _reference(self, reference):
        if reference is None:
            return None
        n = len(reference) if not isinstance(reference, torch.Tensor) else (
            reference.shape[0] if reference.dim() else -1)
        if n == self.num_samples and n != self.num_local:
            reference = reference[self.start:self.stop]
        elif n != self.num_local:
            raise ValueError(f"reference must hold this rank's {self.num_local} per-sample reference losses (ids "
                             f"[{self.start}, {self.stop})) or all N = {self.num_samples}, got {n} values")
        return check_reference(reference, self.num_local)

    def score_values(self, by: str = "memorization", *, seed: int = 0, eps: Optional[float] = None,
                     eps_index: Optional[int] = None, reference=None) -> torch.Tensor:
        """[n] float64: :func:`gdc_ext.score_values` of the owned ids (higher = selected first, NaN =
        unscored); "random" is :func:`hash_uniform` of (seed, id) on the scored ids (see the class)."""
        _check_by(by)
        seed = check_seed(seed)
        ref = self._reference(reference)
        if by == "random":
            resolve_eps(self.local, eps, eps_index)
            d = self.local.difficulty.double().numpy()
            u = hash_uniform(np.arange(self.start, self.stop), _RANDOM_TAG, seed)
            return torch.from_numpy(np.where(np.isnan(d), np.nan, u))
        return score_values(self.local, by, seed=seed, eps=eps, eps_index=eps_index, reference=ref)

    def quantiles(self, values, qs: Sequence[float] = (0.5, 0.9, 0.99)) -> Dict[float, float]:
        """:func:`gdc_ext.cartography.quantiles` over every rank's ``values`` (this rank's [n]):
        the quantiles ``qs`` of the finite entries (NaN when there is none). Collective."""
        a = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) \
            else np.asarray(values, dtype=np.float64)
        qs = tuple(float(q) for q in qs)
        if any(not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError(f"quantiles must be in [0, 1], got {qs}")
        a = a[np.isfinite(a)]
        return {q: quantile(a, q, self.process_group) for q in qs}

    def quadrants(self, alpha_d: float = 0.75, alpha_m: float = 0.75, eps_index: Optional[int] = None, *,
                  eps: Optional[float] = None, by: Optional[str] = None, memorization: Optional[str] = None,
                  reference=None, seed: int = 0) -> Quadrants:
        """:meth:`gdc_ext.Scores.quadrants` over all ranks: thresholds from the scored samples of
        every rank (``np.percentile`` exactly), codes [n] int8 of the owned ids. Collective."""
        if by is not None and memorization is not None and by != memorization:
            raise ValueError(f"give by or memorization (the same choice), not both: got by={by!r}, "
                             f"memorization={memorization!r}")
        for name, a in (("alpha_d", alpha_d), ("alpha_m", alpha_m)):
            if not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {a}")
        name = by if by is not None else (memorization if memorization is not None else "memorization")
        m = self.score_values(name, seed=seed, eps=eps, eps_index=eps_index, reference=reference).numpy()
        d = self.local.difficulty.double().numpy()
        scored = ~np.isnan(d)
        group = self.process_group
        if _count(int(np.count_nonzero(scored)), group) == 0:
            return Quadrants(torch.from_numpy(np.full(d.shape, -1, dtype=np.int8)), float("nan"), float("nan"))
        # np.percentile(x[scored], 100 * alpha) divides by 100 again: the same q, bit for bit. NaN
        # difficulty is what unscored means (left out); a NaN score of a scored sample makes NumPy's
        # threshold NaN, so it does here
        tau_d = quantile(d, np.true_divide(100 * alpha_d, 100), group, omit_nan=True)
        m_nan = 0
        if not np.array_equal(np.isnan(m), ~scored):  # score_values marks exactly the unscored NaN
            m_nan = int(np.count_nonzero(np.isnan(m) & scored))
            if not m_nan:
                m = np.where(scored, m, np.nan)  # scores of unscored samples are left out
        tau_m = float("nan") if _count(m_nan, group) else quantile(m, np.true_divide(100 * alpha_m, 100), group,
                                                                      omit_nan=True)
        # NaN compares False: the unscored get 0 + 0 here and -1 below
        codes = (d > tau_d).astype(np.int8)
        codes += 2 * (m > tau_m).astype(np.int8)
        codes[~scored] = -1
        return Quadrants(torch.from_numpy(codes), tau_d, tau_m)

    # ----------------------------------------------------------------------------- selections
    def top_k(self, k: int, by: str = "memorization", *, ordered: bool = False, seed: int = 0,
              eps: Optional[float] = None, eps_index: Optional[int] = None, reference=None) -> torch.Tensor:
        """The first ``k`` ids of the selection order by ``by`` over all ranks (ties by higher
        difficulty, then lower id: :func:`gdc_ext.cartography.top_k` with the difficulty as
        tiebreak, as :func:`gdc_ext.prune` uses). ``ordered=False``: this rank's chosen ids,
        sorted (their union over the ranks is the set); ``ordered=True``: all k ids in selection
        order, on every rank (gathered: for k small enough to hold). Collective."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        s = self.score_values(by, seed=seed, eps=eps, eps_index=eps_index, reference=reference).numpy()
        d = self.local.difficulty.double().numpy()
        mask = top_k_mask(s, int(k), d, self.start, self.process_group)
        chosen = np.flatnonzero(mask)
        if not ordered:
            return torch.from_numpy((chosen + self.start).astype(np.int64))
        group = self.process_group
        ids = np.concatenate(_dist.all_gather_varlen((chosen + self.start).astype(np.int64), group))
        sc = np.concatenate(_dist.all_gather_varlen(s[chosen], group))
        tb = np.concatenate(_dist.all_gather_varlen(np.nan_to_num(d[chosen], nan=-np.inf), group))
        un = np.isnan(sc)
        order = np.lexsort((ids, -np.where(un, 0.0, tb), -np.where(un, 0.0, sc), un))
        return torch.from_numpy(ids[order].astype(np.int64))

    def prune(self, fraction: float, by: str = "memorization", seed: int = 0, eps: Optional[float] = None, *,
              eps_index: Optional[int] = None, reference=None) -> torch.Tensor:
        """:func:`gdc_ext.prune` over all ranks: removes ``round(fraction * N)`` samples (N over all
        ranks) by the same order and ties; returns this rank's kept ids, sorted (the union over
        the ranks is the single-process result). Collective."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
                or not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        k = int(round(float(fraction) * self.num_samples))
        removed = self.top_k(k, by, seed=seed, eps=eps, eps_index=eps_index, reference=reference).numpy()
        keep = np.ones(self.num_local, dtype=bool)
        keep[removed - self.start] = False
        return torch.from_numpy(np.flatnonzero(keep) + self.start).to(torch.int64)

    def flagged_ids(self, by: str = "gain", *, fraction: Optional[float] = None, quadrant: Optional[int] = None,
                    reference=None, alpha_d: float = 0.75, alpha_m: float = 0.75, seed: int = 0,
                    eps: Optional[float] = None, eps_index: Optional[int] = None) -> torch.Tensor:
        """:func:`gdc_ext.cartography.flagged_ids` over all ranks: this rank's flagged ids, sorted. Collective."""
        if (fraction is None) == (quadrant is None):
            raise ValueError(f"give exactly one of fraction= or quadrant=, got fraction={fraction!r}, "
                             f"quadrant={quadrant!r}")
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
                    or not 0.0 <= float(fraction) <= 1.0:
                raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
            return self.top_k(int(round(float(fraction) * self.num_samples)), by, seed=seed, eps=eps,
                              eps_index=eps_index, reference=reference)
        from gdc_ext.cartography import QUADRANT_NAMES

        if isinstance(quadrant, bool) or not isinstance(quadrant, (int, np.integer)) or quadrant not in QUADRANT_NAMES:
            raise ValueError(f"quadrant must be one of {sorted(QUADRANT_NAMES)}, got {quadrant!r}")
        q = self.quadrants(alpha_d, alpha_m, eps=eps, eps_index=eps_index, by=by, reference=reference, seed=seed)
        return torch.from_numpy(np.flatnonzero(q.codes.numpy() == int(quadrant)) + self.start).to(torch.int64)

