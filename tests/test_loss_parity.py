"""CartoLoss returns nn.CrossEntropyLoss's values, gradients and exception types."""
import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import loss_and_grad as _grads
from hypothesis import example, given, strategies as st
from torch import nn

import gdc_ext
from gdc_ext import CartoLoss, CartoState
from gdc_ext.layout import ACC_COUNT, ACC_LOSS_SUM

REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction,use_weight,smoothing,ignore",
                         list(itertools.product(REDUCTIONS, [False, True], [0.0, 0.2], [False, True])))
def test_matches_cross_entropy_2d(reduction, use_weight, smoothing, ignore):
    torch.manual_seed(0)
    R, V = 37, 101  # V not a multiple of any chunk size
    x = torch.randn(R, V) * 3
    t = torch.randint(0, V, (R,))
    if ignore:
        t[::4] = -100
    w = torch.rand(V) + 0.1 if use_weight else None
    ref = nn.CrossEntropyLoss(weight=w, reduction=reduction, label_smoothing=smoothing)
    ours = CartoLoss(weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.manual_seed(1)
    o_ref, g_ref = _grads(ref, x, t)
    torch.manual_seed(1)
    o, g = _grads(ours, x, t)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, True])
def test_recording_does_not_change_loss_or_grad(reduction, inplace):
    torch.manual_seed(2)
    x = torch.randn(24, 64)
    t = torch.randint(0, 64, (24,))
    state = CartoState(6, burn_in=1, eps=0.5)
    o, g = _grads(CartoLoss(reduction=reduction, state=state, inplace_grad=inplace), x, t,
                  sample_ids=torch.arange(6))
    o_ref, g_ref = _grads(nn.CrossEntropyLoss(reduction=reduction), x, t)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert state.acc[:, ACC_COUNT].sum() == 24


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    torch.manual_seed(3)
    x = (torch.randn(32, 300) * 2).to(dtype)
    t = torch.randint(0, 300, (32,))
    o, g = _grads(CartoLoss(), x, t)
    xr = x.float().requires_grad_()
    ref = F.cross_entropy(xr, t)
    (ref * 1.7).backward()
    assert o.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(o.float(), ref.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g.float(), xr.grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_dimensional_and_unbatched_inputs(reduction):
    torch.manual_seed(4)
    x = torch.randn(3, 7, 4, 5)
    t = torch.randint(0, 7, (3, 4, 5))
    t[0, 1] = -100
    for xi, ti in [(x, t), (x[0, :, 0, 0], t[0, 0, 0]), (x[:, :, 0, 0], t[:, 0, 0])]:
        o_ref, g_ref = _grads(nn.CrossEntropyLoss(reduction=reduction), xi, ti)
        o, g = _grads(CartoLoss(reduction=reduction), xi, ti)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_and_float64_fall_back(reduction):
    torch.manual_seed(5)
    x = torch.randn(8, 10, dtype=torch.float64)
    p = torch.softmax(torch.randn(8, 10, dtype=torch.float64), -1)
    t = torch.randint(0, 10, (8,))
    for target in (p, t):
        o_ref, g_ref = _grads(nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1), x, target)
        o, g = _grads(CartoLoss(reduction=reduction, label_smoothing=0.1), x, target)
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(g, g_ref)


def test_constructor_positions_match_nn_cross_entropy():
    w = torch.rand(5)
    ours = CartoLoss(w, None, 3, None, "sum", 0.25)
    ref = nn.CrossEntropyLoss(w, None, 3, None, "sum", 0.25)
    assert isinstance(ours, nn.CrossEntropyLoss)
    assert ours.ignore_index == ref.ignore_index == 3 and ours.reduction == "sum" and ours.label_smoothing == 0.25
    assert torch.equal(ours.weight, ref.weight)
    # legacy size_average / reduce are honoured the same way
    assert CartoLoss(size_average=False).reduction == nn.CrossEntropyLoss(size_average=False).reduction


def test_all_rows_ignored_gives_nan_mean_and_zero_grad():
    x = torch.randn(4, 6)
    t = torch.full((4,), -100)
    o_ref, g_ref = _grads(nn.CrossEntropyLoss(), x, t)
    o, g = _grads(CartoLoss(), x, t)
    assert torch.isnan(o) and torch.isnan(o_ref)
    torch.testing.assert_close(g, g_ref, equal_nan=True)


def test_exception_types_match():
    x = torch.randn(4, 6)
    for bad_t, exc in [(torch.tensor([0, 1, 6, 2]), IndexError), (torch.tensor([0, 1, -3, 2]), IndexError),
                       (torch.zeros(5, dtype=torch.long), ValueError),
                       (torch.zeros(4, dtype=torch.int32), RuntimeError)]:
        with pytest.raises(exc):
            nn.CrossEntropyLoss()(x, bad_t)
        with pytest.raises(exc):
            CartoLoss()(x, bad_t)
    with pytest.raises(ValueError, match="target"):
        CartoLoss()(x, torch.tensor([0, 1, 6, 2]))  # also a ValueError naming the argument


def test_inplace_grad_overwrites_logits_and_matches():
    torch.manual_seed(6)
    x = torch.randn(16, 50)
    t = torch.randint(0, 50, (16,))
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    leaf = torch.randn(16, 50, requires_grad=True)
    logits = leaf * 1.0 + (x - leaf.detach())  # a non-leaf equal to x, like a model's output
    CartoLoss(inplace_grad=True)(logits, t).backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits.detach(), ref.grad, rtol=1e-4, atol=1e-6)


def test_sample_weights_scale_each_sample(device):
    torch.manual_seed(7)
    x = torch.randn(12, 20, device=device)
    t = torch.randint(0, 20, (12,), device=device)
    ids = torch.tensor([0, 1, 2], device=device)
    state = CartoState(3, burn_in=1, eps=0.5, device=device)
    lf = CartoLoss(state=state)
    lf.set_sample_weights(torch.tensor([1.0, 0.5, 0.0], device=device))
    o, g = _grads(lf, x, t, sample_ids=ids)
    rows_w = torch.tensor([1.0, 0.5, 0.0], device=device).repeat_interleave(4)
    xr = x.clone().requires_grad_()
    per = F.cross_entropy(xr, t, reduction="none")
    ref = (per * rows_w).sum() / 12
    (ref * 1.7).backward()
    torch.testing.assert_close(o, ref.detach())
    torch.testing.assert_close(g, xr.grad, rtol=1e-4, atol=1e-6)
    # recording stays the plain, unweighted NLL
    torch.testing.assert_close(state.acc[:, ACC_LOSS_SUM], per.detach().double().reshape(3, 4).sum(1),
                               rtol=1e-5, atol=1e-5)


def test_module_repr_and_public_api():
    state = CartoState(3, burn_in=1, eps=0.5)
    r = repr(CartoLoss(reduction="sum", state=state, inplace_grad=True))
    assert r.startswith("CartoLoss(") and f"state={state!r}" in r and "inplace_grad=True" in r
    assert "state=None" in repr(CartoLoss()) and "inplace_grad=False" in repr(CartoLoss())
    # every public name is importable and is the documented object, not a copy
    documented = {"CartoLoss": ("gdc_ext.loss", "CartoLoss"), "CartoState": ("gdc_ext.state", "CartoState"),
                  "Scores": ("gdc_ext.state", "Scores"), "TargetIndexError": ("gdc_ext.ops", "TargetIndexError"),
                  "ArgumentError": ("gdc_ext.ops", "ArgumentError"),
                  "expand_sample_ids": ("gdc_ext.functional", "expand_sample_ids"),
                  "prune": ("gdc_ext.cartography", "prune"), "quadrants": ("gdc_ext.cartography", "quadrants"),
                  "score_values": ("gdc_ext.cartography", "score_values"),
                  "selection_order": ("gdc_ext.cartography", "selection_order"),
                  "CartoSampler": ("gdc_ext.sampler", "CartoSampler"),
                  "Cartographer": ("gdc_ext.cartographer", "Cartographer")}
    for name, (module, attr) in documented.items():
        assert name in gdc_ext.__all__
        assert getattr(gdc_ext, name) is getattr(importlib.import_module(module), attr), name
    for name in ("functional", "ops", "reference"):
        assert getattr(gdc_ext, name) is importlib.import_module(f"gdc_ext.{name}")
    for name in gdc_ext.__all__:
        assert getattr(gdc_ext, name) is not None, name
    assert gdc_ext.functional.cross_entropy is importlib.import_module("gdc_ext.functional").cross_entropy
    with pytest.raises(AttributeError):
        gdc_ext.no_such_name  # noqa: B018


def test_second_backward_is_refused_not_wrong():
    x = torch.randn(6, 9, requires_grad=True)
    loss = CartoLoss()(x, torch.randint(0, 9, (6,))) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@given(R=st.integers(1, 40), V=st.integers(1, 700), reduction=st.sampled_from(REDUCTIONS),
       use_weight=st.booleans(), smoothing=st.sampled_from([0.0, 0.05, 0.5]), ignore_frac=st.floats(0, 1),
       ignore_index=st.sampled_from([-100, 0, 3]), scale=st.floats(0.1, 30), seed=st.integers(0, 10**6))
# drawn in ~1% of random runs, failing the former fixed atol of the gradient (see _grad_atol; issue 17)
@example(R=7, V=7, reduction="sum", use_weight=False, smoothing=0.0, ignore_frac=0.0, ignore_index=-100, scale=29.0,
         seed=0)
def test_parity_property(R, V, reduction, use_weight, smoothing, ignore_frac, ignore_index, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g) * scale
    t = torch.randint(0, V, (R,), generator=g)
    t[torch.rand(R, generator=g) < ignore_frac] = ignore_index
    w = torch.rand(V, generator=g) + 0.05 if use_weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing, ignore_index=ignore_index)
    o_ref, g_ref = _grads(nn.CrossEntropyLoss(**kw), x, t)
    o, gr = _grads(CartoLoss(**kw), x, t)
    torch.testing.assert_close(o, o_ref, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(gr, g_ref, rtol=1e-4, atol=_grad_atol(x, reduction), equal_nan=True)


def _grad_atol(x: torch.Tensor, reduction: str) -> float:
    """The kernel's float32 gradient error: it forms p = exp(x - lse) with lse rounded to float32,
    an error of up to |lse| * 2^-24 in the log domain, so up to p * (max |x| + log V) * 2^-24 in p
    (the target's p - 1 with p near 1 shows it in absolute terms: ~2.4e-6 at logits of 49, issue
    17), times the upstream gradient of helpers.loss_and_grad (1.7, or per-row normal draws for
    'none'; the class weight / 'mean' denominator only shrink it). 2e-6 below that, as before."""
    R, V = x.shape
    upstream = 1.7 if reduction != "none" else float(torch.randn(R, generator=torch.Generator().manual_seed(123))
                                                     .abs().max())
    return max(2e-6, 4 * 2.0 ** -24 * (float(x.abs().max()) + math.log(V)) * upstream)
