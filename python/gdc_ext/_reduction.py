"""The 'mean' denominator and the reduction of per-row losses, shared by the fused path (and
its autograd Function) and the torch fallback, so both reduce exactly like
``nn.CrossEntropyLoss``."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["mean_denominator", "reduce_rows"]


def mean_denominator(target: torch.Tensor, valid: torch.Tensor, weight: Optional[torch.Tensor], num_classes: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """nn.CrossEntropyLoss's 'mean' denominator: the class weights of the non-ignored targets
    summed (their count without weights). Computed on the device: no host synchronisation.

    target: [R] int64; valid: [R] bool (target != ignore_index); weight: [V] or None.
    Returns a 0-d tensor of ``dtype``.
    """
    if weight is None:
        return valid.sum().to(dtype)
    return (weight.to(dtype).gather(0, target.clamp(0, max(num_classes - 1, 0))) * valid).sum()


def reduce_rows(loss_rows: torch.Tensor, reduction: str, denom: Optional[torch.Tensor]) -> torch.Tensor:
    """'mean' (sum / denom), 'sum' or 'none' over per-row losses [R]; ``denom`` (0-d, from
    :func:`mean_denominator`) is used, and needed, for 'mean' only."""
    if reduction == "mean":
        return loss_rows.sum() / denom
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows
