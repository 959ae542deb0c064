"""ShardedCartoState: the per-sample state split over the ranks of torch.distributed, for corpora
too large for every rank to hold all of it.

Rank r owns the contiguous id range ``[start, stop)`` (a balanced split: the first ``N % W``
ranks own one id more) and keeps it as an ordinary :class:`~gdc_ext.CartoState` of
``stop - start`` samples (:attr:`ShardedCartoState.local`; local row ``j`` is id ``start + j``).
Whatever a rank records, through the fused losses or :meth:`ShardedCartoState.record`, lands
in a small per-call accumulator of the call's distinct ids: the rows of owned ids continue the
owner's running sums (so a rank recording its own ids adds exactly what a single
:class:`CartoState` adds, in the same order), the rows of other ranks' ids are partial sums
started from zero that are routed to their owner (one ``all_to_all`` every ``flush_every``
recording calls, or only at ``end_epoch`` with ``flush_every=None``), which adds them once into
its accumulator. ``end_epoch`` is then local: each rank folds its own shard. No collective moves
a tensor with one entry per sample: a header of ``16 + W`` integers per rank, the routed rows
(O(batch)) and, in the selections (:mod:`gdc_ext.sharded_selection`), O(W) counts and O(k) ids.

Why contiguous ranges (not ``id % W``): a checkpoint reshards by reading contiguous slices of at
most ``ceil(W_old / W_new) + 1`` shard files per rank (``id % W`` needs every file on every rank),
the local row of an id is a subtraction, and the routing cost per step is the same (measured in
bench/state_bench.py).

Exactness: a sample whose rows of an epoch are all recorded by one rank in one call (a
``DistributedSampler``-style split with per-sequence ids, packed or not as long as a document is
not split across steps), or all by its owner, ends the epoch with exactly the sum a single
process recording the same calls has, so scores, quadrants, selections and seeded draws are
bit-identical to one process's. A sample whose rows are split over calls of a non-owner (or over
ranks) is summed in another order: equal up to float64 rounding (a few ulps of its loss sum).

Every collective starts with a header all-gather that checks the ranks agree (N, eps, burn_in,
extras, flush_every, epochs done, recording calls this epoch, which call this is): ranks that
disagree raise the same ValueError on every rank, naming the field, the ranks and their values,
before anything is changed or routed.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch

from gdc_ext import _dist
from gdc_ext.ops import ArgumentError
from gdc_ext.state import CartoState

__all__ = ["ShardedCartoState", "shard_bounds", "owner_of", "refuse_sharded"]

_MAGIC = 0x6764635F73683031  # "gdc_sh01": marks the sharded state's header all-gather
_OP_NAMES = {1: "construction", 2: "a recording call's flush", 3: "end_epoch", 4: "reset_epoch",
             5: "state_dict / save"}
_OP_INIT, _OP_FLUSH, _OP_END_EPOCH, _OP_RESET, _OP_SAVE = 1, 2, 3, 4, 5
_EPS_SHOWN = 4
_HEAD = ("magic", "op", "num_samples", "burn_in", "extras", "num_eps", "eps_hash", "epochs_done", "calls",
         "world_size", "flush_every", "recorded")
_H = {name: i for i, name in enumerate(_HEAD)}
_COUNTS = len(_HEAD) + _EPS_SHOWN  # first column of the per-destination row counts
# (name in the message, header column): what every rank must agree on
_CHECKS = (("num_samples (N)", "num_samples"), ("eps", "eps"), ("burn_in", "burn_in"), ("extras", "extras"),
           ("flush_every", "flush_every"), ("epochs_done", "epochs_done"),
           ("recording calls this epoch", "calls"))
_NOTHING_RECORDED = "CartoState.end_epoch: nothing was recorded"


def shard_bounds(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The id range ``[start, stop)`` rank ``rank`` of ``world_size`` owns: a balanced contiguous
    split of ``0..num_samples-1`` (the first ``num_samples % world_size`` ranks own one more)."""
    base, rem = divmod(int(num_samples), int(world_size))
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


def owner_of(ids: torch.Tensor, num_samples: int, world_size: int) -> torch.Tensor:
    """The rank owning each id of ``ids`` (int64, in [0, N)) under :func:`shard_bounds`; int64."""
    base, rem = divmod(int(num_samples), int(world_size))
    cut = rem * (base + 1)  # ids below it belong to the ranks with one id more
    return torch.where(ids < cut, ids // (base + 1), rem + (ids - cut) // max(base, 1))


def refuse_sharded(target, where: str) -> None:
    """Raises the ValueError of the places that take a CartoState but not yet a ShardedCartoState
    (the Cartographer's metrics, the Hugging Face and Lightning integrations), saying what to use."""
    if isinstance(target, ShardedCartoState):
        raise ValueError(f"{where} does not support a ShardedCartoState yet (it reads every sample's scores on every "
                         f"rank and saves the state as one file). Use a replicated gdc_ext.CartoState there, or record "
                         f"into the sharded state with gdc_ext.CartoLoss(state=...) in your own loop and use "
                         f"state.end_epoch(), state.scores() (quadrants, prune, quantiles), "
                         f"gdc_ext.ShardedCartoSampler and state.save(folder)")


def _hash64(data: bytes) -> int:
    return struct.unpack("<q", hashlib.sha256(data).digest()[:8])[0]


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(x)))[0]


class ShardedCartoState:
    """A :class:`~gdc_ext.CartoState` of N samples split over the ranks of a process group.

    Args:
        num_samples, burn_in, eps, device, extras: as :class:`~gdc_ext.CartoState` (the same
            ValueErrors); N is the global number of sample ids and must be >= the world size.
        process_group: the torch.distributed group to shard over (None: the default group; with
            torch.distributed not initialised, one rank owning every id).
        flush_every: route the rows recorded for other ranks' ids every this many recording
            calls (an int >= 1; 1, the default, routes after every call: O(batch) memory), or
            None to keep them until ``end_epoch`` (no collective while training, but O(rows
            recorded for other ranks in the epoch) memory).

    Collective calls (every rank of the group makes them, in the same order): the constructor,
    ``end_epoch``, ``reset_epoch``, ``state_dict`` / ``save`` (when routed rows are pending),
    :meth:`load`, and every recording call (fused losses and :meth:`record`) when
    ``flush_every`` is an int: the ranks must make the same number of recording calls, as DDP's
    lock-step training does. A rank out of step or built differently makes every rank raise the
    same ValueError (not a hang) at the next collective.

    Attributes: ``num_samples`` (N), ``burn_in``, ``extras``, ``world_size``, ``rank``,
    ``start`` / ``stop`` (the owned ids), ``local`` (the CartoState of the owned ids; row j is id
    ``start + j``), ``flush_every``, ``process_group``.

    Memory per rank: ``local.nbytes()`` (the CartoState's bytes per sample times
    ``stop - start``) plus the routed rows not yet flushed.
    """

    def __init__(self, num_samples: int, burn_in: int, eps: Union[float, Sequence[float]] = 0.1,
                 device: Union[str, torch.device] = "cpu", extras: bool = False, *, process_group=None,
                 flush_every: Optional[int] = 1):
        self._init(num_samples, burn_in, eps, device, extras, process_group, flush_every, None)

    @classmethod
    def _with_local(cls, local: CartoState, num_samples: int, burn_in: int, eps, extras: bool, *, process_group=None,
                    flush_every: Optional[int] = 1) -> "ShardedCartoState":
        """A sharded state whose shard is ``local`` (already loaded: no second copy is allocated).
        Collective, like the constructor."""
        self = cls.__new__(cls)
        self._init(num_samples, burn_in, eps, local.device, extras, process_group, flush_every, local)
        return self

    def _init(self, num_samples, burn_in, eps, device, extras, process_group, flush_every,
              local: Optional[CartoState]) -> None:
        # CartoState's own checks and messages, on the meta device (no memory)
        template = CartoState(num_samples, burn_in, eps, device="meta", extras=extras)
        if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, (int, np.integer))
                                        or flush_every < 1):
            raise ValueError(f"flush_every must be an int >= 1 (recording calls between routings) or None (route at "
                             f"end_epoch only), got {flush_every!r}")
        world, rank = _dist.world_and_rank(process_group)
        N = template.num_samples
        if N < world:
            raise ValueError(f"num_samples = {N} is smaller than the world size {world}: every rank must own at least "
                             f"one id (for so few samples use a replicated gdc_ext.CartoState)")
        self.num_samples = N
        self.burn_in = template.burn_in
        self.extras = template.extras
        self.process_group = process_group
        self.world_size, self.rank = world, rank
        self.flush_every = None if flush_every is None else int(flush_every)
        self.start, self.stop = shard_bounds(N, world, rank)
        self._eps_arg = eps
        if local is None:
            local = CartoState(self.stop - self.start, burn_in, eps, device=device, extras=extras)
        elif local.num_samples != self.stop - self.start:
            raise ValueError(f"the shard holds {local.num_samples} samples but rank {rank} of {world} owns "
                             f"{self.stop - self.start} (ids [{self.start}, {self.stop}))")
        self.local = local
        if world > 1:
            # the shard folds alone: its CartoState must not all-reduce over the ranks in end_epoch
            self.local.process_group = _dist.singleton_group()
        self._lock = threading.RLock()
        self._pending: list = []   # (ids [m] int64, rows [m, C]) partial sums for other ranks' ids
        self._calls = 0            # recording calls since the last flush
        self._epoch_calls = 0      # recording calls since the last end_epoch
        self._recorded = False     # whether this rank recorded anything this epoch
        self._exchange(_OP_INIT, np.zeros(world, dtype=np.int64))

    # ----------------------------------------------------------------------------- basics
    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock every method and the fused kernels' recording hold (as
        :attr:`CartoState.lock`)."""
        return self._lock

    def _kernel_lock(self):
        return self._lock

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def eps(self) -> torch.Tensor:
        return self.local.eps

    @property
    def groups(self) -> int:
        """The statistic groups kept (as :attr:`CartoState.groups`): the kernels write these accumulator columns."""
        return self.local.groups

    @property
    def num_eps(self) -> int:
        return self.local.num_eps

    @property
    def epochs_done(self) -> int:
        return self.local.epochs_done

    @property
    def num_local(self) -> int:
        """Ids this rank owns (``stop - start``)."""
        return self.stop - self.start

    def owned_ids(self) -> torch.Tensor:
        """[stop - start] int64: the ids this rank owns, in local row order."""
        return torch.arange(self.start, self.stop, dtype=torch.int64)

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each id (int64 tensor of ids in [0, N))."""
        return owner_of(ids, self.num_samples, self.world_size)

    def nbytes(self) -> int:
        """Bytes held on this rank: the local shard's tensors plus the routed rows not yet flushed."""
        return self.local.nbytes() + sum(i.numel() * i.element_size() + r.numel() * r.element_size()
                                         for i, r in self._pending)

    def __repr__(self) -> str:
        return (f"ShardedCartoState(num_samples={self.num_samples}, burn_in={self.burn_in}, eps={self.eps.tolist()}, "
                f"device={self.device}, extras={self.extras}, rank={self.rank}/{self.world_size}, "
                f"ids=[{self.start}, {self.stop}), flush_every={self.flush_every})")

    def __getstate__(self):
        raise TypeError("a ShardedCartoState cannot be pickled or copied (it belongs to a process group): save it "
                        "with state.save(folder) or copy state.local")

    # ----------------------------------------------------------------------------- recording
    def record(self, losses: torch.Tensor, sample_ids: torch.Tensor,
               counts: Optional[Union[torch.Tensor, float]] = None) -> None:
        """:meth:`CartoState.record` on the sharded state: the same arguments, checks, messages and
        semantics (ids are global, in [0, N)); rows of other ranks' ids are routed to their owner.
        A recording call: collective when ``flush_every`` is an int (see the class)."""
        if not isinstance(sample_ids, torch.Tensor):
            try:
                sample_ids = torch.as_tensor(sample_ids)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}") from None
        with self._lock, self.local.lock:
            committed = False
            try:
                if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
                    # CartoState's own error for the ids' dtype, from a one-row scratch state
                    self._scratch(1).record(losses, sample_ids, counts)
                ids = sample_ids.detach().to(self.device, torch.int64)
                mapped, uniq, n_alloc = self._remap(ids, None)
                scratch = self._scratch(n_alloc)
                start = self._start_rows(uniq, n_alloc)
                scratch.acc.copy_(start)
                try:
                    scratch.record(losses, mapped.reshape(ids.shape), counts)
                except ValueError as e:
                    raise ValueError(self._global_bound(str(e), n_alloc)) from None
                self._commit(uniq, scratch.acc, start)
                committed = True
            finally:
                self._after_call(committed)

    def _scratch(self, rows: int) -> CartoState:
        """A CartoState of ``rows`` samples (this state's burn_in and eps) whose accumulator holds
        one call's rows: CartoState.record validates and adds exactly as it does into a full state."""
        return CartoState(rows, self.burn_in, self._eps_arg, device=self.device, extras=self.extras)

    @contextlib.contextmanager
    def _record_batch(self, ids: torch.Tensor, sample_weight: torch.Tensor, used: Optional[torch.Tensor]):
        """The fused kernels' recording (see :func:`gdc_ext._recording.recording_into`): yields
        (ids remapped to the call's distinct ids, the sample weights of those ids, the call's
        accumulator [U, C]); after the kernel added into it, owned rows are written back and the
        others routed. ``used``: [R] bool, the rows the kernel records (target != ignore_index)."""
        if torch.compiler.is_compiling():
            raise ArgumentError("a ShardedCartoState cannot record inside a torch.compile'd graph (its routing "
                                "depends on the ids' values): record outside the compiled region, or use a CartoState")
        with self._lock, self.local.lock:
            committed = False
            try:
                mapped, uniq, n_alloc = self._remap(ids, used)
                start = self._start_rows(uniq, n_alloc)
                acc = start.clone()
                sw = sample_weight
                if sample_weight.numel() > 0:
                    sw = torch.zeros(n_alloc, dtype=sample_weight.dtype, device=sample_weight.device)
                    sw[:uniq.numel()] = sample_weight[uniq]
                try:
                    yield mapped, sw, acc
                except ArgumentError as e:
                    raise ArgumentError(self._global_bound(str(e), n_alloc)) from None
                self._commit(uniq, acc, start)
                committed = True
            finally:
                self._after_call(committed)

    def _global_bound(self, message: str, n_alloc: int) -> str:
        """A range error of the call's accumulator of ``n_alloc`` rows, stated with N (the ids keep
        their values: only ids outside [0, N) are ever out of range there)."""
        return message.replace(f"sample id in [0, {n_alloc})", f"sample id in [0, {self.num_samples})")

    def _remap(self, ids: torch.Tensor, used: Optional[torch.Tensor]):
        """(ids mapped to rows of a per-call accumulator, the call's distinct in-range ids [U]
        (sorted), the accumulator's rows max(U, 1)). Ids outside [0, N) keep their value, so the
        kernel or CartoState.record rejects them as they would (a value >= N is >= U too)."""
        N = self.num_samples
        in_range = (ids >= 0) & (ids < N)
        inc = in_range if used is None else in_range & used.reshape(in_range.shape)
        uniq, inv = torch.unique(ids[inc], return_inverse=True)
        mapped = torch.where(in_range, torch.zeros_like(ids), ids)
        mapped[inc] = inv
        return mapped, uniq, max(int(uniq.numel()), 1)

    def _start_rows(self, uniq: torch.Tensor, n_alloc: int) -> torch.Tensor:
        """The call's accumulator before it records: owned ids continue their running sums (so the
        owner adds exactly as a single CartoState does), other ids start from zero."""
        acc = self.local.acc
        start = torch.zeros((n_alloc, acc.shape[1]), dtype=acc.dtype, device=acc.device)
        owned = (uniq >= self.start) & (uniq < self.stop)
        start[:uniq.numel()][owned] = acc[uniq[owned] - self.start]
        return start

    def _commit(self, uniq: torch.Tensor, acc: torch.Tensor, start: torch.Tensor) -> None:
        U = uniq.numel()
        acc = acc[:U]
        owned = (uniq >= self.start) & (uniq < self.stop)
        if bool(owned.any()):
            self.local.acc.index_copy_(0, uniq[owned] - self.start, acc[owned])
        remote = ~owned
        if bool(remote.any()):
            rows = acc[remote]
            touched = (rows != 0).any(1)  # ids of rows the call skipped (count 0) are not routed
            if bool(touched.any()):
                self._pending.append((uniq[remote][touched], rows[touched].clone()))
        if U and not self._recorded:
            self._recorded = bool((acc != start[:U]).any())

    def _after_call(self, committed: bool) -> None:
        """Counts a recording call (also a refused one: the ranks stay in step) and flushes when due."""
        self._epoch_calls += 1
        self._calls += 1
        if self.flush_every is not None and self._calls >= self.flush_every:
            self._flush(_OP_FLUSH)

    def flush(self) -> None:
        """Routes the pending rows of other ranks' ids to their owners now (a collective)."""
        with self._lock, self.local.lock:
            self._flush(_OP_FLUSH)

    # ----------------------------------------------------------------------------- routing
    def _flush(self, op: int) -> np.ndarray:
        """Header all-gather (agreement check) then, when any rank has rows, one all_to_all of the
        rows to their owners, which add them into their accumulators in rank order. Returns the
        gathered headers [W, H]."""
        acc = self.local.acc
        if self._pending:
            ids = torch.cat([i for i, _ in self._pending])
            rows = torch.cat([r for _, r in self._pending])
        else:
            ids = torch.zeros(0, dtype=torch.int64, device=acc.device)
            rows = torch.zeros((0, acc.shape[1]), dtype=acc.dtype, device=acc.device)
        W = self.world_size
        dest = self.owner(ids)
        order = torch.sort(dest, stable=True).indices
        ids, rows, dest = ids[order], rows[order], dest[order]
        send = torch.bincount(dest, minlength=W).cpu().numpy().astype(np.int64)
        heads = self._exchange(op, send)  # raises on every rank when they disagree: nothing changed
        table = heads[:, _COUNTS:_COUNTS + W]  # [source, destination] row counts
        if int(table.sum()) > 0:
            recv = table[:, self.rank]
            dev = _dist.comm_device(self.process_group)
            # one record per row: the id's 8 bytes, then the row's bytes
            packed = torch.cat([ids[:, None].contiguous().view(torch.uint8), rows.contiguous().view(torch.uint8)], 1)
            out = torch.empty((int(recv.sum()), packed.shape[1]), dtype=torch.uint8, device=dev)
            torch.distributed.all_to_all_single(out, packed.to(dev), [int(x) for x in recv], [int(x) for x in send],
                                                group=self.process_group)
            out = out.to(acc.device)
            got_ids = out[:, :8].contiguous().view(torch.int64).reshape(-1)
            got_rows = out[:, 8:].contiguous().view(acc.dtype)
            if got_ids.numel():
                if bool(((got_ids < self.start) | (got_ids >= self.stop)).any()):
                    raise RuntimeError("ShardedCartoState: received rows of ids this rank does not own (the ranks' "
                                       "shards differ)")
                acc.index_add_(0, got_ids - self.start, got_rows)
                self._recorded = True
        self._pending = []
        self._calls = 0
        return heads

    def _header(self, op: int, counts: np.ndarray) -> np.ndarray:
        eps = [float(e) for e in self.local.eps.tolist()]
        shown = [_f2i(e) for e in eps[:_EPS_SHOWN]] + [0] * (_EPS_SHOWN - min(len(eps), _EPS_SHOWN))
        head = [_MAGIC, op, self.num_samples, self.burn_in, int(self.extras), len(eps),
                _hash64(struct.pack(f"<{len(eps)}d", *eps)), self.epochs_done, self._epoch_calls, self.world_size,
                self.flush_every or 0, int(self._recorded)]
        return np.array(head + shown + [int(c) for c in counts], dtype=np.int64)

    def _exchange(self, op: int, counts: np.ndarray) -> np.ndarray:
        """All-gathers every rank's header and raises the same ValueError on every rank when they
        disagree (before any other collective of the call, so no rank waits or aborts)."""
        heads = _dist.all_gather(self._header(op, counts), self.process_group)
        problems = []
        ops = heads[:, _H["op"]].tolist()
        if any(int(m) != _MAGIC for m in heads[:, _H["magic"]].tolist()):
            problems.append("another collective was paired with this one (the ranks' calls are out of step)")
        elif len(set(ops)) > 1:
            problems.append("the ranks are in different calls (out of step): " + _by_value(
                [_OP_NAMES.get(int(o), str(o)) for o in ops]))
        for field, col in _CHECKS:
            if col == "eps":
                key = [(int(r[_H["num_eps"]]), int(r[_H["eps_hash"]])) for r in heads]
                shown = [_eps_repr(r) for r in heads]
            else:
                key = [int(r[_H[col]]) for r in heads]
                shown = [str(bool(v)) if col == "extras" else ("None" if col == "flush_every" and v == 0 else str(v))
                         for v in key]
            if len(set(key)) > 1:
                problems.append(f"{field} differs: " + _by_value(shown))
        if problems:
            raise ValueError("ShardedCartoState: the ranks disagree, nothing was changed: "
                             + " | ".join(problems) + ". Every rank must build the same ShardedCartoState (N, eps, "
                             "burn_in, extras, flush_every), restore the same checkpoint, and make the same recording "
                             "calls and end_epoch() calls.")
        return heads

    # ----------------------------------------------------------------------------- epochs
    def end_epoch(self) -> None:
        """Routes the pending rows, then folds this rank's shard (local: no tensor of the shard is
        communicated). Collective. Warns on every rank when no rank recorded anything this epoch."""
        with self._lock, self.local.lock:
            heads = self._flush(_OP_END_EPOCH)
            if not bool(heads[:, _H["recorded"]].any()):
                warnings.warn(f"ShardedCartoState.end_epoch: nothing was recorded in epoch {self.epochs_done + 1} on "
                              f"any rank (were sample_ids passed to the loss, or record() called?)", UserWarning,
                              stacklevel=2)
            with warnings.catch_warnings():
                # a shard may legitimately see none of its ids in an epoch; the check above is global
                warnings.filterwarnings("ignore", message=_NOTHING_RECORDED)
                self.local.end_epoch()
            self._epoch_calls = 0
            self._recorded = False

    def reset_epoch(self) -> None:
        """Drops what was recorded since the last end_epoch() on every rank (collective)."""
        with self._lock, self.local.lock:
            self._exchange(_OP_RESET, np.zeros(self.world_size, dtype=np.int64))
            self._pending = []
            self._calls = self._epoch_calls = 0
            self._recorded = False
            self.local.reset_epoch()

    # ----------------------------------------------------------------------------- scores
    def scores(self):
        """This rank's :class:`~gdc_ext.sharded_selection.ShardedScores`: the local
        :class:`~gdc_ext.Scores` of the owned ids plus what the distributed selections need."""
        from gdc_ext.sharded_selection import ShardedScores

        with self._lock:
            return ShardedScores(self.local.scores(), self.start, self.num_samples, self.process_group)

    # ----------------------------------------------------------------------------- persistence
    def _meta(self) -> dict:
        return {"format": "gdc_ext.ShardedCartoState", "version": 1, "num_samples": self.num_samples,
                "world_size": self.world_size, "rank": self.rank, "start": self.start, "stop": self.stop,
                "partition": "contiguous", "flush_every": self.flush_every}

    def _settle(self) -> None:
        """Flushes pending routed rows before the shard is read for saving (collective when rows
        can be pending: calls since the last flush, or flush_every=None)."""
        if self._calls > 0 or self.flush_every is None:
            self._flush(_OP_SAVE)

    def state_dict(self) -> dict:
        """``{"meta": ..., "local": self.local.state_dict()}`` for this rank's shard, after routing
        pending rows (see :meth:`_settle`). Restore with :meth:`load_state_dict` on the same rank of
        the same world size; :meth:`save` / :meth:`load` write and read sharded checkpoints that
        also reshard."""
        with self._lock, self.local.lock:
            self._settle()
            return {"meta": self._meta(), "local": self.local.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a :meth:`state_dict` of the same shard (N, world size, rank); ValueError and
        nothing changed otherwise (as :meth:`CartoState.load_state_dict`)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("meta"), dict) \
                or not isinstance(state_dict.get("local"), dict):
            raise ValueError("state_dict: expected a dict from ShardedCartoState.state_dict() with 'meta' and 'local'")
        meta, mine = state_dict["meta"], self._meta()
        for key in ("format", "num_samples", "world_size", "rank", "start", "stop", "partition"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"state_dict: {key} is {meta.get(key)!r} in the saved shard but {mine[key]!r} here "
                                 f"(a sharded checkpoint of another world size loads with ShardedCartoState.load)")
        with self._lock, self.local.lock:
            self.local.load_state_dict(state_dict["local"])
            self._pending = []
            self._calls = self._epoch_calls = 0
            self._recorded = False

    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Writes a sharded checkpoint (one file per rank plus an index; collective): see
        :func:`gdc_ext.sharded_checkpoint.save_sharded`."""
        from gdc_ext.sharded_checkpoint import save_sharded

        save_sharded(self, folder)

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", *, process_group=None,
             flush_every: Optional[int] = 1) -> "ShardedCartoState":
        """Reads a sharded checkpoint saved by any world size into this one (collective): see
        :func:`gdc_ext.sharded_checkpoint.load_sharded`."""
        from gdc_ext.sharded_checkpoint import load_sharded

        return load_sharded(folder, device=device, process_group=process_group, flush_every=flush_every)


def _by_value(shown: list) -> str:
    """'ranks 0, 2: a; rank 1: b' in the order of first appearance."""
    groups: dict = {}
    for rank, s in enumerate(shown):
        groups.setdefault(s, []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {s}" for s, r in groups.items())


def _eps_repr(row: np.ndarray) -> str:
    k = int(row[_H["num_eps"]])
    vals = [_i2f(int(x)) for x in row[len(_HEAD):len(_HEAD) + min(k, _EPS_SHOWN)]]
    return "[" + ", ".join(repr(v) for v in vals) + (", ...]" if k > _EPS_SHOWN else "]") + f" (K = {k})"
