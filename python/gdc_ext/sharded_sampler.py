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


def _lookup(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]`` in chunks (fancy indexing widens the indices to 8 bytes: only per chunk here)."""
    out = np.empty(idx.size, dtype=table.dtype)
    for lo in range(0, idx.size, _CHUNK):
        out[lo:lo + _CHUNK] = table[idx[lo:lo + _CHUNK]]
    return out


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
        """The network on positions ``x`` (uint64, < 2**bits); in place on two buffers."""
        wl, wr = self.widths
        left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
        f = np.empty_like(x)
        with np.errstate(over="ignore"):
            for key, mult in zip(self.keys, self.mults):
                # F: the top wl bits of (right ^ key) * mult; then (left, right) <- (right, left ^ F)
                np.bitwise_xor(right, key, out=f)
                np.multiply(f, mult, out=f)
                np.right_shift(f, np.uint64(64 - wl), out=f)
                np.bitwise_xor(left, f, out=left)
                left, right = right, left
                wl, wr = wr, wl
        np.left_shift(left, np.uint64(wr), out=left)
        np.bitwise_or(left, right, out=left)
        return left

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
            codes = (q.codes if isinstance(q, Quadrants) else q).detach().cpu()
            if codes.dim() != 1 or codes.dtype == torch.bool or codes.dtype.is_complex:
                raise ValueError(f"quadrants_or_weights: quadrant codes must be a 1-D integer tensor [n], got "
                                 f"{tuple(codes.shape)} {codes.dtype}")
            c = codes.numpy()
            if c.size and (int(c.min()) < -1 or int(c.max()) > 3):
                raise ValueError("quadrant codes must be in {-1, 0, 1, 2, 3}")
            # the multiplicity of each code (gdc_ext.multiplicities' table and checks), read per id
            table = multiplicities(torch.arange(-1, 4), gamma=gamma, keep_outliers=keep_outliers).numpy()
            base_of = np.floor(table)
            idx = c + c.dtype.type(1)  # codes -1..3 -> rows 0..4 of the table
            self._base = _lookup(base_of.astype(np.int32), idx)
            frac_of = table - base_of
            self._part = np.flatnonzero(_lookup(frac_of, idx) > 0) if frac_of.any() else np.zeros(0, dtype=np.intp)
            self._frac = frac_of[idx[self._part]]
            per_code = sum(np.bincount(idx[lo:lo + _CHUNK], minlength=5) for lo in range(0, idx.size, _CHUNK))
            self._expected = float(np.asarray(per_code) @ table) if idx.size else 0.0
        elif isinstance(q, torch.Tensor):
            w = q.detach().cpu().to(torch.float64)
            if w.dim() != 1:
                raise ValueError(f"quadrants_or_weights: weights must be 1-D [n], got shape {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("quadrants_or_weights: multiplicities must be finite and >= 0")
            w = w.numpy()
            base = np.floor(w)
            if base.size and base.max() >= 2 ** 31:
                raise ValueError("quadrants_or_weights: multiplicities must be below 2**31")
            self._base = base.astype(np.int32)
            self._part = np.flatnonzero(w > base)
            self._frac = (w - base)[self._part]
            self._expected = float(w.sum())
        else:
            raise ValueError("quadrants_or_weights must be a gdc_ext.Quadrants, an integer tensor of quadrant "
                             f"codes or a float tensor of multiplicities, got {type(q).__name__}")
        if self._base.size != n:
            raise ValueError(f"quadrants_or_weights: expected one value per owned id ({n}, ids [{start}, {start + n})), "
                             f"got {self._base.size}")
        # Per epoch only the ids with a fractional multiplicity draw a uniform (none for the default
        # quadrant multiplicities: then the draw list is built once and only its order changes).
        self._fixed_draws = None
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
        return self._expected

    def set_epoch(self, epoch: int) -> None:
        """Draws epoch ``epoch`` (collective: call it on every rank, as for DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        self._draw()

    def counts(self) -> torch.Tensor:
        """[n] int64: how many times each owned id is drawn this epoch, before balancing."""
        counts = self._base.astype(np.int64)
        if self._part.size:
            u = hash_uniform(self._part + self.start, _SAMPLER_TAG, self.seed, self.epoch)
            counts[self._part] += (u < self._frac).astype(np.int64)
        return torch.from_numpy(counts)

    def _draw(self) -> None:
        if self._part.size or self._fixed_draws is None:
            n = self._base.size
            counts = self._base if not self._part.size else self.counts().numpy()
            draws = np.repeat(np.arange(n, dtype=np.int32 if n < 2 ** 31 else np.int64), counts)  # local rows, ascending
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
        out = np.empty(self._length, dtype=np.int64)
        at = 0
        for ids in self._chunks():
            out[at:at + ids.size] = ids
            at += ids.size
        return out

    def __iter__(self) -> Iterator[int]:
        for ids in self._chunks():
            yield from ids.tolist()

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (f"ShardedCartoSampler(ids=[{self.start}, {self.start + self._base.size}) of N={self.num_samples}, "
                f"expected_total={self.expected_total:.1f}, seed={self.seed}, epoch={self.epoch}, "
                f"rank={self.rank}/{self.num_replicas}, drop_last={self.drop_last})")
