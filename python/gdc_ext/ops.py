"""Python face of the `torch.ops.gdc` kernels: fake (meta) implementations for torch.compile,
and thin wrappers that translate argument conventions. No logic beyond that lives here.
"""
from __future__ import annotations

from typing import Optional

import torch

from gdc_ext import _C  # noqa: F401  (loads the kernels and their schemas)

__all__ = ["cross_entropy_fwd", "cross_entropy_fwd_inplace", "scale_grad_", "end_epoch_", "TargetIndexError"]


class TargetIndexError(IndexError, ValueError):
    """A target class index is out of range. An IndexError like torch's, and a ValueError."""


@torch.library.register_fake("gdc::cross_entropy_fwd")
def _ce_fwd_fake(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc, ignore_index,
                 label_smoothing, compute_grad):
    R = logits.shape[0]
    loss = logits.new_empty((R,), dtype=torch.float32)
    nll = logits.new_empty((R,), dtype=torch.float32)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty((0,))
    return loss, nll, grad


@torch.library.register_fake("gdc::cross_entropy_fwd_inplace")
def _ce_fwd_inplace_fake(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                         ignore_index, label_smoothing):
    R = logits.shape[0]
    return logits.new_empty((R,), dtype=torch.float32), logits.new_empty((R,), dtype=torch.float32)


@torch.library.register_fake("gdc::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


@torch.library.register_fake("gdc::end_epoch_")
def _end_epoch_fake(acc, fstats, istats, forgets, epoch, eps, burn_in):
    return None


def _call(op, *args):
    """Runs a cross-entropy op; in eager mode an out-of-range target surfaces as TargetIndexError
    (an IndexError like torch's, and a ValueError). Compiled graphs raise the plain IndexError."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except IndexError as e:
        raise TargetIndexError(str(e).split("\nException raised from")[0]) from None


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    sample_ids: torch.Tensor,
    sample_weight: torch.Tensor,
    grad_scale: torch.Tensor,
    acc: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused cross-entropy forward (and gradient) over rows of logits.

    Args:
        logits: [R, V] float32/bfloat16/float16, contiguous.
        target: [R] int64 class indices (``ignore_index`` rows are skipped).
        class_weight: optional [V] class weights.
        sample_ids: [R] int64 sample id per row, or an empty tensor.
        sample_weight: [N] float per-sample loss weights, or an empty tensor.
        grad_scale: one-element float tensor folded into the gradient (1/denominator for 'mean').
        acc: [N, 3] float64 epoch accumulator updated in place, or an empty tensor (no recording).
    Returns:
        loss_rows [R] float32, nll_rows [R] float32 (0 where ignored), grad [R, V] (or [0]).
    """
    return _call(torch.ops.gdc.cross_entropy_fwd, logits, target, class_weight, sample_ids, sample_weight, grad_scale,
                 acc, ignore_index, label_smoothing, compute_grad)


def cross_entropy_fwd_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    sample_ids: torch.Tensor,
    sample_weight: torch.Tensor,
    grad_scale: torch.Tensor,
    acc: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`cross_entropy_fwd` with the gradient written over ``logits``."""
    return _call(torch.ops.gdc.cross_entropy_fwd_inplace, logits, target, class_weight, sample_ids, sample_weight,
                 grad_scale, acc, ignore_index, label_smoothing)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place (scalar, or [R] per row); skipped when the scalar is 1."""
    torch.ops.gdc.scale_grad_(grad, grad_output)


def end_epoch_(acc, fstats, istats, forgets, epoch, eps, burn_in: int) -> None:
    """Folds the epoch accumulators into the per-sample statistics (see csrc/epoch_math.h)."""
    torch.ops.gdc.end_epoch_(acc, fstats, istats, forgets, epoch, eps, int(burn_in))
