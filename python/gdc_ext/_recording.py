"""Where a fused kernel call records: the one hook between the losses and the two kinds of state.

A :class:`~gdc_ext.CartoState` is recorded into directly (its ``acc`` under its lock); a
:class:`~gdc_ext.ShardedCartoState` hands the kernel a small accumulator of the call's distinct
ids and routes what it holds afterwards (see :mod:`gdc_ext.sharded`). The losses
(:mod:`gdc_ext.functional`, :mod:`gdc_ext.linear_cross_entropy`, the torch fallback) go through
:func:`recording_into` and never look at which kind they have.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from gdc_ext.sharded import ShardedCartoState
from gdc_ext.state import CartoState, recording_lock

__all__ = ["STATE_TYPES", "is_state", "recording_into"]

STATE_TYPES = (CartoState, ShardedCartoState)


def is_state(state) -> bool:
    """Whether ``state`` is something the losses can record into."""
    return isinstance(state, STATE_TYPES)


@contextlib.contextmanager
def recording_into(state, recording: bool, ids: torch.Tensor, sample_weight: torch.Tensor,
                   target: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None):
    """Yields ``(ids, sample_weight, acc)`` for one kernel call that adds into ``acc[ids[r]]`` its
    rows whose ``target`` is not ``ignore_index`` (target None: every row), with ``sample_weight``
    indexed by id: the state's own accumulator and the arguments unchanged for a
    CartoState (under its lock), a per-call accumulator with the ids remapped to it for a
    ShardedCartoState. ``acc`` is None when the call does not record. Nothing is added to the
    state if the body raises."""
    if not recording or state is None:
        yield ids, sample_weight, None
        return
    if isinstance(state, ShardedCartoState):
        used = None if target is None else target.reshape(-1) != ignore_index
        with state._record_batch(ids, sample_weight, used) as batch:
            yield batch
        return
    with recording_lock(state, True):
        yield ids, sample_weight, state.acc
