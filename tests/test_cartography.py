"""Quadrants vs the NumPy reference, multiplicities, loss weights and pruning (with baselines)."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import gdc_ext
from gdc_ext import reference
from gdc_ext.cartography import DEFAULT_SCORE, NEEDS_GROUP, NEEDS_REFERENCE, PRUNE_BY, SCORES
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


CORE_SCORES = [by for by in SCORES if by not in NEEDS_GROUP]


def _scores(d, m, last=None):
    d = torch.as_tensor(d, dtype=torch.float64)
    m = torch.as_tensor(m, dtype=torch.float64)
    last = d if last is None else torch.as_tensor(last, dtype=torch.float64)
    n = len(d)
    z = torch.zeros(n, dtype=torch.int32)
    return Scores(difficulty=d, memorization_by_eps=m, forgets_by_eps=z, transitions=z, observed=z, last_loss=last,
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


def _spec_score(by, d, m, last, ref):
    """The selection scores of docs/method.md, written from the definitions (random aside)."""
    unscored = np.isnan(d)  # no burn-in epoch: every score selects them last
    return {"memorization": np.where(unscored, np.nan, m), "gain": d - last,
            "excess": np.where(unscored, np.nan, ref - last),
            "relative_excess": np.where(unscored, np.nan, 1.0 - np.maximum(last, 1e-6) / np.maximum(ref, 1e-6)),
            "last": np.where(unscored, np.nan, -last),
            "loss": d}[by]


@given(st.integers(1, 60), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_prune_budget_and_order(n, fraction, seed):
    rng = np.random.default_rng(seed)
    # few distinct values everywhere: many ties in every score, and some unscored samples
    d = rng.choice([0.5, 1.0, 2.0, np.nan], size=n)
    m = rng.choice([0.0, 0.0, 0.5, 1.0], size=n)
    last = np.where(np.isnan(d) & (rng.random(n) < 0.5), np.nan, rng.choice([0.0, 0.5, 1.0], size=n))
    ref = rng.choice([1.0, 2.0], size=n)
    s = _scores(d, m, last)
    scored = np.flatnonzero(~np.isnan(d))
    k = int(round(fraction * n))
    for by in CORE_SCORES:  # hand-built Scores: the scores that need no opt-in group
        ids = gdc_ext.prune(s, fraction, by=by, seed=seed, reference=ref)
        assert ids.dtype == torch.int64 and ids.tolist() == sorted(set(ids.tolist()))
        assert len(ids) == n - k  # exactly the budget, the same for every score and the baselines
        again = gdc_ext.prune(s, fraction, by=by, seed=seed, reference=torch.from_numpy(ref))
        assert torch.equal(ids, again)  # deterministic, array or tensor reference alike
        removed = set(range(n)) - set(ids.tolist())
        if by == "random":  # the first k of a seeded permutation of the scored ids, then unscored by id
            perm = np.random.default_rng(seed).permutation(scored).tolist()
            expect = (perm + np.flatnonzero(np.isnan(d)).tolist())[:k]
        else:  # the plain-sort specification: highest score, ties by higher d then id, NaN last
            expect = reference.select(_spec_score(by, d, m, last, ref), fraction, d).tolist()
        assert removed == set(expect), by
        values = gdc_ext.score_values(s, by, seed=seed, reference=ref).numpy()
        if by != "random":
            np.testing.assert_array_equal(values, _spec_score(by, d, m, last, ref))
        # unscored samples go last: one is removed only when every scored one is
        unscored_removed = removed - set(np.flatnonzero(~np.isnan(values)).tolist())
        assert not unscored_removed or set(np.flatnonzero(~np.isnan(values)).tolist()) <= removed
    # the paper's rule is unchanged: the order of reference.prune_order over the scored samples
    order = gdc_ext.selection_order(gdc_ext.score_values(s, "memorization"), s.difficulty).tolist()
    unscored = np.flatnonzero(np.isnan(d)).tolist()
    assert order == [i for i in reference.prune_order(m, d) if not np.isnan(d[i])] + unscored


def test_prune_many_ties_hand_case():
    # every score ties; the budget (2 of 6) is filled by higher difficulty, then lower id
    d = [1.0, 3.0, 3.0, 2.0, np.nan, 3.0]
    s = _scores(d, [0.5] * 6, last=[0.0, 2.0, 2.0, 1.0, 0.0, 2.0])
    for by in ("memorization", "gain", "excess", "loss"):
        assert gdc_ext.prune(s, 2 / 6, by=by, reference=[3.0, 5.0, 5.0, 4.0, 3.0, 5.0]).tolist() == [0, 3, 4, 5], by
    # gain = d - last = [1, 1, 1, 1, nan, 1]: the unscored sample goes last, even at fraction 1 - 1/6
    assert gdc_ext.prune(s, 5 / 6, by="gain").tolist() == [4]
    assert gdc_ext.prune(s, 1.0, by="gain").tolist() == []
    assert gdc_ext.prune(s, 0.0, by="gain").tolist() == list(range(6))


def test_prune_ties_broken_by_difficulty_and_bad_input():
    s = _scores([1.0, 3.0, 2.0, 0.5], [0.5, 0.5, 0.5, 0.0])
    assert gdc_ext.prune(s, 0.25).tolist() == [0, 2, 3]  # ties at m = 0.5: the hardest goes first
    assert gdc_ext.prune(s, 0.5).tolist() == [0, 3]
    for bad in (1.5, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="fraction"):
            gdc_ext.prune(s, bad)
    with pytest.raises(ValueError, match="by must be one of 'memorization', 'gain', 'excess', 'relative_excess', 'last', 'loss', 'random'"):
        gdc_ext.prune(s, 0.1, by="entropy")
    with pytest.raises(ValueError, match="by must be one of"):
        gdc_ext.prune(s, 0.1, by=None)
    with pytest.raises(ValueError, match="excess.*needs reference"):
        gdc_ext.prune(s, 0.1, by="excess")


@pytest.mark.parametrize("ref, match", [
    ([1.0, 2.0, 3.0], r"\[N = 4\].*got 3 values"),
    ([1.0, float("nan"), 2.0, 3.0], "NaN/inf.*first at id 1"),
    (np.array([1.0, 2.0, np.inf, 3.0]), "NaN/inf.*first at id 2"),
    (np.ones((4, 1)), r"got shape \(4, 1\)"),
    (torch.ones(2, 2), r"got shape \(2, 2\)"),
    (["a", "b", "c", "d"], "dtype <U1"),
    (np.array([True, False, True, False]), "dtype bool"),
    (torch.tensor([True, False, True, False]), "torch.bool"),
    ([[1.0], [2.0, 3.0], [4.0], [5.0]], "reference must be"),
    (3.0, r"got shape \(\)"),
])
def test_bad_reference_names_reference(ref, match):
    s = _scores([1.0, 2.0, 3.0, 4.0], [0.0] * 4)
    for call in (lambda: s.excess(ref), lambda: gdc_ext.prune(s, 0.5, by="excess", reference=ref),
                 lambda: gdc_ext.score_values(s, "gain", reference=ref),  # checked whenever given
                 lambda: s.quadrants(by="excess", reference=ref)):
        with pytest.raises(ValueError, match="reference") as e:
            call()
        assert e.match(match)


def test_gain_and_excess_values():
    nan = float("nan")
    s = _scores([2.0, nan, 1.0, 3.0], [0.0] * 4, last=[0.5, 0.25, nan, 3.5])
    np.testing.assert_array_equal(s.gain.numpy(), [1.5, nan, nan, -0.5])
    ex = s.excess(np.array([1.0, 1.0, 1.0, 4.0]))
    assert ex.dtype == torch.float64 and ex.shape == (4,)
    np.testing.assert_array_equal(ex.numpy(), [0.5, 0.75, nan, 0.5])  # NaN only where never observed
    np.testing.assert_array_equal(s.excess(torch.tensor([1, 1, 1, 4])).numpy(), ex.numpy())  # ints are numbers
    assert s.gain.dtype == torch.float64


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
    assert SCORES == tuple(PRUNE_BY) == ("memorization", "gain", "excess", "relative_excess", "last", "loss",
                                         "random", "confidence", "hard_to_learn", "variability", "forgetting",
                                         "accuracy_last")
    assert DEFAULT_SCORE in SCORES and DEFAULT_SCORE not in NEEDS_REFERENCE  # a default cannot need a reference
    assert gdc_ext.DEFAULT_SCORE == DEFAULT_SCORE and gdc_ext.SCORES == SCORES
    with pytest.raises(ValueError, match="by must be one of 'memorization', 'gain', 'excess', 'relative_excess', 'last', 'loss', 'random'"):
        gdc_ext.score_values(s, "entropy")


def test_quadrants_by_any_score_and_the_sampler_chain():
    rng = np.random.default_rng(0)
    n = 30
    d = np.where(rng.random(n) < 0.1, np.nan, rng.random(n) * 4)
    last = np.where(np.isnan(d), np.nan, rng.random(n) * 2)
    s = _scores(d, rng.choice([0.0, 0.5, 1.0], size=n), last)
    ref = rng.random(n) * 5
    for by in CORE_SCORES:  # hand-built Scores: the scores that need no opt-in group
        q = s.quadrants(0.5, 0.75, by=by, reference=ref, seed=3)
        m = gdc_ext.score_values(s, by, reference=ref, seed=3)
        codes, (tau_d, tau_m) = reference.quadrants(d, m.numpy(), 0.5, 0.75)  # the functional spec on any axis
        np.testing.assert_array_equal(q.codes.numpy(), codes)
        assert (q.tau_d, q.tau_m) == (tau_d, tau_m)
        assert torch.equal(gdc_ext.quadrants(s.difficulty, m, 0.5, 0.75).codes, q.codes)
        assert torch.equal(s.quadrants(0.5, 0.75, memorization=by, reference=ref, seed=3).codes, q.codes)
        # quadrants -> multiplicities -> sampler: removed outliers never drawn, hard ones gamma times
        sampler = gdc_ext.CartoSampler(q, gamma=3.0, seed=1)
        counts = sampler.counts()
        c = q.codes.numpy()
        assert (counts.numpy()[c == 3] == 0).all() and (counts.numpy()[c == 1] == 3).all()
        assert sorted(iter(sampler)) == sorted(np.repeat(np.arange(n), counts.numpy()).tolist())
    assert torch.equal(s.quadrants().codes, s.quadrants(by="memorization").codes)  # the paper's default
    np.testing.assert_array_equal(s.quadrants(by="gain").codes.numpy(),
                                  reference.quadrants(d, d - last)[0])
    with pytest.raises(ValueError, match="not both"):
        s.quadrants(by="gain", memorization="loss")
    with pytest.raises(ValueError, match="needs reference"):
        s.quadrants(by="excess")
    with pytest.raises(ValueError, match="by must be one of"):
        s.quadrants(memorization="entropy")


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
