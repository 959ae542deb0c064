"""ShardedCartoSampler: the sampling intervention on a sharded state, O(N / W) per rank.

Each rank draws only the ids it owns: id i with multiplicity w_i appears ``floor(w_i)`` times
plus once more when ``u(seed, epoch, i) < w_i - floor(w_i)``, where ``u`` is a counter-based
uniform keyed by (seed, epoch) and evaluated at i
(:func:`gdc_ext.sharded_selection.hash_uniform`), so an id's count does not depend on which rank
draws it: the union of the ranks' draws is the same multiset for every world size (1 included).
The rank's draws are then visited in a seeded pseudo-random order (a keyed Feistel permutation
of the positions, evaluated lazily in chunks: no shuffle pass, no Python list of the epoch).

Ranks draw different numbers of ids, but DDP needs equal lengths: every rank yields
``max`` over the ranks of the drawn counts, padding by repeating its own list from the start as
``DistributedSampler`` does (``drop_last=True``: the ``min``, trimming). One all-gather of W
integers per epoch (in the constructor and :meth:`ShardedCartoSampler.set_epoch`, so both are
collective) tells every rank the lengths.
"""
from __future__ import annotations

from typing import Iterator, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from gdc_ext import _dist
from gdc_ext._seed import check_seed
from gdc_ext.cartography import Quadrants, multiplicities
from gdc_ext.sharded_selection import _stream_key, hash_uniform

__all__ = ["ShardedCartoSampler"]

_SAMPLER_TAG = 0x73616D706C6572  # "sampler": the stream of the Bernoulli remainders
_ORDER_TAG = 0x6F72646572        # "order": the per-rank permutation
_CHUNK = 1 << 16                 # positions of the permutation evaluated per step (cache-sized)


class _Permutation:
    """A keyed pseudo-random order of ``0..m-1``: a 4-round Feistel network (a bijection of
    [0, 2**bits), bits the fewest covering m; unbalanced halves when bits is odd; multiply-shift
    round functions) applied to 0, 1, 2, ... with the values >= m skipped (2**bits < 2m, so at most
    half are). Vectorised over chunks of positions (:meth:`chunks`)."""

    ROUNDS = 4

    def __init__(self, m: int, *words: int):
        self.m = int(m)
        bits = max(2, int(self.m - 1).bit_length())
        self.widths = (bits // 2, bits - bits // 2)  # (left, right)
        keys = [int(_stream_key(*words, r)) for r in range(2 * self.ROUNDS)]
        self.keys = [np.uint64(k) for k in keys[:self.ROUNDS]]
        self.mults = [np.uint64(k | 1) for k in keys[self.ROUNDS:]]  # odd multipliers

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        wl, wr = self.widths
        left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
        with np.errstate(over="ignore"):
            for key, mult in zip(self.keys, self.mults):
                # F: the top wl bits of (right ^ key) * mult; then (left, right) <- (right, left ^ F)
                f = ((right ^ key) * mult) >> np.uint64(64 - wl)
                left, right = right, left ^ f
                wl, wr = wr, wl
        return (left << np.uint64(wr)) | right

    def chunks(self, size: int):
        """The permutation in order, as uint64 arrays: the network maps the positions of
        [0, 2**bits) chunk by chunk and the values >= m are dropped (rejection instead of
        cycle-walking: the same permutation of [0, m) up to the order, with no per-element loop)."""
        domain = 1 << sum(self.widths)
        for lo in range(0, domain, size):
            x = self._encrypt(np.arange(lo, min(lo + size, domain), dtype=np.uint64))
            yield x[x < np.uint64(self.m)]


class ShardedCartoSampler(Sampler[int]):
    """Sampler over the ids one rank owns, with per-id multiplicities drawn per epoch.

    Args:
        shard: the :class:`~gdc_ext.ShardedCartoState` (or its
            :class:`~gdc_ext.sharded_selection.ShardedScores`) whose owned ids ``[start, stop)``
            this rank draws, over its process group.
        quadrants_or_weights: this rank's [stop - start] quadrant codes (a
            :class:`~gdc_ext.Quadrants` from ``ShardedScores.quadrants``, or an integer tensor)
            turned into multiplicities by :func:`gdc_ext.multiplicities` with ``gamma`` and
            ``keep_outliers``, or a float tensor of multiplicities (>= 0) used as they are.
        gamma, keep_outliers: as :class:`~gdc_ext.CartoSampler`.
        seed: an int in [0, 2**63); epoch e's counts are keyed by (seed, e), its order by
            (seed, e, rank, world size).
        drop_last: trim every rank to the shortest rank's draw instead of padding to the longest.

    ``len()`` is this rank's (balanced) length of the current epoch; ``counts()`` the owned ids'
    draws before balancing; ``epoch_ids()`` the epoch's ids as one int64 array.
    """

    def __init__(self, shard, quadrants_or_weights: Union[Quadrants, torch.Tensor], gamma: float = 2.0,
                 keep_outliers: bool = False, seed: int = 0, *, drop_last: bool = False):
        start = getattr(shard, "start", None)
        n = getattr(shard, "num_local", None)
        if not isinstance(start, int) or not isinstance(n, int):
            raise ValueError(f"shard must be a gdc_ext.ShardedCartoState or ShardedScores, got {type(shard).__name__}")
        q = quadrants_or_weights
        if isinstance(q, Quadrants) or (isinstance(q, torch.Tensor) and not q.dtype.is_floating_point):
            w = multiplicities(q, gamma=gamma, keep_outliers=keep_outliers)
        elif isinstance(q, torch.Tensor):
            w = q.detach().cpu().to(torch.float64)
            if w.dim() != 1:
                raise ValueError(f"quadrants_or_weights: weights must be 1-D [n], got shape {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("quadrants_or_weights: multiplicities must be finite and >= 0")
        else:
            raise ValueError("quadrants_or_weights must be a gdc_ext.Quadrants, an integer tensor of quadrant "
                             f"codes or a float tensor of multiplicities, got {type(q).__name__}")
        if w.numel() != n:
            raise ValueError(f"quadrants_or_weights: expected one value per owned id ({n}, ids [{start}, {start + n})), "
                             f"got {w.numel()}")
        self.weights = w.numpy()
        # per epoch only the ids with a fractional multiplicity draw a uniform (none for the
        # default quadrant multiplicities), so the integer parts and those ids are kept once
        base = np.floor(self.weights)
        self._base = base.astype(np.int64)
        self._part = np.flatnonzero(self.weights > base)
        self._frac = (self.weights - base)[self._part]
        self._fixed_draws = None  # the draw list when no multiplicity is fractional (the same every epoch)
        self.start = start
        self.num_samples = int(shard.num_samples)
        self.process_group = shard.process_group
        self.num_replicas, self.rank = _dist.world_and_rank(self.process_group)
        self.seed = check_seed(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._draw()

    @property
    def expected_total(self) -> float:
        """Expected draws per epoch of this rank's ids, before balancing (sum of its weights)."""
        return float(self.weights.sum())

    def set_epoch(self, epoch: int) -> None:
        """Draws epoch ``epoch`` (collective: call it on every rank, as for DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        self._draw()

    def counts(self) -> torch.Tensor:
        """[n] int64: how many times each owned id is drawn this epoch, before balancing."""
        counts = self._base.copy()
        if self._part.size:
            u = hash_uniform(self._part + self.start, _SAMPLER_TAG, self.seed, self.epoch)
            counts[self._part] += (u < self._frac).astype(np.int64)
        return torch.from_numpy(counts)

    def _draw(self) -> None:
        if self._part.size or self._fixed_draws is None:
            dtype = np.int32 if self.weights.size < 2 ** 31 else np.int64
            draws = np.repeat(np.arange(self.weights.size, dtype=dtype), self.counts().numpy())  # local rows, ascending
            if not self._part.size:
                self._fixed_draws = draws
        else:
            draws = self._fixed_draws
        self._draws = draws
        sizes = _dist.all_gather(np.array([self._draws.size], dtype=np.int64), self.process_group)[:, 0]
        self._length = int(sizes.min() if self.drop_last else sizes.max())
        empty = [r for r, s in enumerate(sizes.tolist()) if s == 0]
        if self._length > 0 and empty:
            raise ValueError(f"ShardedCartoSampler: rank(s) {empty} draw no id in epoch {self.epoch} (all their "
                             f"multiplicities are 0) and cannot pad to the other ranks' {self._length}: use "
                             f"drop_last=True or give every rank some weight")
        self._perm = _Permutation(max(self._draws.size, 1), _ORDER_TAG, self.seed, self.epoch, self.rank,
                                  self.num_replicas)

    def _chunks(self):
        """This rank's ids of the epoch in order, as int64 arrays totalling ``len()``: the draws in
        the permutation's order, repeated from the start when the rank pads to the longest rank."""
        left = self._length
        while left > 0:
            for rows in self._perm.chunks(_CHUNK):
                ids = self._draws[rows.astype(np.intp)[:left]].astype(np.int64) + self.start
                left -= ids.size
                yield ids
                if left <= 0:
                    return

    def epoch_ids(self) -> np.ndarray:
        """[len()] int64: this rank's ids of the current epoch, in the order :meth:`__iter__` yields them."""
        return np.concatenate(list(self._chunks())) if self._length else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        for ids in self._chunks():
            yield from ids.tolist()

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (f"ShardedCartoSampler(ids=[{self.start}, {self.start + self.weights.size}) of N={self.num_samples}, "
                f"expected_total={self.expected_total:.1f}, seed={self.seed}, epoch={self.epoch}, "
                f"rank={self.rank}/{self.num_replicas}, drop_last={self.drop_last})")
