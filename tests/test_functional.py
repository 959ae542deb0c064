"""gdc_ext.functional.cross_entropy: the same numbers as CartoLoss (bit for bit) and as
F.cross_entropy, with and without recording, on the CPU and, where present, on CUDA."""
import pytest
import torch
import torch.nn.functional as F
from helpers import loss_and_grad

from gdc_ext import CartoLoss, CartoState, functional
from gdc_ext.layout import ACC_COUNT

REDUCTIONS = ["mean", "sum", "none"]
N = 5


def _inputs(device, ignore_index, R=23, V=41, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(R, V, generator=g) * 3).to(device)
    t = torch.randint(0, V, (R,), generator=g)
    t[::4] = ignore_index
    ids = torch.randint(0, N, (R,), generator=g)
    return x, t.to(device), ids.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("recording", [False, True])
def test_functional_equals_module_equals_torch(device, reduction, use_weight, ignore_index, smoothing, recording):
    x, t, ids = _inputs(device, ignore_index)
    w = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(1)).to(device) + 0.1 if use_weight else None
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    sf = CartoState(N, burn_in=1, eps=0.5, device=device) if recording else None
    sm = CartoState(N, burn_in=1, eps=0.5, device=device) if recording else None
    sid = ids if recording else None
    o_f, g_f = loss_and_grad(lambda a, b: functional.cross_entropy(a, b, sid, state=sf, **kw), x, t)
    o_m, g_m = loss_and_grad(CartoLoss(**kw, state=sm), x, t, sample_ids=sid)
    o_r, g_r = loss_and_grad(lambda a, b: F.cross_entropy(a, b, **kw), x, t)
    assert torch.equal(o_f, o_m) and torch.equal(g_f, g_m)  # the module only forwards
    torch.testing.assert_close(o_f, o_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-6)
    if recording:
        assert torch.equal(sf.acc, sm.acc)
        valid = (t != ignore_index).cpu()
        counts = torch.bincount(ids.cpu()[valid], minlength=N).double()
        assert torch.equal(sf.acc[:, ACC_COUNT].cpu(), counts)


def test_recording_rule(device):
    """Records exactly when a state and sample ids are given and grad mode is on."""
    x, t, ids = _inputs(device, -100)
    state = CartoState(N, burn_in=1, eps=0.5, device=device)
    functional.cross_entropy(x.requires_grad_(), t, None, state=state).backward()
    functional.cross_entropy(x, t, ids).backward()
    with torch.no_grad():
        functional.cross_entropy(x, t, ids, state=state)
    assert not state.acc.any()
    functional.cross_entropy(x, t, ids, state=state)  # grad mode on, no backward needed
    assert state.acc[:, ACC_COUNT].sum().item() == (t != -100).sum().item()


def test_inplace_grad_and_sample_weight(device):
    x, t, ids = _inputs(device, -100)
    sw = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], device=device)
    o, g = loss_and_grad(lambda a, b: functional.cross_entropy(a, b, ids, sample_weight=sw), x, t)
    xr = x.clone().requires_grad_()
    per = F.cross_entropy(xr, t, reduction="none")
    ref = (per * sw[ids]).sum() / (t != -100).sum()
    (ref * 1.7).backward()
    torch.testing.assert_close(o, ref.detach())
    torch.testing.assert_close(g, xr.grad, rtol=1e-4, atol=1e-6)
    leaf = torch.zeros_like(x, requires_grad=True)
    logits = leaf + x
    functional.cross_entropy(logits, t, ids, sample_weight=sw, inplace_grad=True).backward()
    torch.testing.assert_close(leaf.grad, xr.grad / 1.7, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits.detach(), leaf.grad)  # the gradient was written over the logits


def test_k_dimensional_and_fallback_inputs():
    torch.manual_seed(4)
    x = torch.randn(3, 7, 4)
    t = torch.randint(0, 7, (3, 4))
    ids = torch.tensor([0, 1, 2])
    for xi in (x, x.double()):  # float64 takes the torch fallback
        state = CartoState(3, burn_in=1, eps=0.5)
        for reduction in REDUCTIONS:
            o, g = loss_and_grad(functional.cross_entropy, xi, t, sample_ids=ids, state=state, reduction=reduction)
            o_r, g_r = loss_and_grad(F.cross_entropy, xi, t, reduction=reduction)
            torch.testing.assert_close(o, o_r)
            torch.testing.assert_close(g, g_r)
        assert state.acc[:, ACC_COUNT].tolist() == [3 * 4.0] * 3


def test_bad_arguments_name_the_argument():
    x, t, ids = _inputs("cpu", -100)
    with pytest.raises(ValueError, match="state"):
        functional.cross_entropy(x, t, ids, state="not a state")
    with pytest.raises(ValueError, match="reduction"):
        functional.cross_entropy(x, t, reduction="average")
    with pytest.raises(ValueError, match="sample_weight"):
        functional.cross_entropy(x, t, ids, state=CartoState(N, burn_in=1), sample_weight=torch.ones(N + 1))
    with pytest.raises(ValueError, match="sample_weight"):
        functional.cross_entropy(x, t, ids, sample_weight=torch.ones(N, 1))
    with pytest.raises(ValueError, match="sample_ids"):
        functional.cross_entropy(x.requires_grad_(), t, state=CartoState(N, burn_in=1), sample_weight=torch.ones(N))
