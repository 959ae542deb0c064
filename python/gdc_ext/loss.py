"""CartoLoss: a drop-in ``nn.CrossEntropyLoss`` that records per-sample training dynamics.

The language-model case ([R, V] logits with [R] class indices, or any class-index input whose
class dimension can be moved last) runs in the fused kernel: one pass computes the loss and,
when a gradient is needed, writes it into one logits-sized buffer (or over the logits with
``inplace_grad=True``), so no log-probabilities are kept. Other inputs (class-probability
targets, float64 logits) fall back to torch's computation with the same results.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gdc_ext import ops
from gdc_ext.state import CartoState

__all__ = ["CartoLoss", "expand_sample_ids"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EMPTY_ACC_SHAPE = (0, 3)


def expand_sample_ids(sample_ids: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row int64 sample ids [rows] from either per-token ids (same shape as ``target``) or
    per-sequence ids [B] where the rows are B equal consecutive groups."""
    if not isinstance(sample_ids, torch.Tensor):
        try:
            sample_ids = torch.as_tensor(sample_ids, device=target.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"sample_ids must be a tensor of integer ids, got {type(sample_ids).__name__}") from None
    if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if sample_ids.device != target.device:
        raise ValueError(f"sample_ids is on {sample_ids.device} but target is on {target.device}")
    if sample_ids.shape == target.shape:
        return sample_ids.reshape(-1).to(torch.int64).contiguous()
    if sample_ids.dim() == 1 and sample_ids.numel() > 0 and rows % sample_ids.numel() == 0:
        return sample_ids.to(torch.int64).repeat_interleave(rows // sample_ids.numel()).contiguous()
    raise ValueError(
        f"sample_ids must have the shape of target {tuple(target.shape)} (one id per token) or be 1-D with "
        f"one id per sequence dividing the {rows} rows into equal groups; got shape {tuple(sample_ids.shape)}")


class _FusedCE(torch.autograd.Function):
    """Autograd around the fused kernel: the gradient is computed in forward and only scaled by
    grad_output in backward (in place, skipped when grad_output is 1)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ids, sw, grad_scale, acc, ignore_index, smoothing, reduction,
                inplace, denom):
        if inplace:
            loss_rows, _ = ops.cross_entropy_fwd_inplace(logits, target, weight, ids, sw, grad_scale, acc,
                                                         ignore_index, smoothing)
            grad = logits
        else:
            loss_rows, _, grad = ops.cross_entropy_fwd(logits, target, weight, ids, sw, grad_scale, acc,
                                                       ignore_index, smoothing, True)
        ctx.save_for_backward(grad)
        return _reduce(loss_rows, reduction, denom)

    @staticmethod
    def backward(ctx, grad_out):
        # The gradient was computed in forward and is scaled in place here, so a second backward
        # over the same graph (retain_graph=True) would scale it twice: refuse it.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("CartoLoss: backward ran twice over one forward pass; the gradient is precomputed "
                               "and scaled in place, so call the loss again instead of retain_graph=True")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        ops.scale_grad_(grad, grad_out.to(torch.float32).contiguous())
        return grad, None, None, None, None, None, None, None, None, None, None, None


class CartoLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` with fused kernels and per-sample recording.

    Constructor: exactly ``nn.CrossEntropyLoss``'s arguments, plus keyword-only
        state: a :class:`CartoState` to record into (None: no recording).
        inplace_grad: write the gradient over the logits (zero extra memory; the logits tensor
            is then no longer usable after the forward pass, and backward runs once).

    ``forward(input, target, sample_ids=None)``: ``input``/``target`` as for
    ``nn.CrossEntropyLoss``; ``sample_ids`` either the shape of ``target`` (one id per token) or
    [B] (one id per sequence, the flattened rows being B equal groups). Recording happens when a
    state and sample ids are given and grad mode is enabled; what is recorded is the plain token
    NLL (no class weight, smoothing or sample weight), as shared/method.md defines.

    Per-sample loss weights (the down-weighting intervention) are set with
    :meth:`set_sample_weights` and multiply each token's training loss inside the kernel; the
    'mean' denominator stays that of ``nn.CrossEntropyLoss`` (so a weight < 1 really lowers that
    sample's share of the gradient).
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 state: Optional[CartoState] = None, inplace_grad: bool = False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        if state is not None and not isinstance(state, CartoState):
            raise ValueError(f"state must be a gdc_ext.CartoState or None, got {type(state).__name__}")
        self.state = state
        self.inplace_grad = bool(inplace_grad)
        self.sample_weight: Optional[torch.Tensor] = None

    def set_sample_weights(self, weights: Optional[torch.Tensor]) -> None:
        """Per-sample loss weights [N] (float), indexed by sample id; None removes them."""
        if weights is None:
            self.sample_weight = None
            return
        weights = torch.as_tensor(weights)
        if weights.dim() != 1 or not weights.dtype.is_floating_point:
            raise ValueError(f"sample weights must be a 1-D float tensor [N], got {tuple(weights.shape)} {weights.dtype}")
        if self.state is not None and weights.numel() != self.state.num_samples:
            raise ValueError(f"sample weights have {weights.numel()} entries but the state has "
                             f"N = {self.state.num_samples}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("sample weights must be finite and >= 0")
        self.sample_weight = weights.detach().to(torch.float32).contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, state={self.state!r}, inplace_grad={self.inplace_grad}".lstrip(", ")

    # ------------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor, sample_ids: Optional[torch.Tensor] = None):
        recording = self.state is not None and sample_ids is not None and torch.is_grad_enabled()
        weighted = self.sample_weight is not None and sample_ids is not None
        if sample_ids is None and self.sample_weight is not None and self.state is not None and torch.is_grad_enabled():
            raise ValueError("sample_ids is required: per-sample loss weights are set on this CartoLoss")
        if self._kernel_applies(input, target):
            return self._fused(input, target, sample_ids, recording, weighted)
        return self._fallback(input, target, sample_ids, recording, weighted)

    def _kernel_applies(self, input: torch.Tensor, target: torch.Tensor) -> bool:
        return (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
                and input.dtype in _KERNEL_DTYPES and target.dtype == torch.int64
                and input.dim() >= 1 and target.dim() == input.dim() - 1
                and input.device == target.device and (input.device.type == "cpu" or _has_cuda_kernels()))

    def _rows(self, input: torch.Tensor, target: torch.Tensor):
        """[R, V] logits and [R] targets: class dimension moved last, like nn.CrossEntropyLoss reads it."""
        if input.dim() == 1:
            return input.reshape(1, -1), target.reshape(1)
        if input.dim() == 2:
            if target.shape[0] != input.shape[0]:
                raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                                 f"({target.shape[0]}).")
            return input, target
        if input.shape[0] != target.shape[0] or input.shape[2:] != target.shape[1:]:
            raise ValueError(f"Expected target size {(input.shape[0],) + tuple(input.shape[2:])}, got "
                             f"{tuple(target.shape)}")
        return input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1)

    def _fused(self, input, target, sample_ids, recording, weighted):
        logits, tgt = self._rows(input, target)
        inplace = self.inplace_grad
        logits = logits.contiguous()
        tgt = tgt.contiguous()
        R, V = logits.shape
        dev = logits.device
        ids = expand_sample_ids(sample_ids, target, R) if (recording or weighted) else _empty(dev, torch.int64)
        acc = self.state.acc if recording else torch.empty(_EMPTY_ACC_SHAPE, dtype=torch.float64, device=dev)
        sw = self.sample_weight.to(dev) if weighted else _empty(dev, torch.float32)
        weight = self.weight
        denom = _mean_denominator(tgt, tgt != self.ignore_index, weight, V, torch.float32)
        needs_grad = torch.is_grad_enabled() and logits.requires_grad
        if not needs_grad:
            loss_rows, _, _ = ops.cross_entropy_fwd(logits, tgt, weight, ids, sw, _ones(dev), acc,
                                                    self.ignore_index, self.label_smoothing, False)
            out = _reduce(loss_rows, self.reduction, denom)
        else:
            grad_scale = (1.0 / denom).reshape(1) if self.reduction == "mean" else _ones(dev)
            out = _FusedCE.apply(logits, tgt, weight, ids, sw, grad_scale, acc, self.ignore_index,
                                 self.label_smoothing, self.reduction, inplace, denom)
        if self.reduction == "none":
            out = out.reshape(target.shape)
        return out.to(input.dtype)

    def _fallback(self, input, target, sample_ids, recording, weighted):
        """torch's own computation, for inputs the kernel does not take."""
        if not (recording or weighted):
            return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing)
        if target.dtype.is_floating_point:
            raise ValueError("target: recording or per-sample weights need class-index targets; "
                             "class-probability targets carry no single token to score")
        per = F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                              reduction="none", label_smoothing=self.label_smoothing)
        logits, tgt = self._rows(input, target)
        R = tgt.shape[0]
        ids = expand_sample_ids(sample_ids, target, R)
        valid = tgt != self.ignore_index
        N = self.state.num_samples if self.state is not None else self.sample_weight.numel()
        bad = valid & ((ids < 0) | (ids >= N))
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"sample_ids[{r}] = {int(ids[r])} is out of range: expected a sample id in [0, {N})")
        if recording:
            self._record_fallback(logits.detach(), tgt, ids, valid)
        flat = per.reshape(-1)
        if weighted:
            flat = flat * self.sample_weight.to(flat.device, flat.dtype)[ids.clamp(0, N - 1)] * valid
        denom = _mean_denominator(tgt, valid, self.weight, logits.shape[1], flat.dtype)
        return _reduce(flat, self.reduction, denom).reshape(per.shape if self.reduction == "none" else ())

    def _record_fallback(self, logits, tgt, ids, valid):
        logp = torch.log_softmax(logits.double(), dim=-1)
        t = tgt.clamp(0, logits.shape[1] - 1)
        nll = -logp.gather(1, t[:, None])[:, 0]
        p = logp.exp()
        energy = (p * p).sum(1) - 2 * p.gather(1, t[:, None])[:, 0] + 1
        if not bool(torch.isfinite(nll[valid]).all()):
            raise ValueError("input (logits) gives a non-finite loss: NaN or inf logits cannot be recorded; "
                             "the CartoState was left unchanged")
        acc = self.state.acc
        upd = torch.stack([nll.float().double(), torch.ones_like(nll), energy.float().double()], 1)[valid]
        acc.index_add_(0, ids[valid].to(acc.device), upd.to(acc.device))


def _empty(dev, dtype):
    return torch.empty(0, dtype=dtype, device=dev)


def _ones(dev):
    return torch.ones(1, dtype=torch.float32, device=dev)


def _mean_denominator(tgt, valid, weight, V, dtype):
    """nn.CrossEntropyLoss's 'mean' denominator: the class weights of the non-ignored targets
    summed (their count without weights). Computed on the device: no host synchronisation."""
    if weight is None:
        return valid.sum().to(dtype)
    return (weight.to(dtype).gather(0, tgt.clamp(0, max(V - 1, 0))) * valid).sum()


def _reduce(loss_rows, reduction, denom):
    if reduction == "mean":
        return loss_rows.sum() / denom
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows


_CUDA_KERNELS: Optional[bool] = None


def _has_cuda_kernels() -> bool:
    """Whether the CUDA kernels were built (so CUDA tensors take the fused path)."""
    global _CUDA_KERNELS
    if _CUDA_KERNELS is None:
        _CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("gdc::cross_entropy_fwd", "CUDA")
    return _CUDA_KERNELS
