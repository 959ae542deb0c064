"""Counterfactual references (gdc_ext.counterfactual): reference_losses, crossfit_split,
duplicate_groups, and the relative_excess score."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gdc_ext
from gdc_ext import reference
from gdc_ext.counterfactual import crossfit_split, duplicate_groups, reference_losses
from helpers import TinyLM


def _lm_batches(n=12, L=7, V=50, B=4, seed=0, per_token=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, L + 1), generator=g)
    out = []
    for s in range(0, n, B):
        x = tokens[s:s + B, :-1]
        y = tokens[s:s + B, 1:].clone()
        y[0, -2:] = -100  # some ignored targets
        ids = torch.arange(s, min(s + B, n))
        out.append((x, y, ids[:, None].expand_as(y).clone() if per_token else ids))
    return out


@pytest.mark.parametrize("per_token", [False, True])
def test_reference_losses_equal_the_recorded_nll_bit_for_bit(per_token):
    torch.manual_seed(0)
    model = TinyLM()
    batches = _lm_batches(per_token=per_token)
    ref = reference_losses(model, batches, 12, progress=False)
    # the same model, the same batches, recorded by a training-style CartoLoss pass: last_loss
    state = gdc_ext.CartoState(12, burn_in=1)
    loss_fn = gdc_ext.CartoLoss(state=state)
    for x, y, ids in batches:
        logits = model(x)
        loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ids).backward()
    state.end_epoch()
    assert ref.dtype == torch.float64 and ref.shape == (12,)
    assert torch.equal(ref, state.scores().last_loss)  # bit for bit: one kernel, one division
    # and the plain definition: mean token NLL of each sample's non-ignored targets
    spec = np.zeros(12)
    for x, y, ids in batches:
        with torch.no_grad():
            lp = torch.log_softmax(model(x).double(), -1)
        for b in range(x.shape[0]):
            keep = y[b] != -100
            spec[int(ids[b] if ids.dim() == 1 else ids[b, 0])] = float(-lp[b][keep].gather(1, y[b][keep, None]).mean())
    np.testing.assert_allclose(ref.numpy(), spec, rtol=1e-5)


def test_reference_losses_fused_linear_head_equals_the_logits_path():
    torch.manual_seed(0)
    model = TinyLM()
    batches = _lm_batches()
    plain = reference_losses(model, batches, 12, progress=False)
    hidden = reference_losses(model, batches, 12, progress=False, linear_head=model.head,
                              forward=lambda m, b: (torch.tanh(m.emb(b[0])), b[1], b[2]))
    torch.testing.assert_close(hidden, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="linear_head"):
        reference_losses(model, batches, 12, progress=False, linear_head=model)


def test_reference_losses_restores_mode_and_does_not_touch_grads():
    model = TinyLM().train()
    reference_losses(model, _lm_batches(), 12, progress=False)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    reference_losses(model, _lm_batches(), 12, progress=False)
    assert not model.training


def test_reference_losses_forward_hook_missing_samples_and_errors():
    model = TinyLM()
    dict_batches = [{"x": x, "y": y, "ids": i} for x, y, i in _lm_batches()]
    with pytest.warns(UserWarning, match="2 of 14 samples had no scored token"):
        ref = reference_losses(model, dict_batches, 14, progress=False,
                               forward=lambda m, b: (m(b["x"]), b["y"], b["ids"]))
    assert torch.isnan(ref[12:]).all() and torch.isfinite(ref[:12]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ids the batches were meant to cover are all scored: no warning
        half = reference_losses(model, dict_batches, 14, progress=False, ids=torch.arange(12),
                                forward=lambda m, b: (m(b["x"]), b["y"], b["ids"]))
    assert torch.equal(half[:12], ref[:12])
    with pytest.raises(ValueError, match="ids must be"):
        reference_losses(model, dict_batches, 14, progress=False, ids=[0, 14])
    with pytest.raises(ValueError, match="NaN"):
        gdc_ext.CartoState(14, burn_in=1).scores().relative_excess(ref)
    with pytest.raises(ValueError, match="forward="):
        reference_losses(model, dict_batches, 14, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        reference_losses(model, _lm_batches(), 0, progress=False)
    with pytest.raises(ValueError, match="model"):
        reference_losses(lambda x: x, _lm_batches(), 12, progress=False)
    with pytest.raises(ValueError, match="empty"):
        reference_losses(model, [], 12, progress=False)
    with pytest.raises(ValueError, match="out of range|sample id"):
        reference_losses(model, _lm_batches(), 5, progress=False)


@settings(deadline=None)
@given(st.integers(2, 200), st.integers(0, 2**31 - 1), st.integers(1, 30))
def test_crossfit_split_keeps_groups_together_and_is_seeded(n, seed, n_groups):
    groups = np.random.default_rng(seed).integers(0, n_groups, size=n) * 7 - 3  # any integer labels
    if len(np.unique(groups)) < 2:
        with pytest.raises(ValueError, match="one group"):
            crossfit_split(n, groups, seed=seed)
        return
    a, b = crossfit_split(n, groups, seed=seed)
    assert a.dtype == b.dtype == torch.int64
    assert sorted(a.tolist() + b.tolist()) == list(range(n)) and len(a) and len(b)
    assert not set(groups[a.numpy()]) & set(groups[b.numpy()])  # no group on both sides
    _, sizes = np.unique(groups, return_counts=True)
    assert abs(len(a) - len(b)) <= sizes.max()  # balanced up to one group
    a2, b2 = crossfit_split(n, torch.from_numpy(groups), seed=seed)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_crossfit_split_without_groups_and_errors():
    a, b = crossfit_split(10, seed=1)
    assert len(a) == len(b) == 5
    c, d = crossfit_split(10, seed=2)
    assert not torch.equal(a, c)  # another seed, another split
    for bad, match in ((dict(num_samples=1), "num_samples"), (dict(num_samples=4, groups=[0, 1]), "groups"),
                       (dict(num_samples=2, groups=[0.5, 1.5]), "integer"), (dict(num_samples=4, seed=-1), "seed"),
                       (dict(num_samples=4, seed=1.5), "seed")):
        with pytest.raises(ValueError, match=match):
            crossfit_split(**bad)


def test_duplicate_groups_per_sample_and_batch_forms():
    samples = [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5, -100], [9]]
    assert duplicate_groups(samples).tolist() == [0, 1, 0, 1, 4]
    tokens = torch.tensor([[1, 2, 3], [4, 5, -100], [1, 2, 3], [7, 7, 7]])
    assert duplicate_groups([(tokens, torch.tensor([0, 1, 2, 3]))]).tolist() == [0, 1, 0, 3]
    a, b = crossfit_split(5, duplicate_groups(samples), seed=0)
    assert ({0, 2} <= set(a.tolist()) or {0, 2} <= set(b.tolist()))
    assert ({1, 3} <= set(a.tolist()) or {1, 3} <= set(b.tolist()))


def test_relative_excess_values_and_checks():
    L = np.array([[2.0, 1.0, np.nan], [0.5, 1.0, np.nan]])
    ref = np.array([2.0, 4.0, 1.0])
    np.testing.assert_allclose(reference.relative_excess(L, ref), [0.75, 0.75, np.nan])
    state = gdc_ext.CartoState(3, burn_in=1)
    for row in L:
        seen = ~np.isnan(row)
        state.record(torch.tensor(row[seen]), torch.tensor(np.flatnonzero(seen)))
        state.end_epoch() if seen.any() else None
    s = state.scores()
    np.testing.assert_allclose(s.relative_excess(ref).numpy(), [0.75, 0.75, np.nan])
    v = gdc_ext.score_values(s, "relative_excess", reference=ref)
    assert v[0] == v[1] == 0.75 and torch.isnan(v[2])
    with pytest.raises(ValueError, match="reference.*non-negative"):
        s.relative_excess([2.0, -1.0, 1.0])
    # a reference of exactly 0 (predicted perfectly) is floored at RELATIVE_FLOOR, never a division by 0
    z = s.relative_excess([0.0, 0.0, 1.0]).numpy()
    f = gdc_ext.state.RELATIVE_FLOOR
    np.testing.assert_allclose(z[:2], [1.0 - 0.5 / f, 1.0 - 1.0 / f]) and np.testing.assert_allclose(
        reference.relative_excess(L, [0.0, 0.0, 1.0]), z)
    with pytest.raises(ValueError, match="relative_excess' needs reference"):
        gdc_ext.score_values(s, "relative_excess")


def _train_epochs(carto, model, batches, epochs, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y, ids in batches:
            logits = model(x)
            carto.loss(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ids).backward()
            opt.step()
            opt.zero_grad()
        carto.end_epoch()


def test_cartographer_initial_reference_end_to_end():
    torch.manual_seed(0)
    model, batches = TinyLM(), _lm_batches()
    carto = gdc_ext.Cartographer(12, burn_in=2, eps=1.0, reference="initial")
    assert carto.memorization == gdc_ext.cartography.DEFAULT_REFERENCE_SCORE == "excess"
    assert carto.needs_reference
    expect = reference_losses(model, batches, 12, progress=False)
    ref = carto.score_reference(model, batches, progress=False)
    assert torch.equal(ref, expect) and torch.equal(carto.reference, expect) and not carto.needs_reference
    _train_epochs(carto, model, batches, 2)  # labelled at the end of epoch 2 with the initial reference
    s = carto.state.scores()
    want = gdc_ext.quadrants(s.difficulty, gdc_ext.score_values(s, "excess", reference=expect), 0.75, 0.75)
    assert carto.intervening and torch.equal(carto.quadrants.codes, want.codes)
    _train_epochs(carto, model, batches, 1)
    with pytest.raises(RuntimeError, match="already recorded"):
        carto.score_reference(model, batches, progress=False)
    with pytest.raises(RuntimeError, match="already fixed"):
        carto.set_reference(expect)
    # a resumed run adopts the reference it measured
    fresh = gdc_ext.Cartographer(12, burn_in=2, eps=1.0, reference="initial")
    fresh.load_state_dict(carto.state_dict())
    assert torch.equal(fresh.reference, expect) and torch.equal(fresh.quadrants.codes, carto.quadrants.codes)
    # a fixed reference that differs from the saved one is still refused
    other = gdc_ext.Cartographer(12, burn_in=2, eps=1.0, reference=expect + 1.0)
    with pytest.raises(ValueError, match="reference differs"):
        other.load_state_dict(carto.state_dict())


def test_cartographer_labels_with_the_reference_and_refuses_without_it():
    torch.manual_seed(0)
    model, batches = TinyLM(), _lm_batches()
    carto = gdc_ext.Cartographer(12, burn_in=2, eps=1.0, reference="later", alpha_d=0.5, alpha_m=0.5,
                                 memorization="relative_excess")
    _train_epochs(carto, model, batches, 1)
    before = carto.state.state_dict()
    for x, y, ids in batches:  # epoch 2 recorded, but no reference yet: labelling is refused
        logits = model(x)
        carto.loss(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ids)
    acc = carto.state.acc.clone()
    with pytest.raises(RuntimeError, match="no reference was set"):
        carto.end_epoch()
    assert carto.state.epochs_done == before["epoch"].item() and torch.equal(carto.state.acc, acc)  # nothing folded
    ref = torch.linspace(1.0, 3.0, 12, dtype=torch.float64)
    carto.set_reference(ref)
    assert carto.end_epoch() is True
    s = carto.state.scores()
    want = gdc_ext.quadrants(s.difficulty, s.relative_excess(ref), 0.5, 0.5)
    assert torch.equal(carto.quadrants.codes, want.codes)
    assert torch.equal(carto.prune(0.25), gdc_ext.prune(s, 0.25, by="relative_excess", reference=ref))


def test_cartographer_reference_arguments():
    assert gdc_ext.Cartographer(4, burn_in=2, eps=1.0).memorization == gdc_ext.DEFAULT_SCORE
    assert gdc_ext.Cartographer(4, burn_in=2, eps=1.0, reference=[1.0] * 4).memorization == "excess"
    c = gdc_ext.Cartographer(4, burn_in=2, eps=1.0, reference=[1.0] * 4, memorization="relative_excess")
    assert c.memorization == "relative_excess" and c.reference_mode == "given"
    for kw, match in ((dict(reference="base"), "reference must be"),
                      (dict(reference=[1.0, -1.0, 1.0, 1.0], memorization="relative_excess"), "non-negative"),
                      (dict(memorization="relative_excess"), "needs reference")):
        with pytest.raises(ValueError, match=match):
            gdc_ext.Cartographer(4, burn_in=2, eps=1.0, **kw)
    c = gdc_ext.Cartographer(4, burn_in=2, eps=1.0, reference="later", memorization="relative_excess")
    with pytest.raises(ValueError, match="non-negative"):
        c.set_reference([1.0, -1.0, 1.0, 1.0])
    assert c.reference is None
