"""Recording is explicit: CartoLoss records only in training mode with grad enabled (eval mode
follows the model when the loss is a submodule); functional.cross_entropy takes the decision from
its `record` argument; a held-out set is scored into a separate state with record=True under
no_grad; a state without sample ids while training warns once per loss object."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdc_ext import ArgumentError, CartoLoss, CartoState, functional
from gdc_ext.layout import ACC_COUNT, ACC_LOSS_SUM

N, V = 4, 11


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, V, generator=g).to(dtype)
    t = torch.randint(0, V, (8,), generator=g)
    t[5] = -100
    return x, t, torch.tensor([0, 1, 2, 3])


class Model(nn.Module):
    """A model holding its CartoLoss as a submodule."""

    def __init__(self, state):
        super().__init__()
        self.lin = nn.Linear(V, V)
        self.loss_fn = CartoLoss(state=state)

    def forward(self, x, t, ids=None):
        return self.loss_fn(self.lin(x), t, ids)


def test_eval_mode_does_not_record_even_with_grad():
    x, t, ids = _batch()
    state = CartoState(N, burn_in=1)
    loss_fn = CartoLoss(state=state)
    loss_fn.eval()
    loss = loss_fn(x.requires_grad_(), t, ids)
    loss.backward()
    assert not state.acc.any()
    torch.testing.assert_close(loss.detach(), F.cross_entropy(x.detach(), t))
    loss_fn.train()
    loss_fn(x, t, ids)
    assert state.acc[:, ACC_COUNT].sum() == 7


def test_model_eval_switches_a_submodule_loss():
    x, t, ids = _batch()
    state = CartoState(N, burn_in=1)
    model = Model(state)
    model.eval()
    model(x, t, ids).backward()  # an evaluation pass run with grad
    assert not state.acc.any()
    model.train()
    model(x, t, ids).backward()
    assert state.acc[:, ACC_COUNT].sum() == 7


def test_no_grad_does_not_record_in_training_mode():
    x, t, ids = _batch()
    state = CartoState(N, burn_in=1)
    with torch.no_grad():
        CartoLoss(state=state)(x, t, ids)
    assert not state.acc.any()


def test_eval_without_ids_is_allowed_with_sample_weights():
    """Evaluation never records, so ids may be missing even with per-sample weights set."""
    x, t, _ = _batch()
    loss_fn = CartoLoss(state=CartoState(N, burn_in=1))
    loss_fn.set_sample_weights(torch.full((N,), 0.5))
    loss_fn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = loss_fn(x.requires_grad_(), t)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(x.detach(), t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fused kernel and torch fallback
def test_heldout_scoring_with_record_true_under_no_grad(dtype):
    """record=True under no_grad records exactly what a training step records, into its own state."""
    x, t, ids = _batch(dtype=dtype)
    trained = CartoState(N, burn_in=1)
    CartoLoss(state=trained)(x.clone().requires_grad_(), t, ids).backward()
    heldout = CartoState(N, burn_in=1)
    with torch.no_grad():
        per_row = functional.cross_entropy(x, t, ids, state=heldout, record=True, reduction="none")
    assert torch.equal(heldout.acc, trained.acc)
    torch.testing.assert_close(heldout.acc[:, ACC_LOSS_SUM].sum(), per_row.double().sum())
    heldout.end_epoch()
    assert heldout.scores().observed.tolist() == [True] * N


def test_record_false_never_records_and_none_keeps_the_default_rule():
    x, t, ids = _batch()
    state = CartoState(N, burn_in=1)
    functional.cross_entropy(x.requires_grad_(), t, ids, state=state, record=False).backward()
    assert not state.acc.any()
    functional.cross_entropy(x, t, ids, state=state)  # record=None: grad on -> records
    assert state.acc[:, ACC_COUNT].sum() == 7


def test_record_true_needs_state_and_ids():
    x, t, ids = _batch()
    with pytest.raises(ArgumentError, match="state"):
        functional.cross_entropy(x, t, ids, record=True)
    with pytest.raises(ArgumentError, match="sample_ids"):
        functional.cross_entropy(x, t, state=CartoState(N, burn_in=1), record=True)
    with pytest.raises(ArgumentError, match="record"):
        functional.cross_entropy(x, t, ids, state=CartoState(N, burn_in=1), record="yes")


def test_state_without_ids_while_training_warns_once_per_loss_object():
    x, t, ids = _batch()
    x.requires_grad_()
    state = CartoState(N, burn_in=1)
    a, b = CartoLoss(state=state), CartoLoss(state=state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a(x, t)
        a(x, t)
        b(x, t)
        a(x, t, ids)  # with ids: no warning
        CartoLoss()(x, t)  # no state: no warning
        b.eval()
        b(x, t)  # eval: no warning
        with torch.no_grad():
            CartoLoss(state=state)(x, t)  # no grad: not a training step
    msgs = [str(w.message) for w in caught if "sample_ids" in str(w.message)]
    assert len(msgs) == 2, msgs
    assert "nothing is recorded" in msgs[0]


def test_missing_ids_warning_does_not_break_a_fullgraph_compile(monkeypatch):
    from gdc_ext import ops, loss as loss_module

    monkeypatch.setattr(ops, "_TRACE_WARNED", set())
    torch._dynamo.reset()
    x, t, _ = _batch()
    state = CartoState(N, burn_in=1)
    fn = torch.compile(CartoLoss(state=state), fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(x.requires_grad_(), t)
    assert any(str(w.message) == loss_module.NO_IDS_WARNING for w in caught)
    torch.testing.assert_close(out.detach(), F.cross_entropy(x.detach(), t))
    assert not state.acc.any()
