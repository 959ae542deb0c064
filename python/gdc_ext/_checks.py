"""The argument checks ``F.cross_entropy`` makes, done in Python before any kernel runs, so
every path (fused kernel, torch fallback, with or without recording) rejects the same bad
arguments torch rejects, with a message naming the argument and an :class:`ArgumentError`
(both a ValueError and a RuntimeError, so a caller catching either type torch raises for that
argument keeps working). Shape and dtype checks only: nothing here reads tensor values (no host
synchronisation).

What torch raises, argument by argument (torch 2.13, matched by the type tests in
tests/test_argument_errors.py):

=====================================================  ============
bad argument                                            torch raises
=====================================================  ============
reduction not 'mean' / 'sum' / 'none'                   ValueError
label_smoothing > 1                                     RuntimeError
weight not 1-D with one value per class                 RuntimeError
weight not floating point                               RuntimeError
class-index target of the wrong batch size              ValueError
class-index target of the wrong shape otherwise         RuntimeError
  (but [B] for unbatched [V] input: ValueError)
class-index target neither int64 nor uint8              RuntimeError
uint8 class-index target of [B, V, d1, ...] input       RuntimeError
probability (float) target not of input's shape         RuntimeError
=====================================================  ============

``label_smoothing`` below 0 or NaN is refused too (torch accepts it and trains as if it were 0).
Class-probability targets are left to torch's own checks (the fallback calls it first).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from gdc_ext.ops import ArgumentError

__all__ = ["check_arguments", "check_class_weight", "check_reduction_and_smoothing", "checked_sample_weights",
           "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
_INDEX_DTYPES = (torch.int64, torch.uint8)


def check_arguments(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: str,
                    label_smoothing: float) -> None:
    """Raises :class:`ArgumentError` for the arguments ``F.cross_entropy`` rejects.

    input: [V], [B, V] or [B, V, d1, ..., dk] logits; target: class indices ([], [B] or
    [B, d1, ..., dk]) or class probabilities (the shape of ``input``); weight: [V] or None.
    Inputs torch rejects for other reasons (0-d or integer logits) are left to torch.
    """
    check_reduction_and_smoothing(reduction, label_smoothing)
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor) or input.dim() == 0:
        return
    check_class_weight(weight, input.shape[1] if input.dim() >= 2 else input.shape[0], input.device)
    if target.dtype.is_floating_point:
        # Class probabilities: torch checks the values (the fallback runs F.cross_entropy first);
        # the shape is checked here because torch's message for a mismatch depends on its version
        # (2.11: "expected scalar type Long but found Float") and does not name the argument.
        if target.shape != input.shape:
            raise ArgumentError(f"target: a floating-point target holds class probabilities and must have input's "
                                f"shape {tuple(input.shape)}, got {tuple(target.shape)} ({target.dtype}); class "
                                f"indices must be int64")
        return
    _check_index_target(input, target)


def check_reduction_and_smoothing(reduction: str, label_smoothing: float) -> None:
    """``reduction`` one of :data:`REDUCTIONS`, ``label_smoothing`` a number in [0, 1] (ArgumentError)."""
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or math.isnan(label_smoothing) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


def check_class_weight(weight: Optional[torch.Tensor], num_classes: int, device: torch.device) -> None:
    """The class ``weight`` (None, or a floating-point [num_classes] tensor on ``device``), as
    ``F.cross_entropy`` requires it (ArgumentError naming ``weight`` otherwise)."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ArgumentError(f"weight must be a 1-D tensor with one value per class ({num_classes}), got "
                            f"{_shape(weight)}")
    if not weight.dtype.is_floating_point:
        raise ArgumentError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != device:
        raise ArgumentError(f"weight is on {weight.device} but input is on {device}")


def checked_sample_weights(weights, state) -> Optional[torch.Tensor]:
    """Per-sample loss weights as the loss modules store them: a float32 contiguous [N] copy
    detached from autograd, or None (``weights`` None removes them).

    weights: [N] floating-point tensor (or anything ``torch.as_tensor`` takes), finite and >= 0,
    indexed by sample id; state: the module's CartoState or None (then N is not checked).
    The values are checked here, once, so the per-call check in the forward pass can stay
    shape-only (reading values synchronises with the device).
    """
    if weights is None:
        return None
    weights = torch.as_tensor(weights)
    if weights.dim() != 1 or not weights.dtype.is_floating_point:
        raise ArgumentError(f"sample weights must be a 1-D float tensor [N], got {tuple(weights.shape)} "
                            f"{weights.dtype}")
    if state is not None and weights.numel() != state.num_samples:
        raise ArgumentError(f"sample weights have {weights.numel()} entries but the state has "
                            f"N = {state.num_samples}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ArgumentError("sample weights must be finite and >= 0")
    return weights.detach().to(torch.float32).contiguous()


def _check_index_target(input: torch.Tensor, target: torch.Tensor) -> None:
    """Class-index targets: torch's nll_loss_nd rules, in its order (batch size first)."""
    if input.dim() == 1:
        if target.dim() > 1:
            raise ArgumentError(f"target must be 0-D (or [1]) for unbatched [V] input, got {tuple(target.shape)}")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ArgumentError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    else:
        tb = target.shape[0] if target.dim() else 0
        if input.shape[0] != tb:
            raise ArgumentError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({tb}).")
        expected = (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected:
            raise ArgumentError(f"Expected target size {list(expected)}, got {list(target.shape)}: target must hold "
                                f"one class index per row of input")
    if target.dtype not in _INDEX_DTYPES:
        raise ArgumentError(f"target must hold int64 (or uint8) class indices, got {target.dtype}")
    if target.dtype == torch.uint8 and input.dim() > 2:
        # torch's nll_loss2d path ("expected scalar type Long but found Byte") takes int64 only
        raise ArgumentError(f"target: uint8 class indices are accepted for [V] and [B, V] input only (as "
                            f"F.cross_entropy); [B, V, d1, ...] input {tuple(input.shape)} needs int64 targets")
    if target.device != input.device:
        raise ArgumentError(f"target is on {target.device} but input is on {input.device}")


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
