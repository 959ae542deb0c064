"""Sharded checkpoints of a :class:`~gdc_ext.ShardedCartoState`: one file per rank plus an index,
written and read by the ranks in parallel, loadable by any world size.

Layout of a checkpoint folder (on a file system every rank sees)::

    index.json                                        the index (JSON with its own sha256)
    shard-00000-of-00004-<save id>.safetensors        rank 0's shard: a CartoState file
    ...

Each shard file is the rank's local :class:`~gdc_ext.CartoState` written by
:meth:`CartoState.save` (atomic, versioned, sha256 over every byte; no pickle), so every check of
:meth:`CartoState.load` applies to it. The index names each shard's file, id range, size and the
configuration; its ``sha256`` covers the rest of the index. A save writes shards under a fresh
save id and replaces the index last (atomically, by rank 0, after every rank wrote its shard), so
a reader sees the old checkpoint or the new one, never a mix; the previous save's shards are
removed afterwards.

Loading into W' ranks: rank r' owns the balanced contiguous range of W' ranks and reads only the
shards overlapping it (at most ``ceil(W / W') + 1`` files; with W' = W, its own file alone, read
straight into the state it keeps). Contiguous ranges are what make this cheap: an ``id % W``
split would have every rank read every file.

Why not ``torch.distributed.checkpoint`` (DCP, FSDP2's format)? It fits the sharding (a [N, C]
DTensor with Shard(0) placement, resharded on load by reading the overlapping chunks) but not the
project's rules for saved state: its ``.metadata`` is a pickle (read by ``pickle.load``; a crafted
checkpoint runs code), its data files carry no checksum (a flipped byte loads silently), and a
save overwrites the folder's files in place (no atomic switch from the old checkpoint to the new
one). The format here gives the same parallel, resharding reads with CartoState's checked files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from typing import Optional, Union

import numpy as np
import torch

from gdc_ext import _dist
from gdc_ext._io import fsync_dir, write_atomic
from gdc_ext.sharded import ShardedCartoState, shard_bounds
from gdc_ext.state import CartoState

__all__ = ["INDEX_FILE", "save_sharded", "load_sharded", "read_index"]

INDEX_FILE = "index.json"
_FORMAT = "gdc_ext.ShardedCartoState.checkpoint"
_VERSION = 1
_SHARD_RE = re.compile(r"shard-\d{5}-of-\d{5}-[0-9a-f]{16}\.safetensors")


def _shard_name(rank: int, world: int, save_id: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}-{save_id:016x}.safetensors"


def _digest(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _eps_is_scalar(eps) -> bool:
    return not isinstance(eps, (list, tuple)) and not (isinstance(eps, (torch.Tensor, np.ndarray)) and eps.ndim > 0)


def save_sharded(state: ShardedCartoState, folder: Union[str, os.PathLike]) -> None:
    """Writes ``state`` as a sharded checkpoint into ``folder`` (created if needed; collective: every
    rank calls it). Pending routed rows are flushed first. Raises OSError on every rank when a rank
    could not write its shard (the previous checkpoint in ``folder`` stays readable)."""
    if not isinstance(state, ShardedCartoState):
        raise ValueError(f"state must be a gdc_ext.ShardedCartoState, got {type(state).__name__}")
    folder = os.fspath(folder)
    group, W, rank = state.process_group, state.world_size, state.rank
    with state.lock, state.local.lock:
        state._settle()
        # one save id for every rank (rank 0's), so the shards of this save are told from older ones
        save_id = int(_dist.all_gather(np.array([secrets.randbits(63)], dtype=np.int64), group)[0, 0])
        name = _shard_name(rank, W, save_id)
        error = None
        try:
            os.makedirs(folder, exist_ok=True)
            state.local.save(os.path.join(folder, name))
            size = os.path.getsize(os.path.join(folder, name))
        except OSError as e:
            error, size = e, -1
        rows = _dist.all_gather(np.array([state.start, state.stop, size, state.epochs_done], dtype=np.int64), group)
    failed = [r for r in range(W) if rows[r, 2] < 0]
    if failed:
        msg = f"save_sharded: rank(s) {failed} could not write their shard into {folder!r}; the checkpoint was not saved"
        raise OSError(msg) from error
    ok = 1
    if rank == 0:
        index = {"format": _FORMAT, "version": _VERSION, "save_id": f"{save_id:016x}", "num_samples": state.num_samples,
                 "burn_in": state.burn_in, "eps": [float(e) for e in state.eps.tolist()],
                 "eps_scalar": _eps_is_scalar(state._eps_arg), "extras": state.extras,
                 "epochs_done": int(rows[0, 3]), "world_size": W, "partition": "contiguous",
                 "shards": [{"file": _shard_name(r, W, save_id), "start": int(rows[r, 0]), "stop": int(rows[r, 1]),
                             "bytes": int(rows[r, 2])} for r in range(W)]}
        index["sha256"] = _digest(index)
        data = json.dumps(index, indent=1).encode()
        try:
            write_atomic(os.path.join(folder, INDEX_FILE), lambda tmp: _write_bytes(tmp, data), prefix=".gdc-index-")
            _remove_old_shards(folder, {s["file"] for s in index["shards"]})
        except OSError as e:
            error, ok = e, 0
    if not int(_dist.all_reduce(np.array([ok], dtype=np.int64), "min", group)[0]):
        raise OSError(f"save_sharded: rank 0 could not write the index of {folder!r}; the checkpoint was not "
                      f"saved") from error


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_old_shards(folder: str, keep: set) -> None:
    """Shard files of earlier saves (no longer named by the index) are removed."""
    for name in os.listdir(folder):
        if _SHARD_RE.fullmatch(name) and name not in keep:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
    fsync_dir(folder)


def read_index(folder: Union[str, os.PathLike]) -> dict:
    """The checked index of the checkpoint in ``folder``: FileNotFoundError when there is none,
    ValueError naming the file when it is damaged, foreign or inconsistent."""
    path = os.path.join(os.fspath(folder), INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_sharded: no sharded checkpoint in {os.fspath(folder)!r} (no {INDEX_FILE})")
    try:
        with open(path, "rb") as fh:
            index = json.loads(fh.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"load_sharded: {path!r} is not a sharded-checkpoint index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != _FORMAT:
        raise ValueError(f"load_sharded: {path!r} is not a gdc_ext sharded-checkpoint index")
    if index.get("version") != _VERSION:
        raise ValueError(f"load_sharded: {path!r} has format version {index.get('version')!r}; this gdc_ext reads "
                         f"version {_VERSION}")
    if index.get("sha256") != _digest(index):
        raise ValueError(f"load_sharded: {path!r} is damaged (its sha256 does not match its content)")
    shards = index.get("shards")
    N = index.get("num_samples")
    ok = isinstance(shards, list) and isinstance(N, int) and len(shards) == index.get("world_size") and shards
    if ok:
        edges = [0] + [s.get("stop") for s in shards]
        ok = all(isinstance(s.get("file"), str) and _SHARD_RE.fullmatch(s["file"]) and s.get("start") == edges[i]
                 and isinstance(s.get("stop"), int) and s["stop"] > s["start"] for i, s in enumerate(shards)) \
            and edges[-1] == N
    if not ok:
        raise ValueError(f"load_sharded: {path!r}: its shards do not cover the ids 0..N-1 in order")
    return index


def load_sharded(folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", *, process_group=None,
                 flush_every: Optional[int] = 1) -> ShardedCartoState:
    """Reads the sharded checkpoint in ``folder`` into a :class:`~gdc_ext.ShardedCartoState` over
    ``process_group`` (collective), whatever world size saved it: each rank reads the shards
    overlapping the ids it owns now. Every shard read is checked (CartoState.load's checks, its
    size, id range, configuration and epoch against the index); when any rank's read fails, every
    rank raises (the failing rank its own ValueError / FileNotFoundError, the others a ValueError
    naming it)."""
    folder = os.fspath(folder)
    index = read_index(folder)
    world, rank = _dist.world_and_rank(process_group)
    N = index["num_samples"]
    eps = index["eps"][0] if index["eps_scalar"] else index["eps"]
    error, local = None, None
    if N >= world:  # else the constructor below raises its ValueError on every rank
        start, stop = shard_bounds(N, world, rank)
        try:
            local = _read_range(folder, index, start, stop, eps, torch.device(device))
        except (OSError, ValueError) as e:
            error = e
    oks = _dist.all_gather(np.array([error is None], dtype=np.int64), process_group)[:, 0]
    if error is not None:
        raise error
    if not oks.all():
        raise ValueError(f"load_sharded: rank(s) {np.flatnonzero(oks == 0).tolist()} could not read their part of "
                         f"{folder!r} (see their error)")
    if local is None:
        return ShardedCartoState(N, index["burn_in"], eps, device, index["extras"], process_group=process_group,
                                 flush_every=flush_every)
    return ShardedCartoState._with_local(local, N, index["burn_in"], eps, index["extras"],
                                         process_group=process_group, flush_every=flush_every)


def _read_shard(folder: str, index: dict, shard: dict, eps, device: torch.device) -> CartoState:
    path = os.path.join(folder, shard["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_sharded: the shard {path!r} named by the index is missing")
    if os.path.getsize(path) != shard["bytes"]:
        raise ValueError(f"load_sharded: {path!r} has {os.path.getsize(path)} bytes, the index says {shard['bytes']}")
    part = CartoState.load(path, device=device)
    want = CartoState(shard["stop"] - shard["start"], index["burn_in"], eps, device="meta", extras=index["extras"])
    for key in ("num_samples", "burn_in", "extras"):
        if getattr(part, key) != getattr(want, key):
            raise ValueError(f"load_sharded: {path!r}: {key} is {getattr(part, key)!r}, the index says "
                             f"{getattr(want, key)!r}")
    if part.eps.tolist() != index["eps"] or part.epochs_done != index["epochs_done"]:
        raise ValueError(f"load_sharded: {path!r}: eps {part.eps.tolist()} / epochs {part.epochs_done}, the index "
                         f"says {index['eps']} / {index['epochs_done']}")
    return part


def _read_range(folder: str, index: dict, start: int, stop: int, eps, device: torch.device) -> CartoState:
    """The CartoState of ids [start, stop) from the shards overlapping them."""
    shards = [s for s in index["shards"] if s["start"] < stop and s["stop"] > start]
    if len(shards) == 1 and (shards[0]["start"], shards[0]["stop"]) == (start, stop):
        return _read_shard(folder, index, shards[0], eps, device)  # the same split: the file is the shard
    # resharding: the rows [start, stop) of each overlapping shard, read one shard at a time
    per_sample, keys = _per_sample_keys(index, eps)
    local = CartoState(stop - start, index["burn_in"], eps, device=device, extras=index["extras"])
    live = _live_tensors(local, keys)
    pieces, rest = [], {}
    for s in shards:
        part = _read_shard(folder, index, s, eps, device)
        src = _live_tensors(part, keys) if live is not None else part.state_dict()
        lo, hi = max(start, s["start"]) - s["start"], min(stop, s["stop"]) - s["start"]
        at = s["start"] + lo - start
        if live is not None:  # straight into the new shard's tensors: peak = it + one old shard
            for k in keys:
                if k in per_sample:
                    live[k][at:at + hi - lo].copy_(src[k][lo:hi])
                else:
                    live[k].copy_(src[k])
        else:
            pieces.append({k: src[k][lo:hi].clone() for k in per_sample})
            rest = {k: v for k, v in src.items() if k not in per_sample}
        del part, src
    if live is None:
        merged = {k: torch.cat([p[k] for p in pieces]) for k in per_sample}
        del pieces
        merged.update(rest)
        # the configuration entry of a state_dict of this many samples (from a one-sample state)
        merged["meta"] = dict(CartoState(1, index["burn_in"], eps, extras=index["extras"]).state_dict()["meta"],
                              num_samples=stop - start)
        local.load_state_dict(merged)
    return local


def _live_tensors(state: CartoState, keys: set) -> Optional[dict]:
    """The state's own tensors by their state_dict names (``CartoState.tensors()``), or None where
    they are not available that way (then resharding goes through state_dict / load_state_dict:
    about 3x the new shard at its peak instead of the shard plus one old shard)."""
    live = state.tensors() if callable(getattr(state, "tensors", None)) else None
    return live if isinstance(live, dict) and set(live) == keys else None


def _per_sample_keys(index: dict, eps) -> tuple[set, set]:
    """(the state_dict's tensors with one row per sample: those whose first dimension follows N,
    all its tensors), found on states of one and two samples, so a change of CartoState's layout
    needs no change here."""
    a = CartoState(1, index["burn_in"], eps, extras=index["extras"]).state_dict()
    b = CartoState(2, index["burn_in"], eps, extras=index["extras"]).state_dict()
    tensors = {k for k, v in a.items() if isinstance(v, torch.Tensor)}
    return {k for k in tensors if a[k].dim() and a[k].shape[0] != b[k].shape[0]}, tensors
