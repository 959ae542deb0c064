"""Invalid arguments raise the exception TYPE nn.CrossEntropyLoss raises for the same input, with
and without a state; gdc_ext's own ArgumentError is both a ValueError and a RuntimeError, so
callers catching either (or gdc_ext's earlier ValueError) keep working."""
import pytest
import torch
from torch import nn

import gdc_ext
from gdc_ext import ArgumentError, CartoLoss, CartoState, functional

X2 = torch.randn(4, 6)
T2 = torch.randint(0, 6, (4,))
X3 = torch.randn(2, 6, 3)

# name -> (nn.CrossEntropyLoss kwargs, input, target)
BAD = {
    "weight of the wrong size": (dict(weight=torch.ones(5)), X2, T2),
    "weight 2-D": (dict(weight=torch.ones(6, 1)), X2, T2),
    "weight 0-D": (dict(weight=torch.tensor(1.0)), X2, T2),
    "weight not float": (dict(weight=torch.ones(6, dtype=torch.long)), X2, T2),
    "label_smoothing above 1": (dict(label_smoothing=1.5), X2, T2),
    "bad reduction": (dict(reduction="average"), X2, T2),
    "target batch size mismatch": ({}, X2, torch.zeros(5, dtype=torch.long)),
    "target 0-D for batched input": ({}, X2, torch.tensor(0)),
    "target 2-D for 2-D input": ({}, X2, torch.zeros(4, 2, dtype=torch.long)),
    "k-d target of the wrong shape": ({}, X3, torch.zeros(2, 4, dtype=torch.long)),
    "k-d target batch size mismatch": ({}, X3, torch.zeros(3, 3, dtype=torch.long)),
    "k-d target missing dims": ({}, X3, torch.zeros(2, dtype=torch.long)),
    "unbatched input, target of size 2": ({}, torch.randn(6), torch.tensor([1, 2])),
    "unbatched input, 2-D target": ({}, torch.randn(6), torch.tensor([[1]])),
    "int32 target": ({}, X2, torch.zeros(4, dtype=torch.int32)),
    "probability target of the wrong shape": ({}, X2, torch.rand(4, 5)),
    "probability target batch mismatch": ({}, X2, torch.rand(3, 6)),
    "probability target, weight of the wrong size": (dict(weight=torch.ones(5)), X2, torch.rand(4, 6)),
    "probability target, label_smoothing above 1": (dict(label_smoothing=2.0), X2, torch.rand(4, 6)),
}


def _torch_error(kw, x, t) -> type:
    with pytest.raises(Exception) as info:
        nn.CrossEntropyLoss(**kw)(x, t)
    return type(info.value)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("case", list(BAD))
def test_same_exception_type_as_nn_cross_entropy(case, with_state):
    kw, x, t = BAD[case]
    expected = _torch_error(kw, x, t)
    assert expected in (ValueError, RuntimeError), expected  # the table holds argument errors only
    state = CartoState(3, burn_in=1) if with_state else None
    rows = x.shape[0] if x.dim() > 1 else 1
    ids = torch.zeros(rows, dtype=torch.long) if with_state else None
    xg = x.clone().requires_grad_()
    with pytest.raises(expected):
        CartoLoss(**kw, state=state)(xg, t, ids)
    if with_state:
        assert not state.acc.any()  # nothing recorded by a refused call


@pytest.mark.parametrize("case", [c for c in BAD if not c.startswith("probability")])
def test_our_errors_are_argument_errors_naming_the_argument(case):
    kw, x, t = BAD[case]
    with pytest.raises(ArgumentError) as info:
        CartoLoss(**kw)(x, t)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    name = next(iter(kw), "target")
    assert name in str(info.value) or "batch_size" in str(info.value) or "target" in str(info.value)


def test_argument_error_is_exported_and_both_types():
    assert gdc_ext.ArgumentError is gdc_ext.ops.ArgumentError
    assert "ArgumentError" in gdc_ext.__all__
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, RuntimeError)


@pytest.mark.parametrize("smoothing", [-0.1, float("nan")])
def test_label_smoothing_below_zero_or_nan_is_refused(smoothing):
    """torch trains as if it were 0; refusing is the clear choice (documented in gdc_ext._checks)."""
    with pytest.raises(ArgumentError, match="label_smoothing"):
        CartoLoss(label_smoothing=smoothing)(X2, T2)


def test_kernel_checks_surface_as_argument_errors():
    """The kernels' own TORCH_CHECK_VALUE checks (here an out-of-range sample id) raise
    ArgumentError in eager mode, so they too are caught as ValueError or RuntimeError."""
    state = CartoState(3, burn_in=1)
    x = X2.clone().requires_grad_()
    with pytest.raises(ArgumentError, match="sample_ids"):
        functional.cross_entropy(x, T2, torch.tensor([0, 1, 2, 3]), state=state)
    with pytest.raises(ArgumentError, match="state"):
        functional.cross_entropy(x, T2, torch.tensor([0, 1, 2, 0]), state="not a state")


def test_weight_size_message_names_weight():
    with pytest.raises(RuntimeError, match="weight"):
        CartoLoss(weight=torch.ones(5))(X2, T2)
