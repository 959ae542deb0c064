"""Fused linear + cross-entropy with per-sample recording: ``F.linear_cross_entropy`` (and
``nn.LinearCrossEntropyLoss``) whose [rows x vocabulary] logits are never materialised.

The rows are processed in chunks by one op (``gdc::linear_cross_entropy_fwd``): each chunk's
logits go into one reusable buffer, the fused cross-entropy kernel turns them into the loss,
the recorded NLL and the logit gradient in place, and the chunk's gradients for the input, the
weight and the bias are accumulated with matmuls before the next chunk. The gradients are
computed in forward and only scaled in backward (as :class:`gdc_ext.CartoLoss` does), so the
step's extra memory is one chunk of logits plus the gradients themselves.

What is recorded, and when, is exactly :func:`gdc_ext.functional.cross_entropy`'s rule (and the
module's is :class:`gdc_ext.CartoLoss`'s): the plain token NLL of each non-ignored row, when a
state and sample ids are given and grad mode is enabled (``record=`` overrides it), and for the
module only in training mode.
"""
from __future__ import annotations

from typing import Optional

import torch

from gdc_ext import ops
from gdc_ext._recording import is_state, recording_into
from gdc_ext._checks import check_class_weight, check_reduction_and_smoothing, checked_sample_weights
from gdc_ext._reduction import mean_denominator, reduce_rows
from gdc_ext._rows import expand_sample_ids
from gdc_ext._torch_compat import LinearCrossEntropyLossBase
from gdc_ext.functional import _check_sample_weight, _wants_record
from gdc_ext.layout import ACC_COLS, CORE
from gdc_ext.loss import no_ids_warning, warn_no_ids_once
from gdc_ext.ops import ArgumentError
from gdc_ext.state import CartoState

__all__ = ["linear_cross_entropy", "CartoLinearCrossEntropyLoss"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                         sample_ids: Optional[torch.Tensor] = None, *, linear_bias: Optional[torch.Tensor] = None,
                         weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         ignore_index: Optional[int] = -100, label_smoothing: float = 0.0,
                         state: Optional[CartoState] = None, sample_weight: Optional[torch.Tensor] = None,
                         chunk_size: Optional[int] = None, record: Optional[bool] = None) -> torch.Tensor:
    """``F.cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without the logits,
    recording per-sample training dynamics.

    Args:
        input: [..., H] hidden states (float32, bfloat16, float16 or float64); the leading
            dimensions are flattened into R rows.
        linear_weight: [V, H] output projection, the dtype and device of ``input``.
        target: [...] int64 (or uint8, as torch) class indices, ``input.shape[:-1]`` (``ignore_index`` rows skipped).
        sample_ids: integer ids in [0, N): the shape of ``target`` (one id per token) or [B]
            (one id per sequence, the R rows being B equal consecutive groups).
        linear_bias: optional [V] bias of the projection.
        weight, reduction, ignore_index, label_smoothing: as ``F.cross_entropy`` (the 'mean'
            denominator is nn.CrossEntropyLoss's; ``ignore_index=None`` means -100, as in
            ``F.linear_cross_entropy``).
        state: the :class:`~gdc_ext.CartoState` to record into (None: no recording).
        sample_weight: [N] float per-sample loss weights indexed by sample id (None: none).
        chunk_size: rows per chunk (None: chosen from the shapes; a chunk's logits take at most
            max(64 MiB, min(V H, R V / 4) elements) on the CPU, where the matmuls need large
            chunks, and max(64 MiB, input bytes / 8) on CUDA, where memory is the scarce
            resource; see csrc/linear_cross_entropy.cpp).
        record: whether to record into ``state``, as in :func:`gdc_ext.functional.cross_entropy`.
            None (default): when a state and sample ids are given and grad mode is enabled. True:
            always, also under ``torch.no_grad()``; needs ``state`` and ``sample_ids``. False:
            never. (:class:`CartoLinearCrossEntropyLoss` passes None in training mode and False in
            eval mode.)

    Returns: the loss (0-d, or the shape of ``target`` for 'none') in the dtype of ``input``
    (under autocast: the matmul runs in the autocast dtype and the loss is float32, as for
    ``F.linear`` + ``F.cross_entropy``).

    For reduction='none' the backward pass runs the chunk loop once more (a per-row upstream
    gradient cannot be folded into a precomputed weight gradient). Backward runs once per
    forward (the gradients are scaled in place), and not with ``create_graph=True`` (the
    precomputed gradients are not differentiable: it raises).
    """
    if state is not None and not is_state(state):
        raise ArgumentError(f"state must be a gdc_ext.CartoState, a gdc_ext.ShardedCartoState or None, got "
                            f"{type(state).__name__}")
    check_reduction_and_smoothing(reduction, label_smoothing)
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    _check_shapes(input, linear_weight, target, linear_bias)
    target = target.to(torch.int64)  # uint8 class indices read as integers, as torch reads them
    # before anything indexes it (the 'mean' denominator gathers the class weights by target)
    check_class_weight(weight, linear_weight.shape[0], input.device)
    _check_chunk_size(chunk_size)
    wants = _wants_record(record, state, sample_ids)
    recording = wants and sample_ids is not None
    weighted = sample_weight is not None and sample_ids is not None
    if wants and sample_ids is None and sample_weight is not None:
        raise ArgumentError("sample_ids is required: per-sample loss weights (sample_weight) are set")
    if weighted:
        _check_sample_weight(sample_weight, state)

    out_dtype = input.dtype
    if torch.is_autocast_enabled(input.device.type):
        # As under autocast F.linear computes the logits in the autocast dtype and F.cross_entropy
        # returns float32: cast the matmul operands (differentiably) and return float32.
        ac = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(ac), linear_weight.to(ac)
        linear_bias = None if linear_bias is None else linear_bias.to(ac)
        out_dtype = torch.float32
    H = input.shape[-1]
    x = input.reshape(-1, H)
    tgt = target.reshape(-1).contiguous()
    R, V, dev = x.shape[0], linear_weight.shape[0], input.device
    ids = expand_sample_ids(sample_ids, target, R) if (recording or weighted) else _empty(dev, torch.int64)
    sw = sample_weight.to(device=dev, dtype=torch.float32).contiguous() if weighted else _empty(dev, torch.float32)
    # only 'mean' divides by it (a reduction over the targets: skipped for 'sum' and 'none')
    denom = mean_denominator(tgt, tgt != ignore_index, weight, V, torch.float32) if reduction == "mean" else None
    chunk = 0 if chunk_size is None else int(chunk_size)
    # Which gradients the op computes (input, weight, bias): a frozen LM head (LoRA fine-tuning)
    # skips the weight gradient's matmuls and its [V, H] buffer.
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                  for t in (x, linear_weight, linear_bias))
    # the state's lock around the op that adds into its accumulator (threads sharing the state), forward
    # only; a sharded state hands over a per-call accumulator and remapped ids (gdc_ext._recording)
    with recording_into(state, recording, ids, sw, tgt, ignore_index) as (ids, sw, acc):
        groups = state.groups if recording else CORE
        if acc is None:
            acc = torch.empty((0, ACC_COLS), dtype=torch.float64, device=dev)
        if not any(needs):
            loss_rows, _, _, _, _ = ops.linear_cross_entropy_fwd(x, linear_weight, linear_bias, tgt, weight, ids, sw,
                                                                 _ones(dev), acc, ignore_index, label_smoothing,
                                                                 chunk, False, groups=groups)
            out = reduce_rows(loss_rows, reduction, denom)
        else:
            grad_scale = _ones(dev) if denom is None else (1.0 / denom).reshape(1)
            out = ops._FusedLinearCE.apply(x, linear_weight, linear_bias, tgt, weight, ids, sw, grad_scale, acc,
                                           ignore_index, label_smoothing, reduction, chunk, denom, needs, groups)
    if reduction == "none":
        out = out.reshape(target.shape)
    return out.to(out_dtype)


def _check_shapes(input, linear_weight, target, linear_bias) -> None:
    """The checks that must precede flattening (the op checks the rest, naming each argument);
    ArgumentError, like every argument check of the package."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{name} must be a tensor, got {type(t).__name__}")
    if input.dim() < 1:
        raise ArgumentError("input must have a last (hidden) dimension: [..., H], got a 0-d tensor")
    if input.dtype not in _DTYPES:
        raise ArgumentError(f"input must be float32, bfloat16, float16 or float64, got {input.dtype}")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ArgumentError(f"linear_weight must be 2-D [classes, hidden] with hidden = {input.shape[-1]} (the input's "
                         f"last dimension), got {tuple(linear_weight.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):  # F.linear_cross_entropy accepts uint8 too
        raise ArgumentError(f"target must hold int64 (or uint8) class indices, got {target.dtype} (class-probability "
                         f"targets are not supported by the fused path)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ArgumentError(f"target must have the shape of input without its last dimension "
                         f"{tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    if target.device != input.device:
        raise ArgumentError(f"target is on {target.device} but input is on {input.device}")
    if linear_bias is not None and not isinstance(linear_bias, torch.Tensor):
        raise ArgumentError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def _empty(dev, dtype):
    return torch.empty(0, dtype=dtype, device=dev)


def _ones(dev):
    return torch.ones(1, dtype=torch.float32, device=dev)


class CartoLinearCrossEntropyLoss(LinearCrossEntropyLossBase):
    """``nn.LinearCrossEntropyLoss`` on :func:`linear_cross_entropy`: the logits are never
    materialised, and per-sample dynamics are recorded into ``state``.

    Constructor: ``nn.LinearCrossEntropyLoss``'s arguments (the module owns ``self.linear``, an
    ``nn.Linear(in_features, num_classes)``; on torch < 2.13, which lacks that class, the base is a
    stand-in with the same constructor and attributes), plus keyword-only
        state: a :class:`CartoState` to record into (None: no recording).
        chunk_size: rows per chunk (None: automatic; see :func:`linear_cross_entropy`).
    ``options`` (a ``LinearCrossEntropyOptions``) is accepted for drop-in use: this path always
    chunks, and ``options.batch_chunk_size`` is used as ``chunk_size`` when that is None; its other
    fields do not apply. K-dimensional losses (``out_features != ()``) are not supported.

    ``forward(input [..., in_features], target [...], sample_ids=None)``. Recording follows
    :class:`gdc_ext.CartoLoss`: in training mode with grad enabled, when a state and sample ids
    are given (a state but no ids in a training step warns once); never in eval mode. Per-sample
    loss weights are set with :meth:`set_sample_weights`, as for :class:`gdc_ext.CartoLoss`.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[torch.Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 state: Optional[CartoState] = None, chunk_size: Optional[int] = None):
        if tuple(out_features) != ():
            raise ArgumentError(f"out_features must be () (K-dimensional losses are not supported by the fused path), "
                             f"got {out_features}")
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                         reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        if state is not None and not is_state(state):
            raise ArgumentError(f"state must be a gdc_ext.CartoState, a gdc_ext.ShardedCartoState or None, got "
                                f"{type(state).__name__}")
        if chunk_size is None and options is not None:
            chunk_size = getattr(options, "batch_chunk_size", None)
        _check_chunk_size(chunk_size)
        self.state = state
        self.chunk_size = chunk_size
        self.sample_weight: Optional[torch.Tensor] = None
        self._warned_no_ids = False

    def set_sample_weights(self, weights: Optional[torch.Tensor]) -> None:
        """Per-sample loss weights [N] (float, finite, >= 0), indexed by sample id; None removes them."""
        self.sample_weight = checked_sample_weights(weights, self.state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, state={self.state!r}, chunk_size={self.chunk_size}"

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                sample_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of ``nn.LinearCrossEntropyLoss``; records into the state in training mode with
        grad enabled when ``sample_ids`` are given (a state but no ids while training warns once)."""
        if self.training and self.state is not None and sample_ids is None and torch.is_grad_enabled():
            warn_no_ids_once(self, input, NO_IDS_WARNING)
        return linear_cross_entropy(input, self.linear.weight, target, sample_ids, linear_bias=self.linear.bias,
                                    weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, state=self.state,
                                    sample_weight=self.sample_weight, chunk_size=self.chunk_size,
                                    record=None if self.training else False)


NO_IDS_WARNING = no_ids_warning("CartoLinearCrossEntropyLoss")
