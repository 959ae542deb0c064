"""inplace_grad=True under torch.compile of a model that also returns its logits: compiling used
to fail inside the compiler ("Node ... was invalid, but is output"). Compiled graphs now use the
gradient buffer (warning once while tracing) and give eager's loss, gradients, recording and
logits."""
import warnings

import torch
from torch import nn

from gdc_ext import CartoLoss, CartoState, ops

V, N = 40, 6


class LossAndLogits(nn.Module):
    """A tiny LM whose forward returns (loss, logits), as Hugging Face models do."""

    def __init__(self, loss_fn):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)
        self.loss_fn = loss_fn

    def forward(self, x, y, ids):
        logits = self.head(torch.tanh(self.emb(x))).reshape(-1, V)
        return self.loss_fn(logits, y.reshape(-1), ids), logits


def _step(compiled: bool, inplace: bool, device: str):
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (4, 9)).to(device)
    ids = torch.tensor([1, 5, 2, 0], device=device)
    state = CartoState(N, burn_in=1, device=device)
    model = LossAndLogits(CartoLoss(state=state, inplace_grad=inplace)).to(device)
    fn = torch.compile(model, fullgraph=True) if compiled else model
    loss, logits = fn(tokens[:, :-1], tokens[:, 1:], ids)
    loss.backward()
    return loss.detach(), logits.detach(), [p.grad for p in model.parameters()], state.acc


def test_compiled_inplace_model_returning_logits_matches_eager(device, monkeypatch):
    monkeypatch.setattr(ops, "_TRACE_WARNED", set(), raising=False)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, logits, grads, acc = _step(compiled=True, inplace=True, device=device)
    ours = [w for w in caught if "inplace_grad" in str(w.message)]
    assert len(ours) == 1 and "torch.compile" in str(ours[0].message)
    e_loss, e_logits, e_grads, e_acc = _step(compiled=False, inplace=False, device=device)
    torch.testing.assert_close(loss, e_loss)
    torch.testing.assert_close(logits, e_logits)  # the logits, not the gradient written over them
    for g, eg in zip(grads, e_grads):
        torch.testing.assert_close(g, eg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc, e_acc)
    assert acc[:, 1].sum() > 0


def test_eager_inplace_still_writes_over_the_logits():
    """Outside torch.compile inplace_grad keeps its zero-memory behaviour."""
    loss, logits, grads, _ = _step(compiled=False, inplace=True, device="cpu")
    _, e_logits, e_grads, _ = _step(compiled=False, inplace=False, device="cpu")
    assert not torch.allclose(logits, e_logits)  # overwritten by the gradient
    for g, eg in zip(grads, e_grads):
        torch.testing.assert_close(g, eg, rtol=1e-5, atol=1e-6)


def test_warning_is_given_once(monkeypatch):
    monkeypatch.setattr(ops, "_TRACE_WARNED", set(), raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch._dynamo.reset()
            _step(compiled=True, inplace=True, device="cpu")
    assert sum("inplace_grad" in str(w.message) for w in caught) == 1


def test_warning_op_is_a_no_op_when_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.warn_while_tracing(torch.randn(3, 4), "not given when run") is None
