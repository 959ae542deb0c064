"""Helpers shared by several test files (test files never import each other)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, strategies as st
from torch import nn

from gdc_ext import CartoLoss, CartoState, reference
from gdc_ext.layout import ACC_COLS, ACC_COUNT

__all__ = ["require_cuda_kernels", "ce_args", "loss_and_grad", "histories", "run_history",
           "check_streaming_equals_reference", "TinyLM", "check_compile_matches_eager",
           "TokenData", "lm_batch", "HANG_GUARD_S", "STORAGE_TOLERANCE", "storage_atol", "near_threshold",
           "assert_within_storage_tolerance"]

# The timeout of a test's subprocess: a guard against a hang only, never a speed limit (a loaded
# CI machine can take minutes to import torch in a fresh interpreter).
HANG_GUARD_S = 1800


def require_cuda_kernels() -> None:
    """Fails (not skips) a CUDA test when a device is present but the CUDA kernels were not built."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("gdc::cross_entropy_fwd", "CUDA"):
        pytest.fail("a CUDA device is present but gdc_ext was built without CUDA kernels: "
                    "rebuild with GDC_CUDA=ON (see scripts/gpu_check.sh)")


# ------------------------------------------------------------------------- storage tolerance
# The compact state keeps float32 statistics (docs/method.md, "Storage"): every float score of a
# sample is within STORAGE_TOLERANCE * n_i * max_t |L[t, i]| of the float64 reference, n_i its
# observed epochs (each fold rounds once to float32, relative error <= 2**-24; measured worst case
# 0.99 of n_i * 2**-24 * max|L|, so 2**-23 leaves a factor 2).
STORAGE_TOLERANCE = 2.0 ** -23


def storage_atol(L: np.ndarray) -> np.ndarray:
    """[N] absolute tolerance of each sample's float scores given the T x N loss matrix ``L``."""
    L = np.asarray(L, dtype=np.float64).reshape(-1, np.shape(L)[-1])
    seen = ~np.isnan(L)
    n = seen.sum(0)
    m = np.where(seen, np.abs(np.nan_to_num(L)), 0.0).max(0) if L.shape[0] else np.zeros(L.shape[1])
    return STORAGE_TOLERANCE * n * m


def near_threshold(L: np.ndarray, eps) -> bool:
    """Whether a per-epoch loss lies within float32 rounding (2**-20 relative) of a threshold, where
    the float32 last loss may decide a forget event differently from the float64 reference."""
    vals = np.asarray(L, dtype=np.float64)
    vals = vals[~np.isnan(vals)][:, None]
    e = np.atleast_1d(np.asarray(eps, dtype=np.float64))[None]
    return bool(np.any(np.abs(vals - e) <= 2.0 ** -20 * e))


def assert_within_storage_tolerance(got: np.ndarray, want: np.ndarray, L: np.ndarray, name: str = "") -> None:
    """``got`` equals ``want`` (NaN where it is NaN) within :func:`storage_atol` per sample."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pattern")
    ok = ~np.isnan(want)
    atol = storage_atol(L)
    gap = np.abs(got - want)[ok]
    assert np.all(gap <= atol[ok]), f"{name}: {gap.max()} beyond the storage tolerance {atol[ok][np.argmax(gap)]}"


# --------------------------------------------------------------------------------- op arguments
def ce_args(R=12, V=37, recording=True, weighted=True, dtype=torch.float32, device="cpu"):
    """(logits [R, V], target [R] with one ignored row, ids [R] or empty, sample_weight [5] or
    empty, acc [5, ACC_COLS] or empty) for gdc::cross_entropy_fwd over N = 5 samples."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(R, V, generator=g).to(dtype)
    target = torch.randint(0, V, (R,), generator=g)
    target[3] = -100
    ids = torch.randint(0, 5, (R,), generator=g) if (recording or weighted) else torch.empty(0, dtype=torch.long)
    sw = torch.rand(5, generator=g) if weighted else torch.empty(0)
    acc = torch.zeros(5, ACC_COLS, dtype=torch.float64) if recording else torch.empty(0, ACC_COLS, dtype=torch.float64)
    return tuple(t.to(device) for t in (logits, target, ids, sw, acc))


def loss_and_grad(loss_fn, x, t, **kw):
    """(loss, d(loss * g)/dx) for a fixed random upstream gradient g (1.7 for a scalar loss)."""
    x = x.clone().requires_grad_()
    out = loss_fn(x, t, **kw)
    gen = torch.Generator().manual_seed(123)
    g = (torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device) if out.dim()
         else torch.tensor(1.7, dtype=out.dtype, device=out.device))
    (out * g).sum().backward()
    return out.detach(), x.grad


# ------------------------------------------------------------------------- training histories
@st.composite
def histories(draw):
    """A random training history: N samples, V classes, T epochs of (B, L) batches, K eps."""
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


def run_history(h, device="cpu"):
    """Trains through history `h` with CartoLoss; returns the state and, per epoch, the
    (ids, NLL) and (ids, energy) batches of the non-ignored tokens for the reference."""
    g = torch.Generator().manual_seed(h["seed"])
    N, V = h["N"], h["V"]
    state = CartoState(N, burn_in=h["burn_in"], eps=h["eps"], device=device, extras=True)
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
        with warnings.catch_warnings():  # random histories have empty epochs on purpose
            warnings.filterwarnings("ignore", message="CartoState.end_epoch: nothing was recorded")
            state.end_epoch()
    return state, hist_loss, hist_energy


def check_streaming_equals_reference(h, device="cpu"):
    """The streaming scores of history `h` (fused kernel + end_epoch on `device`) equal the
    NumPy reference's, for every tracked eps."""
    state, hist_loss, hist_energy = run_history(h, device)
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
    ref_m = np.asarray(ref["memorization"]).reshape(h["N"], -1)
    ref_f = np.asarray(ref["forgets"]).reshape(h["N"], -1)
    for k, e in enumerate(np.atleast_1d(h["eps"])):  # the shape-stable accessors, per threshold
        np.testing.assert_allclose(s.memorization_at(float(e)).numpy(), ref_m[:, k], **tol)
        np.testing.assert_array_equal(s.forgets_at(float(e)).numpy(), ref_f[:, k])
    for key in ("last_loss", "min_loss", "loss_mean", "loss_std"):
        np.testing.assert_allclose(getattr(s, key).numpy(), ref[key], **tol)
    np.testing.assert_allclose(s.grad_energy.numpy(), reference.energy_totals(hist_energy, h["N"]),
                               rtol=1e-4, atol=1e-4)
    assert s.epoch == len(h["epochs"])


# ------------------------------------------------------------------------------- torch.compile
class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def check_compile_matches_eager(inplace: bool, device: str = "cpu") -> None:
    """A model step with CartoLoss under torch.compile(fullgraph=True) gives eager's loss,
    gradients and recorded accumulators."""
    torch.manual_seed(0)
    V, B, L, N = 50, 4, 6, 8
    tokens = torch.randint(0, V, (B, L + 1)).to(device)
    ids = torch.tensor([1, 5, 2, 7], device=device)

    def run(compiled):
        torch.manual_seed(1)
        model = TinyLM(V).to(device)
        state = CartoState(N, burn_in=1, eps=1.0, device=device)
        loss_fn = CartoLoss(state=state, inplace_grad=inplace)

        def step(x, y, sid):
            logits = model(x).reshape(-1, V)
            return loss_fn(logits, y.reshape(-1), sid)

        fn = torch.compile(step, fullgraph=True) if compiled else step
        loss = fn(tokens[:, :-1], tokens[:, 1:], ids)
        loss.backward()
        loss = loss.detach()
        grads = [p.grad.clone() for p in model.parameters()]
        return loss, grads, state.acc.clone()

    l0, g0, a0 = run(False)
    l1, g1, a1 = run(True)
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The accumulators are float64 sums of float32 NLLs: compare at float32's precision (the
    # compiled logits may differ from eager by an ulp on CUDA, where inductor generates the code).
    torch.testing.assert_close(a1, a0, rtol=1.3e-6, atol=1e-5)
    assert a0[ids, ACC_COUNT].tolist() == [L] * B


# ------------------------------------------------------------------ language-model data (HF tests)
class TokenData(torch.utils.data.Dataset):
    """n random token sequences [length] over ``vocab`` ids (seed 0); item i is
    {"input_ids": [length] int64, "sample_ids": i}."""

    def __init__(self, n: int, length: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "sample_ids": i}


def lm_batch(features) -> dict:
    """Stacks TokenData items into input_ids [B, L] and labels [B, L] (the inputs, with the last
    token ignored (-100) as padding would be)."""
    x = torch.stack([f["input_ids"] for f in features])
    labels = x.clone()
    labels[:, -1] = -100
    return {"input_ids": x, "labels": labels}
