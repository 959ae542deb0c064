"""Streaming scores (fused kernel + end_epoch) equal the NumPy reference that builds the T x N
matrix, on random training histories."""
import numpy as np
import torch
from hypothesis import assume, given, strategies as st

from gdc_ext import CartoLoss, CartoState, reference


@st.composite
def histories(draw):
    N = draw(st.integers(1, 12))
    V = draw(st.integers(2, 40))
    T = draw(st.integers(1, 6))
    burn_in = draw(st.integers(1, 8))  # shorter and longer than the run
    K = draw(st.integers(1, 3))
    eps = sorted(draw(st.lists(st.floats(0.2, 4.0), min_size=K, max_size=K, unique=True)))
    if K == 1 and draw(st.booleans()):
        eps = eps[0]  # a float eps: [N] memorization/forgets instead of [N, 1]
    per_token = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    epochs = []
    for _ in range(T):
        n_batches = draw(st.integers(0, 3))  # 0: an epoch where nothing is seen (gaps for all)
        batches = []
        for _ in range(n_batches):
            B = draw(st.integers(1, 4))
            L = draw(st.integers(1, 5))
            batches.append((B, L))
        epochs.append(batches)
    return dict(N=N, V=V, burn_in=burn_in, eps=eps, per_token=per_token, dtype=dtype, seed=seed, epochs=epochs)


def _run(h, device="cpu"):
    g = torch.Generator().manual_seed(h["seed"])
    N, V = h["N"], h["V"]
    state = CartoState(N, burn_in=h["burn_in"], eps=h["eps"], device=device)
    loss_fn = CartoLoss(state=state)
    hist_loss, hist_energy = [], []
    for batches in h["epochs"]:
        ep_l, ep_e = [], []
        for B, L in batches:
            # logit scale varies so that some samples are learnt (low loss) and some forgotten
            scale = float(torch.rand((), generator=g) * 8)
            logits = (torch.randn(B * L, V, generator=g) * scale).to(h["dtype"])
            target = torch.randint(0, V, (B * L,), generator=g)
            target[torch.rand(B * L, generator=g) < 0.2] = -100
            if h["per_token"]:  # packed rows: several documents per row, repeats allowed
                ids = torch.randint(0, N, (B * L,), generator=g)
                tok_ids = ids
            else:  # one id per sequence, shuffled, possibly repeated within the epoch
                ids = torch.randint(0, N, (B,), generator=g)
                tok_ids = ids.repeat_interleave(L)
            loss_fn(logits.to(device).requires_grad_(), target.to(device), ids.to(device)).backward()
            keep = (target != -100).numpy()
            nll, energy = reference.token_nll(logits.detach().float().numpy()[keep], target.numpy()[keep])
            ep_l.append((tok_ids.numpy()[keep], nll))
            ep_e.append((tok_ids.numpy()[keep], energy))
        hist_loss.append(ep_l)
        hist_energy.append(ep_e)
        state.end_epoch()
    return state, hist_loss, hist_energy


@given(histories())
def test_streaming_equals_reference(h):
    check_streaming_equals_reference(h)


def check_streaming_equals_reference(h, device="cpu"):
    """Shared with tests/test_cuda.py, which runs the same histories on a CUDA device."""
    state, hist_loss, hist_energy = _run(h, device)
    L = reference.loss_matrix(hist_loss, h["N"])
    # A loss within float32 rounding of a threshold could flip a forget event either way.
    assume(not np.any(np.abs(L[~np.isnan(L)][:, None] - np.atleast_1d(h["eps"])[None]) < 1e-4))
    ref = reference.scores_from_matrix(L, h["burn_in"], h["eps"])
    s = state.scores()
    tol = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(s.difficulty.numpy(), ref["difficulty"], **tol)
    np.testing.assert_array_equal(s.forgets.numpy(), ref["forgets"])
    np.testing.assert_array_equal(s.transitions.numpy(), ref["transitions"])
    np.testing.assert_array_equal(s.observed.numpy(), ref["observed"])
    np.testing.assert_allclose(s.memorization.numpy(), ref["memorization"], **tol)
    for key in ("last_loss", "min_loss", "loss_mean", "loss_std"):
        np.testing.assert_allclose(getattr(s, key).numpy(), ref[key], **tol)
    np.testing.assert_allclose(s.grad_energy.numpy(), reference.energy_totals(hist_energy, h["N"]),
                               rtol=1e-4, atol=1e-4)
    assert s.epoch == len(h["epochs"])


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
