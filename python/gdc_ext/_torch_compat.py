"""What older torch releases lack, in one place.

``nn.LinearCrossEntropyLoss`` (and ``F.linear_cross_entropy``) arrived in torch 2.13. The package
supports older torch too (the lent GPU machines run 2.11), so :class:`CartoLinearCrossEntropyLoss`
derives from this module's :data:`LinearCrossEntropyLossBase`: torch's class where it exists, else
a stand-in with the same constructor, attributes (``linear``, ``num_classes``, ``out_features``,
``weight``, ``reduction``, ``ignore_index``, ``label_smoothing``, ``options``) and repr, so the
module is the same object to a user on either side of 2.13.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.loss import _WeightedLoss

__all__ = ["HAS_TORCH_LINEAR_CE", "LinearCrossEntropyLossBase"]

#: torch provides F.linear_cross_entropy / nn.LinearCrossEntropyLoss (torch >= 2.13).
HAS_TORCH_LINEAR_CE = hasattr(nn, "LinearCrossEntropyLoss") and hasattr(torch.nn.functional, "linear_cross_entropy")


class _LinearCrossEntropyLossStandIn(_WeightedLoss):
    """torch 2.13's ``nn.LinearCrossEntropyLoss`` constructor and repr, for torch < 2.13 (the
    subclass supplies ``forward``)."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        # The same checks and messages as torch 2.13, so code moving between versions sees one behaviour.
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)
        self.options = options

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes},"
                f" out_features={self.out_features}, bias={self.linear.bias is not None},"
                f" reduction={self.reduction}, ignore_index={self.ignore_index},"
                f" label_smoothing={self.label_smoothing}, options={self.options}")


LinearCrossEntropyLossBase: type[nn.Module] = getattr(nn, "LinearCrossEntropyLoss", _LinearCrossEntropyLossStandIn)
