"""Under autocast CartoLoss returns F.cross_entropy's float32 loss (cross_entropy is a float32
op in autocast's policy); outside autocast, bf16/fp16 logits give a loss of their own dtype, as
in torch. Gradients keep the logits' dtype either way."""
import pytest
import torch
import torch.nn.functional as F

from gdc_ext import CartoLoss, CartoState, functional
from gdc_ext.layout import ACC_COUNT

REDUCTIONS = ["mean", "sum", "none"]


def _autocast(device, dtype):
    return torch.autocast(device, dtype=dtype)


def _pair(loss_fn, x, t, autocast, **kw):
    """(loss, grad) of loss_fn on a fresh leaf copy of x, the forward under ``autocast``."""
    x = x.clone().requires_grad_()
    with autocast:
        out = loss_fn(x, t, **kw)
    out.sum().backward()
    return out, x.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("recording", [False, True])
def test_dtype_matches_f_cross_entropy_under_autocast(device, reduction, ac_dtype, in_dtype, recording):
    if device == "cuda" and ac_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    torch.manual_seed(0)
    x = (torch.randn(12, 33) * 2).to(in_dtype).to(device)
    t = torch.randint(0, 33, (12,), device=device)
    state = CartoState(3, burn_in=1, device=device) if recording else None
    ids = torch.tensor([0, 1, 2], device=device) if recording else None
    o_ref, g_ref = _pair(lambda a, b: F.cross_entropy(a, b, reduction=reduction), x, t, _autocast(device, ac_dtype))
    o, g = _pair(CartoLoss(reduction=reduction, state=state), x, t, _autocast(device, ac_dtype), sample_ids=ids)
    assert o.dtype == o_ref.dtype, (o.dtype, o_ref.dtype)
    assert g.dtype == g_ref.dtype == in_dtype
    tol = dict(rtol=1e-2, atol=1e-2) if in_dtype in (torch.bfloat16, torch.float16) else {}
    torch.testing.assert_close(o.detach(), o_ref.detach(), **tol)
    torch.testing.assert_close(g.float(), g_ref.float(), **tol)
    if recording:
        assert state.acc[:, ACC_COUNT].sum().item() == 12


def test_model_under_cpu_bf16_autocast_returns_float32():
    """The issue's case: a model's bf16 logits (autocast) into CartoLoss give a float32 loss."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(8, 20)
    x = torch.randn(6, 8)
    t = torch.randint(0, 20, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        ours = CartoLoss()(logits, t)
        ref = torch.nn.CrossEntropyLoss()(logits, t)
    assert ours.dtype == ref.dtype == torch.float32
    ours.backward()
    assert lin.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outside_autocast_keeps_input_dtype(dtype):
    x = torch.randn(5, 9).to(dtype)
    t = torch.randint(0, 9, (5,))
    assert F.cross_entropy(x, t).dtype == dtype
    assert functional.cross_entropy(x, t).dtype == dtype
    assert functional.result_dtype(x) == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert functional.result_dtype(x) == torch.float32
        assert functional.result_dtype(x.double()) == torch.float64
