"""Shared by the sharded-state tests: a deterministic recorded stream, its single-process
reference, and a runner for gloo process groups of 1, 2 or 4 ranks (forked, file store, a
process-group timeout so a hang becomes an error) that records the size of every collective."""
from __future__ import annotations

import datetime
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gdc_ext
from gdc_ext import CartoLoss, CartoState, functional, linear_cross_entropy

N = 37            # not a multiple of 2 or 4: shards of different sizes
V = 7             # classes
H = 5             # hidden size of the linear + cross-entropy batches
L = 4             # rows per sequence
BURN_IN = 2
EPS = [0.5, 1.5]
BATCHES = 20      # per epoch; a multiple of every world size tested (1, 2, 4)
METHODS = 5       # CartoLoss, functional (no grad), linear_cross_entropy, record(), torch fallback (float64)
PG_TIMEOUT_S = 120


def stream(epoch: int, n: int = N, batches: int = BATCHES, seed: int = 0, split: bool = False) -> list:
    """The recording calls of one epoch. Each sample is in exactly one call (a permutation split
    into ``batches`` parts, as a DistributedSampler gives), unless ``split``: then every call
    holds rows of ids drawn at random, so a sample's rows are spread over calls (and ranks)."""
    rng = np.random.default_rng([seed, epoch])
    parts = np.array_split(rng.permutation(n), batches)
    out = []
    for b, ids in enumerate(parts):
        g = torch.Generator().manual_seed(seed * 100_000 + epoch * 1000 + b)
        B = len(ids)
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if split:
            ids = torch.randint(0, n, (B * L,), generator=g)  # one id per row
        logits = torch.randn(B * L, V, generator=g) * 2
        target = torch.randint(0, V, (B * L,), generator=g)
        target[::5] = -100
        hidden = torch.randn(B * L, H, generator=g)
        losses = torch.rand(B, generator=g) * 3
        counts = torch.randint(0, 4, (B,), generator=g).double()
        out.append(dict(ids=ids, logits=logits, target=target, hidden=hidden, losses=losses, counts=counts,
                        method=b % METHODS))
    return out


_HEAD = torch.Generator().manual_seed(123)
LM_HEAD = torch.randn(V, H, generator=_HEAD)


def record(state, batch: dict) -> None:
    """Records one call of the stream into ``state`` (a CartoState or a ShardedCartoState)."""
    ids, logits, target, m = batch["ids"], batch["logits"], batch["target"], batch["method"]
    if m == 0:
        x = logits.clone().requires_grad_()
        CartoLoss(state=state)(x, target, ids).backward()
    elif m == 1:
        with torch.no_grad():
            functional.cross_entropy(logits, target, ids, state=state, record=True, reduction="sum")
    elif m == 2:
        w = LM_HEAD.clone().requires_grad_()
        linear_cross_entropy(batch["hidden"], w, target, ids, state=state).backward()
    elif m == 3:
        if ids.numel() == batch["losses"].numel():
            state.record(batch["losses"], ids, counts=batch["counts"])
        else:  # per-row ids (split streams): one loss per row
            state.record(logits[:, 0].abs(), ids)
    else:
        x = logits.double().requires_grad_()  # float64 logits: the torch fallback records
        functional.cross_entropy(x, target, ids, state=state).backward()


def run_single(epochs: int, n: int = N, split: bool = False, seed: int = 0, snapshot_epoch: int = 1):
    """The single-process CartoState over the same stream: its state_dicts after each epoch, and
    one mid-epoch state_dict (before the ``snapshot_epoch``'s end_epoch)."""
    state = CartoState(n, BURN_IN, EPS)
    after, mid = [], None
    for e in range(epochs):
        for b in stream(e, n, seed=seed, split=split):
            record(state, b)
        if e == snapshot_epoch:
            mid = state.state_dict()
        state.end_epoch()
        after.append(state.state_dict())
    return state, after, mid


def run_sharded(state, rank: int, world: int, epochs: int, n: int = N, split: bool = False, seed: int = 0,
                snapshot_epoch: int = 1):
    """Rank ``rank`` records its calls of the stream (call ``step * world + rank`` of each step)."""
    after, mid = [], None
    for e in range(epochs):
        calls = stream(e, n, seed=seed, split=split)
        for step in range(len(calls) // world):
            record(state, calls[step * world + rank])
        if e == snapshot_epoch:
            mid = state.state_dict()["local"]
        state.end_epoch()
        after.append(state.state_dict()["local"])
    return after, mid


def shard_of(single: dict, start: int, stop: int, n: int = N) -> dict:
    """The rows [start, stop) of every per-sample tensor of a CartoState state_dict (the tensors
    whose first dimension is N), the others whole: what a shard's local state_dict must hold."""
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
            for k, v in single.items() if k != "meta"}


def assert_same_tensors(got: dict, want: dict, exact: bool = True) -> None:
    for k, v in want.items():
        g = got[k]
        if exact or not v.dtype.is_floating_point:
            assert torch.equal(g, v), (k, g, v)
        else:
            torch.testing.assert_close(g, v, rtol=1e-12, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------------------------------ runner
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "all_to_all", "broadcast",
                "reduce_scatter_tensor", "gather", "scatter", "reduce", "send", "recv")


COLLECTIVES: list = []  # (name, largest tensor's numel) of every collective of this rank, in order


def _watch_collectives(sizes: list) -> None:
    """Wraps torch.distributed's collectives to append (name, largest tensor's numel) per call."""
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            numels = [t.numel() for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, (list, tuple)):
                    numels += [t.numel() for t in a if isinstance(t, torch.Tensor)]
            sizes.append((_name, max(numels, default=0)))
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapped)


def _entry(rank, worker, world, store, out, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    sizes = COLLECTIVES
    _watch_collectives(sizes)
    try:
        result = worker(rank, world, *args)
    except Exception:  # reported by the test, with the rank
        result = {"crashed": traceback.format_exc()}
    result["collectives"] = sizes
    torch.save(result, os.path.join(out, f"w{world}_rank{rank}.pt"))
    dist.destroy_process_group()


def run_world(worker, world: int, out, *args) -> list:
    """Runs ``worker(rank, world, *args)`` (returning a dict) in ``world`` forked gloo processes;
    returns their dicts in rank order. A rank's exception fails with its traceback."""
    out = str(out)
    os.makedirs(out, exist_ok=True)
    store = os.path.join(out, f"store{world}")
    # fork, not spawn: the children skip re-importing torch (seconds on a loaded 2-core box)
    mp.start_processes(_entry, args=(worker, world, store, out, args), nprocs=world, join=True, start_method="fork")
    got = [torch.load(os.path.join(out, f"w{world}_rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, g in enumerate(got):
        assert "crashed" not in g, f"rank {r} of {world}:\n{g['crashed']}"
    return got


__all__ = ["gdc_ext"]  # keeps the import (the workers resolve gdc_ext lazily)
