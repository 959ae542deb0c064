"""Streaming scores (fused kernel + end_epoch) equal the NumPy reference that builds the T x N
matrix, on random training histories (on the CPU and, where present, on CUDA)."""
import numpy as np
import torch
from hypothesis import given
from helpers import check_streaming_equals_reference, histories, run_history

import gdc_ext
from gdc_ext import reference


@given(h=histories())
def test_streaming_equals_reference(h, device):
    check_streaming_equals_reference(h, device)


@given(h=histories())
def test_gain_excess_and_selection_equal_reference(h, device):
    """Scores.gain / Scores.excess (O(N), from the streaming state) equal their definitions on
    the T x N matrix, and prune(by=...) removes the reference's selection, for every score."""
    state, hist_loss, _ = run_history(h, device)
    L = reference.loss_matrix(hist_loss, h["N"])
    s = state.scores()
    rng = np.random.default_rng(h["seed"])
    ref = np.round(rng.random(h["N"]) * 6, 1)  # rounded: ties in excess as well
    tol = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
    gain = reference.gain(L, h["burn_in"])
    excess = reference.excess(L, ref)
    np.testing.assert_allclose(s.gain.numpy(), gain, **tol)
    np.testing.assert_allclose(s.excess(ref).numpy(), excess, **tol)
    np.testing.assert_allclose(s.excess(torch.from_numpy(ref).float()).numpy(), excess, **tol)  # float32 too
    np.testing.assert_allclose(reference.scores_from_matrix(L, h["burn_in"], h["eps"])["gain"], gain, **tol)
    assert s.gain.shape == s.excess(ref).shape == (h["N"],)
    pref = ref + 0.5  # relative_excess divides by the reference: positive
    rel = reference.relative_excess(L, pref)
    np.testing.assert_allclose(s.relative_excess(pref).numpy(), rel, **tol)
    np.testing.assert_allclose(s.relative_excess(torch.from_numpy(pref)).numpy(), rel, **tol)
    d = s.difficulty.numpy()
    unscored = np.isnan(d)  # selection treats samples without a burn-in epoch as unscored, for every score
    for by, spec in (("gain", s.gain.numpy()), ("excess", np.where(unscored, np.nan, excess)), ("loss", d),
                     ("last", np.where(unscored, np.nan, -reference.last_observed(L))),
                     ("memorization", np.where(unscored, np.nan, s.memorization_at().numpy())),
                     ("relative_excess", np.where(unscored, np.nan, rel))):
        for fraction in (0.0, 0.3, 0.5, 1.0):
            kept = gdc_ext.prune(s, fraction, by=by, reference=pref if by == "relative_excess" else ref).tolist()
            removed = reference.select(spec, fraction, d)
            assert len(kept) == h["N"] - len(removed) == h["N"] - round(fraction * h["N"])
            assert sorted(set(range(h["N"])) - set(removed.tolist())) == kept


def test_hand_computed_history():
    """A history whose scores are worked out by hand from method.md."""
    L = np.array([[0.1, 5.0, np.nan],
                  [3.0, 0.2, 0.3],
                  [0.05, np.nan, 2.0],
                  [2.0, 0.1, 0.4]])
    r = reference.scores_from_matrix(L, burn_in=2, eps=1.0)
    np.testing.assert_allclose(r["difficulty"], [(0.1 + 3.0) / 2, (5.0 + 0.2) / 2, 0.3])
    # sample 0: 0.1 -> 3.0 forget, 3.0 -> 0.05, 0.05 -> 2.0 forget: 2 of 3
    # sample 1: 5.0 -> 0.2, 0.2 -> 0.1 (gap at t=3 skipped): 0 of 2
    # sample 2: 0.3 -> 2.0 forget, 2.0 -> 0.4: 1 of 2
    np.testing.assert_array_equal(r["forgets"], [2, 0, 1])
    np.testing.assert_array_equal(r["transitions"], [3, 2, 2])
    np.testing.assert_allclose(r["memorization"], [2 / 3, 0, 0.5])
    # gain = d - last observed loss; excess = reference - last observed loss (sample 1: the gap
    # at t = 2 does not end its history, its last observation is 0.1 at t = 3)
    np.testing.assert_allclose(r["gain"], [1.55 - 2.0, 2.6 - 0.1, 0.3 - 0.4])
    np.testing.assert_allclose(reference.gain(L, burn_in=2), r["gain"])
    np.testing.assert_allclose(reference.excess(L, [1.0, 1.0, 1.0]), [-1.0, 0.9, 0.6])
    np.testing.assert_allclose(reference.excess(np.array([[np.nan], [np.nan]]), [2.0]), [np.nan])


def test_reference_select_hand_case():
    score = [0.5, np.nan, 0.5, 1.0, 0.5, np.nan]
    tiebreak = [1.0, 9.0, 3.0, 0.0, np.nan, 0.0]
    assert reference.selection_order(score, tiebreak).tolist() == [3, 2, 0, 4, 1, 5]
    assert reference.select(score, 0.5, tiebreak).tolist() == [3, 2, 0]
    assert reference.select(score, 1.0).tolist() == [3, 0, 2, 4, 1, 5]
    assert gdc_ext.selection_order(torch.tensor(score), torch.tensor(tiebreak)).tolist() == [3, 2, 0, 4, 1, 5]


def test_unscored_have_no_gain():
    L = np.array([[np.nan, 1.0], [2.0, 0.5]])  # sample 0 first seen after burn-in (epoch 1)
    assert np.isnan(reference.gain(L, burn_in=1)[0]) and reference.gain(L, burn_in=1)[1] == 0.5
    assert reference.excess(L, [3.0, 3.0]).tolist() == [1.0, 2.5]  # excess needs only a last loss
