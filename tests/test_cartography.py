"""Quadrants vs the NumPy reference, multiplicities, loss weights and pruning (with baselines)."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import gdc_ext
from gdc_ext import reference
from gdc_ext.state import Scores


@st.composite
def score_vectors(draw):
    n = draw(st.integers(1, 40))
    # few distinct values: many ties, as real memorization scores have (most are 0)
    d = draw(st.lists(st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0, 6), st.just(float("nan"))),
                      min_size=n, max_size=n))
    m = draw(st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.25, 1 / 3, 0.5, 1.0]), min_size=n, max_size=n))
    a_d = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]))
    a_m = draw(st.floats(0, 1))
    return np.array(d), np.array(m), a_d, a_m


@given(score_vectors())
def test_quadrants_match_reference(case):
    d, m, a_d, a_m = case
    q = gdc_ext.quadrants(torch.from_numpy(d), torch.from_numpy(m), alpha_d=a_d, alpha_m=a_m)
    codes, (tau_d, tau_m) = reference.quadrants(d, m, a_d, a_m)
    assert q.codes.dtype == torch.int8
    np.testing.assert_array_equal(q.codes.numpy(), codes)
    np.testing.assert_equal([q.tau_d, q.tau_m], [tau_d, tau_m])
    assert sum(q.counts().values()) == len(d)
    assert q.counts()["unscored"] == int(np.isnan(d).sum())


def _scores(d, m):
    d = torch.as_tensor(d, dtype=torch.float64)
    m = torch.as_tensor(m, dtype=torch.float64)
    n = len(d)
    z = torch.zeros(n, dtype=torch.int32)
    return Scores(difficulty=d, memorization_by_eps=m, forgets_by_eps=z, transitions=z, observed=z, last_loss=d, min_loss=None,
                  loss_mean=None, loss_std=None, grad_energy=None, eps=(1.0,), epoch=3, burn_in=2)


def test_scores_quadrants_hand_case():
    s = _scores([1.0, 4.0, 1.0, 4.0, float("nan")], [0.0, 0.0, 0.5, 0.5, 0.0])
    q = s.quadrants(alpha_d=0.5, alpha_m=0.5)
    assert q.codes.tolist() == [0, 1, 2, 3, -1]
    assert (q.tau_d, q.tau_m) == (2.5, 0.25)


def test_multiplicities_and_loss_weights():
    codes = torch.tensor([0, 1, 2, 3, -1], dtype=torch.int8)
    assert gdc_ext.multiplicities(codes, gamma=2.5).tolist() == [1.0, 2.5, 1.0, 0.0, 1.0]
    assert gdc_ext.multiplicities(codes, gamma=2.5, keep_outliers=True).tolist() == [1.0, 2.5, 1.0, 1.0, 1.0]
    assert gdc_ext.loss_weights(codes, alpha=0.25).tolist() == [1.0, 1.0, 0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match="gamma"):
        gdc_ext.multiplicities(codes, gamma=1.0)
    with pytest.raises(ValueError, match="alpha"):
        gdc_ext.loss_weights(codes, alpha=1.0)
    with pytest.raises(ValueError, match="codes"):
        gdc_ext.loss_weights(torch.tensor([5]), alpha=0.5)
    with pytest.raises(ValueError, match="alpha_d"):
        gdc_ext.quadrants([1.0], [0.0], alpha_d=1.5)


@given(st.integers(1, 60), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_prune_budget_and_order(n, fraction, seed):
    rng = np.random.default_rng(seed)
    d = rng.choice([0.5, 1.0, 2.0, np.nan], size=n)
    m = rng.choice([0.0, 0.0, 0.5, 1.0], size=n)
    s = _scores(d, m)
    scored = np.flatnonzero(~np.isnan(d))
    k = int(round(fraction * len(scored)))
    kept = {}
    for by in ("memorization", "loss", "random"):
        ids = gdc_ext.prune(s, fraction, by=by, seed=seed)
        assert ids.dtype == torch.int64 and ids.tolist() == sorted(set(ids.tolist()))
        assert len(ids) == n - k  # same budget for the method and its baselines
        assert set(np.flatnonzero(np.isnan(d))) <= set(ids.tolist())  # unscored always kept
        kept[by] = set(ids.tolist())
    removed = [i for i in reference.prune_order(m, d) if not np.isnan(d[i])][:k]
    assert kept["memorization"] == set(range(n)) - set(removed)
    removed_loss = set(range(n)) - kept["loss"]
    if k:  # the loss baseline removes the highest difficulties
        assert min(d[list(removed_loss)]) >= max(d[list(kept["loss"] & set(scored))], default=-np.inf)


def test_prune_ties_broken_by_difficulty_and_bad_input():
    s = _scores([1.0, 3.0, 2.0, 0.5], [0.5, 0.5, 0.5, 0.0])
    assert gdc_ext.prune(s, 0.25).tolist() == [0, 2, 3]  # ties at m = 0.5: the hardest goes first
    assert gdc_ext.prune(s, 0.5).tolist() == [0, 3]
    with pytest.raises(ValueError, match="fraction"):
        gdc_ext.prune(s, 1.5)
    with pytest.raises(ValueError, match="by"):
        gdc_ext.prune(s, 0.1, by="entropy")
