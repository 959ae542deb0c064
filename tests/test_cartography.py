"""Quadrants vs the NumPy reference, multiplicities, loss weights and pruning (with baselines)."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import gdc_ext
from gdc_ext import reference
from gdc_ext.cartography import PRUNE_BY
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
    return Scores(difficulty=d, memorization_by_eps=m, forgets_by_eps=z, transitions=z, observed=z, last_loss=d,
                  min_loss=None, loss_mean=None, loss_std=None, grad_energy=None, eps=(1.0,), epoch=3, burn_in=2)


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
    # the random baseline removes the first k of a seeded permutation of the scored ids
    assert kept["random"] == set(range(n)) - set(np.random.default_rng(seed).permutation(scored)[:k].tolist())
    # the selection order: the reference's order over the scored samples, then the unscored by id
    order = gdc_ext.selection_order(gdc_ext.score_values(s, "memorization"), s.difficulty).tolist()
    unscored = np.flatnonzero(np.isnan(d)).tolist()
    assert order == [i for i in reference.prune_order(m, d) if not np.isnan(d[i])] + unscored
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


def test_selection_order_and_score_values():
    score = torch.tensor([0.5, float("nan"), 0.5, 1.0, 0.5, float("nan")], dtype=torch.float64)
    tiebreak = torch.tensor([1.0, 9.0, 3.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    # highest score, ties by higher tiebreak then lower id, unscored (NaN) last by id
    assert gdc_ext.selection_order(score, tiebreak).tolist() == [3, 2, 4, 0, 1, 5]
    assert gdc_ext.selection_order(score).tolist() == [3, 0, 2, 4, 1, 5]
    with pytest.raises(ValueError, match="tiebreak"):
        gdc_ext.selection_order(score, tiebreak[:3])
    s = _scores([1.0, np.nan, 2.0], [0.5, 0.5, 0.0])
    m = gdc_ext.score_values(s, "memorization")
    assert m.dtype == torch.float64 and torch.isnan(m[1]) and m[[0, 2]].tolist() == [0.5, 0.0]
    loss = gdc_ext.score_values(s, "loss")
    torch.testing.assert_close(loss, s.difficulty, rtol=0, atol=0, equal_nan=True)
    loss[0] = 7.0  # a copy, not a view of the scores
    assert s.difficulty[0] == 1.0
    r = gdc_ext.score_values(s, "random", seed=3)
    assert torch.isnan(r[1]) and sorted(r[[0, 2]].tolist()) == [1.0, 2.0]
    assert set(PRUNE_BY) == {"memorization", "loss", "random"}
    with pytest.raises(ValueError, match="by must be one of 'memorization', 'loss', 'random'"):
        gdc_ext.score_values(s, "entropy")


def test_prune_picks_the_threshold_by_eps_or_index():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    z = torch.zeros(4, 2, dtype=torch.int32)
    s = Scores(difficulty=d, memorization_by_eps=m, forgets_by_eps=z, transitions=z[:, 0], observed=z[:, 0],
               last_loss=d, min_loss=None, loss_mean=None, loss_std=None, grad_energy=None, eps=(0.5, 2.0),
               epoch=3, burn_in=2)
    assert gdc_ext.prune(s, 0.25).tolist() == [1, 2, 3]  # default: the first eps
    assert gdc_ext.prune(s, 0.25, eps=2.0).tolist() == [0, 2, 3]
    assert gdc_ext.prune(s, 0.25, eps_index=1).tolist() == [0, 2, 3]
    assert torch.equal(s.quadrants(eps=2.0).codes, s.quadrants(eps_index=1).codes)
    with pytest.raises(ValueError, match=r"\[0.5, 2.0\]"):
        gdc_ext.prune(s, 0.25, eps=1.0)
    with pytest.raises(ValueError, match="eps_index"):
        gdc_ext.prune(s, 0.25, eps_index=2)
    with pytest.raises(ValueError, match="not both"):
        gdc_ext.prune(s, 0.25, eps=2.0, eps_index=1)
