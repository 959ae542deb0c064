"""The functional cross-entropy with per-sample recording: everything :class:`gdc_ext.CartoLoss`
does, as one function.

The language-model case ([R, V] logits with [R] class indices, or any class-index input whose
class dimension can be moved last) runs in the fused kernel: one pass computes the loss and,
when a gradient is needed, writes it into one logits-sized buffer (or over the logits with
``inplace_grad=True``), so no log-probabilities are kept. Other inputs (class-probability
targets, float64 logits) fall back to torch's computation (:mod:`gdc_ext._fallback`) with the
same results.
"""
from __future__ import annotations

from typing import Optional

import torch

from gdc_ext import _fallback, ops
from gdc_ext._checks import check_arguments
from gdc_ext._recording import is_state, recording_into
from gdc_ext._reduction import mean_denominator, reduce_rows
from gdc_ext._rows import as_rows, expand_sample_ids
from gdc_ext.layout import ACC_COLS, CORE
from gdc_ext.state import CartoState

__all__ = ["cross_entropy", "expand_sample_ids"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, sample_ids: Optional[torch.Tensor] = None, *,
                  state: Optional[CartoState] = None, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  sample_weight: Optional[torch.Tensor] = None, inplace_grad: bool = False,
                  record: Optional[bool] = None) -> torch.Tensor:
    """``F.cross_entropy`` with fused kernels and per-sample recording.

    Args:
        input: logits as ``F.cross_entropy`` takes them: [V], [B, V] or [B, V, d1, ..., dk].
        target: class indices ([], [B] or [B, d1, ..., dk], int64; uint8 for [V] / [B, V] input, as
            torch accepts) or class probabilities
            (the shape of ``input``; torch fallback, no recording).
        sample_ids: integer ids in [0, N): one id per token (as many ids as target rows, in any
            shape: the shape of ``target``, or [B, L] with a flattened [B*L] target) or [B] (one
            id per sequence, the flattened rows being B equal groups). Ids of rows whose
            target is ``ignore_index`` are not used.
        state: the :class:`~gdc_ext.CartoState` to record into (None: no recording).
        weight, ignore_index, reduction, label_smoothing: as ``F.cross_entropy``.
        sample_weight: [N] float per-sample loss weights indexed by sample id (None: none); they
            multiply each token's training loss, while the 'mean' denominator stays that of
            ``F.cross_entropy`` (so a weight < 1 really lowers that sample's share).
        inplace_grad: write the gradient over ``input`` (zero extra memory; the logits are then
            no longer usable after the forward pass, and backward runs once). Safe when no other
            op saved the logits for backward; if one did (a z-loss computed first), its backward
            raises autograd's "modified by an inplace operation" error. Eager mode only: under
            torch.compile the gradient takes its own buffer (one-time warning), since a compiled
            graph cannot overwrite logits the model also returns.

        record: whether to record into ``state``. None (default): when a state and sample ids
            are given and grad mode is enabled (a training step). True: always, also under
            ``torch.no_grad()`` (scoring a held-out set into its own state); needs ``state`` and
            ``sample_ids``. False: never. (:class:`~gdc_ext.CartoLoss` passes None in training
            mode and False in eval mode.)

    What is recorded is the plain token NLL (no class weight, smoothing or sample weight), as
    docs/method.md defines. The fused gradient is computed in forward and is not differentiable:
    backward with ``create_graph=True`` raises (the torch fallback supports it).

    Returns: the loss, like ``F.cross_entropy`` (0-d, or the shape of ``target`` for 'none'),
    in ``F.cross_entropy``'s dtype: float32 under autocast (CPU or CUDA, as autocast's float32
    policy for cross_entropy gives), the dtype of ``input`` otherwise. The gradient has the
    dtype of ``input``.
    """
    check_arguments(input, target, weight, reduction, label_smoothing)
    if isinstance(target, torch.Tensor) and target.dtype == torch.uint8:
        # F.cross_entropy reads uint8 class indices as integers for [V] / [B, V] input (the only
        # inputs check_arguments lets them through with), ignore_index compared as an integer:
        # the int64 copy gives the same loss and takes the fused kernel, which records it.
        target = target.to(torch.int64)
    if state is not None and not is_state(state):
        raise ops.ArgumentError(f"state must be a gdc_ext.CartoState, a gdc_ext.ShardedCartoState or None, got "
                                f"{type(state).__name__}")
    wants = _wants_record(record, state, sample_ids)
    recording = wants and sample_ids is not None
    weighted = sample_weight is not None and sample_ids is not None
    if wants and sample_ids is None and sample_weight is not None:
        raise ops.ArgumentError("sample_ids is required: per-sample loss weights (sample_weight) are set")
    if weighted:
        _check_sample_weight(sample_weight, state)
    kw = dict(state=state, weight=weight, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing, sample_weight=sample_weight, recording=recording, weighted=weighted)
    if _kernel_applies(input, target):
        return _fused(input, target, sample_ids, inplace_grad=inplace_grad, **kw)
    return _fallback.cross_entropy(input, target, sample_ids, **kw)


def _wants_record(record: Optional[bool], state: Optional[CartoState], sample_ids) -> bool:
    """Whether this call is meant to record into ``state`` (the ``record`` argument resolved);
    recording then also needs sample ids (None: the caller decides what a missing id means)."""
    if record is None:
        return state is not None and torch.is_grad_enabled()
    if not isinstance(record, bool):
        raise ops.ArgumentError(f"record must be True, False or None, got {record!r}")
    if record and state is None:
        raise ops.ArgumentError("record=True needs a state to record into (state=CartoState(...))")
    if record and sample_ids is None:
        raise ops.ArgumentError("record=True needs sample_ids (one id per row or per sequence)")
    return record


def _check_sample_weight(sample_weight, state) -> None:
    """Shape and dtype only: the values (finite, >= 0) are checked once by
    CartoLoss.set_sample_weights, not on every call (that would synchronise with the device)."""
    if not isinstance(sample_weight, torch.Tensor) or sample_weight.dim() != 1 \
            or not sample_weight.dtype.is_floating_point:
        raise ops.ArgumentError(f"sample_weight must be a 1-D float tensor [N], got "
                         f"{getattr(sample_weight, 'shape', type(sample_weight).__name__)}")
    if state is not None and sample_weight.numel() != state.num_samples:
        raise ops.ArgumentError(f"sample_weight has {sample_weight.numel()} entries but the state has "
                         f"N = {state.num_samples}")


def _kernel_applies(input: torch.Tensor, target: torch.Tensor) -> bool:
    return (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
            and input.dtype in _KERNEL_DTYPES and target.dtype == torch.int64
            and input.dim() >= 1 and target.dim() == input.dim() - 1
            and input.device == target.device and (input.device.type == "cpu" or _has_cuda_kernels()))


def _fused(input, target, sample_ids, *, state, weight, ignore_index, reduction, label_smoothing, sample_weight,
           recording, weighted, inplace_grad):
    logits, tgt = as_rows(input, target)
    logits = logits.contiguous()
    tgt = tgt.contiguous()
    R, V = logits.shape
    dev = logits.device
    ids = expand_sample_ids(sample_ids, target, R) if (recording or weighted) else _empty(dev, torch.int64)
    sw = sample_weight.to(device=dev, dtype=torch.float32).contiguous() if weighted else _empty(dev, torch.float32)
    # only 'mean' divides by it (a reduction over the targets: skipped for 'sum' and 'none')
    denom = mean_denominator(tgt, tgt != ignore_index, weight, V, torch.float32) if reduction == "mean" else None
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    # the state's lock around the op that adds into its accumulator (threads sharing the state), forward
    # only; a sharded state hands over a per-call accumulator and remapped ids (gdc_ext._recording)
    with recording_into(state, recording, ids, sw, tgt, ignore_index) as (ids, sw, acc):
        groups = state.groups if recording else CORE
        if acc is None:
            acc = torch.empty((0, ACC_COLS), dtype=torch.float64, device=dev)
        if not needs_grad:
            loss_rows, _, _ = ops.cross_entropy_fwd(logits, tgt, weight, ids, sw, _ones(dev), acc, ignore_index,
                                                    label_smoothing, False, groups)
            out = reduce_rows(loss_rows, reduction, denom)
        else:
            grad_scale = _ones(dev) if denom is None else (1.0 / denom).reshape(1)
            out = ops._FusedCE.apply(logits, tgt, weight, ids, sw, grad_scale, acc, ignore_index, label_smoothing,
                                     reduction, _inplace_allowed(inplace_grad, logits), denom, groups)
    if reduction == "none":
        out = out.reshape(target.shape)
    return out.to(result_dtype(input))


# autocast's float32 policy casts these to float32 before cross_entropy (float64 is left alone)
_AUTOCAST_TO_FP32 = (torch.float16, torch.bfloat16, torch.float32)


def result_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype ``F.cross_entropy`` returns for ``input``: float32 under autocast on the input's
    device (cross_entropy is a float32 op in autocast's policy, on the CPU and on CUDA), the
    input's dtype otherwise (so bf16 logits outside autocast give a bf16 loss, as in torch). The
    kernel computes in float32 either way; gradients keep the logits' dtype."""
    if input.dtype in _AUTOCAST_TO_FP32 and torch.is_autocast_enabled(input.device.type):
        return torch.float32
    return input.dtype


def _inplace_allowed(inplace_grad: bool, logits: torch.Tensor) -> bool:
    """``inplace_grad`` in eager mode; under torch.compile the gradient takes its own buffer.

    A compiled graph cannot write the gradient over logits it also returns (a model returning
    its logits fails inside the compiler: "Node ... was invalid, but is output"), and whether the
    logits escape is not known while tracing; the in-place write also saves nothing once the
    graph is functionalized. So compiled graphs use the buffer mode (same loss, gradients and
    recording), with a one-time warning given while tracing (see ops.warn_while_tracing).
    """
    if not inplace_grad:
        return False
    if not torch.compiler.is_compiling():
        return True
    ops.warn_while_tracing(logits, COMPILED_INPLACE_WARNING)
    return False


COMPILED_INPLACE_WARNING = ("gdc_ext: inplace_grad=True is not supported under torch.compile; the compiled graph "
                            "computes the gradient in a separate logits-sized buffer instead (same loss, "
                            "gradients and recording; the logits are left intact)")


def _empty(dev, dtype):
    return torch.empty(0, dtype=dtype, device=dev)


def _ones(dev):
    return torch.ones(1, dtype=torch.float32, device=dev)


_CUDA_KERNELS: Optional[bool] = None


def _has_cuda_kernels() -> bool:
    """Whether the CUDA kernels were built (so CUDA tensors take the fused path)."""
    global _CUDA_KERNELS
    if _CUDA_KERNELS is None:
        _CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("gdc::cross_entropy_fwd", "CUDA")
    return _CUDA_KERNELS
