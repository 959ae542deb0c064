"""CartoLoss: a drop-in ``nn.CrossEntropyLoss`` that records per-sample training dynamics.

A thin module over :func:`gdc_ext.functional.cross_entropy`: it holds the configuration (the
``nn.CrossEntropyLoss`` arguments, the state, the per-sample loss weights) and forwards.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from gdc_ext import functional, ops
from gdc_ext._checks import checked_sample_weights
from gdc_ext._recording import is_state
from gdc_ext.functional import expand_sample_ids
from gdc_ext.ops import ArgumentError
from gdc_ext.state import CartoState

__all__ = ["CartoLoss", "expand_sample_ids"]


class CartoLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` with fused kernels and per-sample recording.

    Constructor: exactly ``nn.CrossEntropyLoss``'s arguments, plus keyword-only
        state: a :class:`CartoState` to record into (None: no recording).
        inplace_grad: write the gradient over the logits (zero extra memory; the logits tensor
            is then no longer usable after the forward pass, and backward runs once). Safe when no
            other op saved the logits for backward (else autograd raises "modified by an inplace
            operation"). Eager mode only: under torch.compile the gradient takes its own buffer
            (one-time warning).

    ``forward(input, target, sample_ids=None)``: ``input``/``target`` as for
    ``nn.CrossEntropyLoss``; ``sample_ids`` either one id per token (as many ids as target rows,
    any shape: the shape of ``target``, or [B, L] with a flattened [B*L] target) or [B] (one id
    per sequence, the flattened rows being B equal groups).

    Recording is explicit: it happens in training mode (``loss_fn.train()``, the default; a
    CartoLoss that is a submodule of the model follows ``model.train()`` / ``model.eval()``)
    with grad enabled, when a state and sample ids are given. In eval mode or under
    ``torch.no_grad()`` nothing is recorded, and sample ids may be left out. A state but no ids
    in a training step warns once per loss object. To score a held-out set into a separate
    state without training, call ``gdc_ext.functional.cross_entropy(..., state=heldout,
    record=True)`` (works under ``torch.no_grad()``). What is recorded is the plain token NLL
    (no class weight, smoothing or sample weight), as docs/method.md defines. See
    :func:`gdc_ext.functional.cross_entropy`, which does the work.

    Per-sample loss weights (the down-weighting intervention) are set with
    :meth:`set_sample_weights` and multiply each token's training loss inside the kernel; the
    'mean' denominator stays that of ``nn.CrossEntropyLoss`` (so a weight < 1 really lowers that
    sample's share of the gradient).
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 state: Optional[CartoState] = None, inplace_grad: bool = False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        if state is not None and not is_state(state):
            raise ArgumentError(f"state must be a gdc_ext.CartoState, a gdc_ext.ShardedCartoState or None, got "
                                f"{type(state).__name__}")
        self.state = state
        self.inplace_grad = bool(inplace_grad)
        self.sample_weight: Optional[torch.Tensor] = None
        self._warned_no_ids = False

    def set_sample_weights(self, weights: Optional[torch.Tensor]) -> None:
        """Per-sample loss weights [N] (float, finite, >= 0), indexed by sample id; None removes them."""
        self.sample_weight = checked_sample_weights(weights, self.state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, state={self.state!r}, inplace_grad={self.inplace_grad}".lstrip(", ")

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                sample_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of ``nn.CrossEntropyLoss``; records into the state in training mode with grad
        enabled when ``sample_ids`` are given (a state but no ids while training warns once)."""
        if self.training and self.state is not None and sample_ids is None and torch.is_grad_enabled():
            self._warn_no_ids(input)
        return functional.cross_entropy(input, target, sample_ids, state=self.state, weight=self.weight,
                                        ignore_index=self.ignore_index, reduction=self.reduction,
                                        label_smoothing=self.label_smoothing, sample_weight=self.sample_weight,
                                        inplace_grad=self.inplace_grad, record=None if self.training else False)

    def _warn_no_ids(self, input: torch.Tensor) -> None:
        warn_no_ids_once(self, input, NO_IDS_WARNING)


def warn_no_ids_once(module: nn.Module, input: torch.Tensor, message: str) -> None:
    """The "a state but no ids in a training step" warning of a recording loss module: once per
    module (its ``_warned_no_ids`` flag), under torch.compile once per process, while tracing.
    ``input``: any tensor of the call (the traced warning needs one)."""
    if torch.compiler.is_compiling():
        ops.warn_while_tracing(input, message)
    elif not module._warned_no_ids:
        module._warned_no_ids = True
        warnings.warn(message, UserWarning, stacklevel=4)


def no_ids_warning(name: str) -> str:
    """The no-ids warning of the loss module class ``name``."""
    return (f"gdc_ext.{name} has a CartoState but was called without sample_ids in training mode: nothing is "
            f"recorded. Pass sample_ids (one per row or per sequence), or call loss_fn.eval() (or the model's "
            f".eval()) for passes that should not record.")


NO_IDS_WARNING = no_ids_warning("CartoLoss")
