"""CartoSampler: the sampling intervention (per-epoch multiplicities), split across ranks.

Definitions: docs/method.md ("Interventions"). A sample with multiplicity w appears
``floor(w)`` times per epoch plus once more with probability ``w - floor(w)``; the epoch's list is
shuffled; everything is drawn from a generator seeded with ``seed + epoch``, so every rank draws
the same list and a run is reproducible.
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import torch
from torch.utils.data import Sampler

from gdc_ext._seed import check_seed
from gdc_ext.cartography import Quadrants, multiplicities

__all__ = ["CartoSampler"]


class CartoSampler(Sampler[int]):
    """Sampler over sample ids ``0..N-1`` drawing each id a random number of times per epoch.

    Args:
        quadrants_or_weights: a :class:`~gdc_ext.Quadrants` (or an integer tensor of quadrant
            codes [N]; from any memorized-axis score, e.g. ``scores.quadrants(by="gain")``),
            turned into multiplicities by :func:`gdc_ext.multiplicities` with
            ``gamma`` and ``keep_outliers``; or a float tensor [N] of multiplicities (>= 0) used
            as they are (``gamma`` and ``keep_outliers`` are then ignored).
        gamma: up-sampling factor of ambiguous-hard samples (> 1).
        keep_outliers: keep noisy-outliers (multiplicity 1) instead of removing them (0).
        seed: base seed, an int in [0, 2**63); the epoch's draw uses ``seed + epoch`` (see :meth:`set_epoch`).
        num_replicas, rank: the distributed split. ``None`` takes them from
            ``torch.distributed`` when it is initialised, else 1 and 0.

    Each epoch: draw the multiplicities, list each id that many times, shuffle, then pad by
    repeating the list from its start until its length divides by ``num_replicas`` (as
    ``DistributedSampler`` does) and give rank r the positions ``r, r + R, r + 2R, ...``.

    ``len()`` is the number of ids this rank yields in the *current* epoch: the drawn total
    varies from epoch to epoch (Bernoulli remainders), so it is computed from the epoch's drawn
    list, which is cached; it is stable until :meth:`set_epoch` changes the epoch, and the same on
    every rank. :attr:`expected_total` gives the expected total over ranks before padding.
    """

    def __init__(self, quadrants_or_weights: Union[Quadrants, torch.Tensor], gamma: float = 2.0,
                 keep_outliers: bool = False, seed: int = 0, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None):
        q = quadrants_or_weights
        if isinstance(q, Quadrants) or (isinstance(q, torch.Tensor) and not q.dtype.is_floating_point):
            w = multiplicities(q, gamma=gamma, keep_outliers=keep_outliers)
        elif isinstance(q, torch.Tensor):
            w = q.detach().cpu().to(torch.float64)
            if w.dim() != 1:
                raise ValueError(f"quadrants_or_weights: weights must be 1-D [N], got shape {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("quadrants_or_weights: multiplicities must be finite and >= 0")
        else:
            raise ValueError("quadrants_or_weights must be a gdc_ext.Quadrants, an integer tensor of quadrant "
                             f"codes or a float tensor of multiplicities, got {type(q).__name__}")
        if w.numel() == 0:
            raise ValueError("quadrants_or_weights: need at least one sample")
        seed = check_seed(seed)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            if num_replicas is None:
                num_replicas = dist.get_world_size() if initialised else 1
            if rank is None:
                rank = dist.get_rank() if initialised else 0
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")
        self.weights = w                     # [N] float64 multiplicities
        # N, the number of sample ids (not the epoch's length: see len()); fixed by weights' shape.
        self.num_samples = int(w.numel())
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._cache: Optional[tuple] = None  # (epoch, padded list over all ranks)

    @property
    def expected_total(self) -> float:
        """Expected number of draws per epoch over all ranks, before padding (sum of weights)."""
        return float(self.weights.sum())

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose draw ``__iter__`` and ``len()`` use (call it on every rank)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def counts(self, epoch: Optional[int] = None) -> torch.Tensor:
        """[N] int64: how many times each id is drawn in ``epoch`` (default: the current one),
        over all ranks and before padding."""
        return self._draw(self.epoch if epoch is None else epoch)[0]

    def _draw(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed + epoch)
        w = self.weights
        base = torch.floor(w)
        extra = torch.rand(w.shape, generator=g, dtype=torch.float64) < (w - base)
        counts = base.to(torch.int64) + extra.to(torch.int64)
        ids = torch.repeat_interleave(torch.arange(w.numel()), counts)
        ids = ids[torch.randperm(ids.numel(), generator=g)]
        return counts, ids

    def _padded(self) -> torch.Tensor:
        if self._cache is None or self._cache[0] != self.epoch:
            ids = self._draw(self.epoch)[1]
            R = self.num_replicas
            pad = (-ids.numel()) % R
            if pad and ids.numel():
                reps = -(-pad // ids.numel())  # the list may be shorter than the padding
                ids = torch.cat([ids, ids.repeat(reps)[:pad]])
            self._cache = (self.epoch, ids)
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._padded()[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self._padded().numel() // self.num_replicas

    def __repr__(self) -> str:
        return (f"CartoSampler(N={self.num_samples}, expected_total={self.expected_total:.1f}, seed={self.seed}, "
                f"epoch={self.epoch}, num_replicas={self.num_replicas}, rank={self.rank})")
