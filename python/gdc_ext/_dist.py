"""The few torch.distributed collectives the sharded state and its selections use, on NumPy
arrays: every one moves O(world size), O(batch) or O(k) values, never one per sample.

torch.distributed is the transport (gloo on CPU, NCCL on CUDA); with it uninitialised, or a
group of one rank, every function here is the identity and no collective is made, so the
single-process case runs the same code.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["world_and_rank", "comm_device", "all_reduce", "all_gather", "all_gather_varlen", "singleton_group"]


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_and_rank(group=None) -> tuple[int, int]:
    """(world size, this process's rank) in ``group`` (None: the default group); (1, 0) when
    torch.distributed is not initialised."""
    if not _initialised():
        return 1, 0
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def comm_device(group=None) -> torch.device:
    """Where the collectives' tensors must live: the current CUDA device for NCCL, else the CPU."""
    if _initialised() and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: np.ndarray, op: str = "sum", group=None) -> np.ndarray:
    """Element-wise ``op`` ("sum", "max", "min") of ``values`` (int64 or float64, any shape) over the
    ranks; a new array."""
    a = np.ascontiguousarray(values)
    if world_and_rank(group)[0] == 1:
        return a.copy()
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    t = torch.from_numpy(a.copy()).to(comm_device(group))
    torch.distributed.all_reduce(t, op=ops[op], group=group)
    return t.cpu().numpy()


def all_gather(values: np.ndarray, group=None) -> np.ndarray:
    """[W, *values.shape]: every rank's ``values`` (same shape and dtype on every rank), in rank order."""
    a = np.ascontiguousarray(values)
    world = world_and_rank(group)[0]
    if world == 1:
        return a[None].copy()
    t = torch.from_numpy(a.copy()).to(comm_device(group))
    out = torch.empty((world * t.numel(),), dtype=t.dtype, device=t.device)
    torch.distributed.all_gather_into_tensor(out, t.reshape(-1), group=group)
    return out.cpu().numpy().reshape((world,) + a.shape)


def all_gather_varlen(values: np.ndarray, group=None) -> list:
    """Every rank's 1-D ``values`` (same dtype, any length), as a list in rank order: the lengths
    first (one int per rank), then the values padded to the longest. For O(k) results only."""
    a = np.ascontiguousarray(values).reshape(-1)
    world = world_and_rank(group)[0]
    if world == 1:
        return [a.copy()]
    sizes = all_gather(np.array([a.size], dtype=np.int64), group)[:, 0]
    width = int(sizes.max())
    padded = np.zeros(width, dtype=a.dtype)
    padded[:a.size] = a
    rows = all_gather(padded, group)
    return [rows[r, :int(sizes[r])].copy() for r in range(world)]


_SINGLETONS: dict = {}


def singleton_group() -> Optional[object]:
    """A process group holding only this process, for a CartoState that must not all-reduce in
    ``end_epoch`` (a shard's local state). Made with local synchronisation (no other rank takes
    part) and cached per default group."""
    dist = torch.distributed
    key = (id(dist.group.WORLD), dist.get_rank())
    group = _SINGLETONS.get(key)
    if group is not None:
        try:  # a group of a destroyed default group (whose id was reused) is not valid any more
            if dist.get_world_size(group) != 1:
                group = None
        except (RuntimeError, ValueError):
            group = None
    if group is None:
        group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        _SINGLETONS.clear()  # a group of an earlier (destroyed) default group is not reused
        _SINGLETONS[key] = group
    return group
