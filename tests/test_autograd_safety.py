"""Autograd safety of the fused Functions (issue 17, items 4 and 5).

4. ``inplace_grad=True`` writes the gradient over the logits in forward. Another op that saved
   the logits for backward (a z-loss computed first) used to get the overwritten values without
   an error; the version counter is now bumped, so autograd raises its standard error. The
   common case (the logits feed only the loss) keeps working, without a second buffer.
5. ``create_graph=True`` used to return a gradient without the second-order terms through the
   loss (the fused gradient is a constant to autograd); it now raises an error naming the
   limitation. The torch fallback (float64 logits) keeps supporting double backward.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from gdc_ext import CartoLinearCrossEntropyLoss, CartoLoss, CartoState, functional, linear_cross_entropy

INPLACE_ERROR = "modified by an inplace operation"
DOUBLE_BACKWARD_ERROR = r"double backward is not supported.*create_graph=True"


def _z_loss_then_ce(ce, x, w, t):
    """A PaLM-style z-loss computed from the logits before the cross-entropy: logsumexp saves
    the logits for its backward."""
    logits = x @ w.T
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return ce(logits, t) + 1e-1 * z


def _data(seed=0, rows=8, hidden=16, classes=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).requires_grad_()
    w = torch.randn(classes, hidden, generator=g).requires_grad_()
    t = torch.randint(0, classes, (rows,), generator=g)
    return x, w, t


# ------------------------------------------------------------------------ 4: inplace_grad
@pytest.mark.parametrize("make_ce", [
    lambda: (lambda lg, t: functional.cross_entropy(lg, t, inplace_grad=True)),
    lambda: CartoLoss(inplace_grad=True),
    lambda: CartoLoss(inplace_grad=True, state=CartoState(8, burn_in=1), reduction="sum"),
], ids=["functional", "CartoLoss", "CartoLoss-sum-state"])
def test_inplace_grad_raises_when_another_op_saved_the_logits(make_ce):
    x, w, t = _data()
    ce = make_ce()
    if isinstance(ce, CartoLoss) and ce.state is not None:
        ce = (lambda fn: lambda lg, tt: fn(lg, tt, torch.arange(8)))(ce)
    loss = _z_loss_then_ce(ce, x, w, t)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_inplace_grad_raises_for_3d_logits_saved_by_another_op():
    """[B, L, V] logits are flattened to a view: bumping the view bumps the logits' counter."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (2, 5), generator=g)
    logits = h @ w.T
    z = logits.pow(2).sum()  # pow saves its input: the [B, L, V] logits
    loss = CartoLoss(inplace_grad=True)(logits.reshape(-1, 11), t.reshape(-1)) + 1e-3 * z
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_without_inplace_grad_the_z_loss_gradient_is_exact():
    x, w, t = _data()
    ref = torch.autograd.grad(_z_loss_then_ce(F.cross_entropy, x, w, t), (x, w))
    got = torch.autograd.grad(_z_loss_then_ce(CartoLoss(), x, w, t), (x, w))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inplace_grad_bumps_the_version_of_the_logits():
    x, w, t = _data()
    logits = x @ w.T
    before = logits._version
    loss = CartoLoss(inplace_grad=True)(logits, t)
    assert logits._version > before
    loss.backward()  # our own saved gradient is at the bumped version: no error


class _TinyLM(nn.Module):
    def __init__(self, vocab=30, hidden=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, 6),
       reduction=st.sampled_from(["mean", "sum"]))
def test_inplace_grad_common_case_needs_no_buffer_and_matches(seed, batch, length, reduction):
    """model -> logits -> CartoLoss: no error, torch's gradients, and the gradient handed to the
    model is the logits' own storage (no logits-sized buffer)."""
    grads = []
    for inplace in (True, False):
        torch.manual_seed(seed)
        model = _TinyLM()
        tokens = torch.randint(0, 30, (batch, length + 1))
        state = CartoState(batch, burn_in=1)
        logits = model(tokens[:, :-1])
        flat = logits.reshape(-1, 30)
        seen = []
        flat.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        loss_fn = CartoLoss(inplace_grad=inplace, state=state, reduction=reduction)
        loss_fn(flat, tokens[:, 1:].reshape(-1), torch.arange(batch)).backward()
        if inplace:
            assert seen == [flat.data_ptr()]
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.manual_seed(seed)
    model = _TinyLM()
    tokens = torch.randint(0, 30, (batch, length + 1))
    F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 30), tokens[:, 1:].reshape(-1), reduction=reduction).backward()
    for inplace_g, buffer_g, p in zip(grads[0], grads[1], model.parameters()):
        torch.testing.assert_close(inplace_g, buffer_g)
        torch.testing.assert_close(inplace_g, p.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- 5: double backward
def _fused_losses():
    return {
        "functional": lambda x, w, t: functional.cross_entropy(x @ w.T, t),
        "CartoLoss-inplace": lambda x, w, t: CartoLoss(inplace_grad=True)(x @ w.T, t),
        "CartoLoss-none": lambda x, w, t: CartoLoss(reduction="none")(x @ w.T, t).sum(),
        "linear-mean": lambda x, w, t: linear_cross_entropy(x, w, t),
        "linear-sum": lambda x, w, t: linear_cross_entropy(x, w, t, reduction="sum"),
        "linear-none": lambda x, w, t: linear_cross_entropy(x, w, t, reduction="none").sum(),
    }


@pytest.mark.parametrize("name", list(_fused_losses()))
def test_create_graph_raises_naming_the_limitation(name):
    x, w, t = _data()
    loss = _fused_losses()[name](x, w, t)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        torch.autograd.grad(loss, x, create_graph=True)
    # the refusal consumed nothing: the same graph still gives the first-order gradient
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad(_reference(name, x2, w.detach(), t), x2)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


def _reference(name, x, w, t):
    reduction = "sum" if name.endswith("sum") or name.endswith("none") else "mean"
    return F.cross_entropy(x @ w.T, t, reduction=reduction)


def test_gradient_penalty_raises_instead_of_a_wrong_value():
    """The user's pattern: loss + ||d loss / d x|| (WGAN-GP style)."""
    x, w, t = _data()
    loss = CartoLoss()(x @ w.T, t)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + g.norm()).backward()


def test_linear_module_create_graph_raises():
    torch.manual_seed(3)
    mod = CartoLinearCrossEntropyLoss(16, 20)
    x = torch.randn(8, 16, requires_grad=True)
    loss = mod(x, torch.randint(0, 20, (8,)))
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        torch.autograd.grad(loss, mod.linear.weight, create_graph=True)


def test_float64_fallback_supports_double_backward():
    """float64 logits go through torch's own cross_entropy: second-order gradients are exact."""
    x, w, t = _data()
    x, w = x.detach().double().requires_grad_(), w.detach().double()
    results = []
    for ce in (F.cross_entropy, CartoLoss()):
        x.grad = None
        loss = ce(x @ w.T, t)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + g.norm()).backward()
        results.append(x.grad.clone())
    torch.testing.assert_close(results[1], results[0])
