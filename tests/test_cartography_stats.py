"""The cartography group (csrc/state_stats.def; docs/method.md, "Data cartography"): each token's
p(y) and argmax correctness, computed by the fused kernels in their one pass over the logits (and
given to record() for other losses), folded by end_epoch into confidence, variability,
correctness, token accuracy, forgetting events and the first learnt epoch, equal the NumPy
reference's T x N definitions (python/gdc_ext/reference.py) on random histories, for CartoLoss,
the in-place kernel, the fused linear op and record(), with per-sequence and per-token ids and
ties in the argmax."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import gdc_ext
from gdc_ext import CartoLoss, CartoState, layout, ops, reference

TOL = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
PATHS = ("loss", "inplace", "linear", "record")


@st.composite
def histories(draw):
    """A random history: N samples, V classes, T epochs of (B, L) batches, a path into the state,
    and logits that are small integers (many ties in the argmax) or random reals."""
    path = draw(st.sampled_from(PATHS))
    dtypes = [torch.float32, torch.float64] if path == "linear" else [torch.float32, torch.bfloat16, torch.float16]
    epochs = []
    for _ in range(draw(st.integers(1, 6))):
        epochs.append([(draw(st.integers(1, 4)), draw(st.integers(1, 4))) for _ in range(draw(st.integers(0, 3)))])
    return dict(N=draw(st.integers(1, 10)), V=draw(st.integers(2, 12)), epochs=epochs, path=path,
                per_token=draw(st.booleans()), ties=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _logits(h, R, g):
    """[R, V] logits (float64 values exact in the history's dtype) and, on the linear path, the
    integer hidden states and weight whose product they are (exact in float32 too)."""
    V = h["V"]
    if h["path"] == "linear":
        x = torch.randint(-2, 3, (R, 3), generator=g).double()
        w = torch.randint(-2, 3, (V, 3), generator=g).double()
        return x @ w.T, x, w
    if h["ties"]:
        z = torch.randint(-3, 4, (R, V), generator=g).double()
    else:
        z = torch.randn(R, V, generator=g).double() * float(torch.rand((), generator=g) * 6)
    return z.to(h["dtype"]).double(), None, None


def run_history(h, device="cpu"):
    """Trains through history ``h`` on its path into a cartography state; returns the state and
    per epoch the (token ids, p(y)) and (token ids, correct) batches of the reference."""
    g = torch.Generator().manual_seed(h["seed"])
    N, V = h["N"], h["V"]
    state = CartoState(N, burn_in=2, eps=1.0, device=device, cartography=True)
    loss_fn = CartoLoss(state=state, inplace_grad=h["path"] == "inplace")
    hist_p, hist_c = [], []
    for batches in h["epochs"]:
        ep_p, ep_c = [], []
        for B, L in batches:
            R = B * L
            z, x, w = _logits(h, R, g)
            target = torch.randint(0, V, (R,), generator=g)
            target[torch.rand(R, generator=g) < 0.2] = -100
            ids = torch.randint(0, N, (R if h["per_token"] else B,), generator=g)
            tok_ids = ids if h["per_token"] else ids.repeat_interleave(L)
            keep = (target != -100).numpy()
            p, c = reference.token_p_correct(z.numpy()[keep], target.numpy()[keep])
            dev = lambda t: t.to(device)  # noqa: E731
            if h["path"] == "linear":
                xd = dev(x.to(h["dtype"])).requires_grad_()
                gdc_ext.linear_cross_entropy(xd, dev(w.to(h["dtype"])), dev(target), dev(ids), state=state,
                                             chunk_size=int(torch.randint(1, R + 1, (), generator=g))).backward()
            elif h["path"] == "record":
                nll, _ = reference.token_nll(z.numpy()[keep], target.numpy()[keep])
                state.record(torch.from_numpy(nll), torch.from_numpy(tok_ids.numpy()[keep]),
                             p_y=torch.from_numpy(p), correct=torch.from_numpy(c) > 0.5)
            else:
                loss_fn(dev(z.to(h["dtype"])).requires_grad_(), dev(target), dev(ids)).backward()
            ep_p.append((tok_ids.numpy()[keep], p))
            ep_c.append((tok_ids.numpy()[keep], c))
        hist_p.append(ep_p)
        hist_c.append(ep_c)
        with warnings.catch_warnings():  # random histories have empty epochs on purpose
            warnings.filterwarnings("ignore", message="CartoState.end_epoch: nothing was recorded")
            state.end_epoch()
    return state, hist_p, hist_c


def check_history(h, device):
    state, hist_p, hist_c = run_history(h, device)
    P = reference.loss_matrix(hist_p, h["N"])
    A = reference.loss_matrix(hist_c, h["N"])
    ref = reference.cartography_from_matrices(P, A)
    s = state.scores()
    for name in ("confidence", "variability", "accuracy_last", "first_learned"):
        np.testing.assert_allclose(getattr(s, name).numpy(), ref[name], err_msg=name, **TOL)
    for name in ("correctness", "forgetting", "never_learnt"):
        np.testing.assert_array_equal(getattr(s, name).numpy(), ref[name], err_msg=name)
    # the core statistics do not change with the group
    assert s.observed.tolist() == (~np.isnan(P)).sum(0).tolist()


@given(h=histories())
def test_kernels_and_record_equal_the_reference(h, device):
    check_history(h, device)


def test_each_path_once_with_ties_and_per_token_ids(device):
    """Every path with tied integer logits and packed (per-token) ids, deterministically."""
    for path in PATHS:
        dtype = torch.float64 if path == "linear" else torch.float32
        h = dict(N=4, V=5, epochs=[[(3, 4), (2, 3)]] * 4, path=path, per_token=True, ties=True, dtype=dtype, seed=3)
        check_history(h, device)


# ------------------------------------------------------------------------------- argmax ties
def _correct_recorded(logits, target, device, op="fwd"):
    """The per-row correctness the kernel records: one row per sample into a cartography acc."""
    R = logits.shape[0]
    groups = layout.CORE | layout.CARTOGRAPHY
    acc = torch.zeros(R, layout.widths(groups, 1)["acc"], dtype=torch.float64, device=device)
    args = (target.to(device), None, torch.arange(R, device=device), torch.empty(0, device=device),
            torch.ones(1, device=device), acc, -100, 0.0)
    if op == "fwd":
        ops.cross_entropy_fwd(logits.to(device), *args, True, groups)
    else:
        ops.cross_entropy_fwd_inplace(logits.to(device).clone(), *args, groups)
    return acc[:, layout.column("correct_sum", groups)].cpu(), acc[:, layout.column("p_sum", groups)].cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("op", ["fwd", "inplace"])
def test_argmax_ties_follow_torch_first_index(dtype, op, device):
    """Equal maxima: the target counts as correct only when it is the first of them, as
    torch.argmax returns, also when the tied logits lie in different 512-column chunks of the CPU
    kernel or different threads of the CUDA block, and at a row's first and last column."""
    V = 1300
    cases = [(0, [0, 1]), (1, [0, 1]), (5, [5]), (700, [3, 700]), (3, [3, 700]), (1299, [1299]),
             (1299, [0, 1299]), (0, [0, 1299]), (640, [640, 1100]), (1100, [640, 1100]), (2, [7])]
    z = torch.zeros(len(cases), V, dtype=torch.float64)
    target = torch.tensor([y for y, _ in cases])
    for r, (_, tops) in enumerate(cases):
        z[r] = torch.linspace(-3, 1, V, dtype=torch.float64).roll(r * 37)
        z[r, tops] = 4.0
    z = z.to(dtype)
    want = (z.double().argmax(1) == target).double()
    got, p = _correct_recorded(z, target, device, op)
    assert got.tolist() == want.tolist()
    assert want.tolist() == [1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0]
    p_ref = torch.softmax(z.double(), 1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-7)


def test_float64_logits_compare_in_float64():
    """Two float64 logits equal after rounding to float32 but not before: the argmax of the float64
    values decides (the kernel's float32 arithmetic must not create the tie)."""
    z = torch.tensor([[1.0, 1.0 + 1e-12, 0.0], [1.0 + 1e-12, 1.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    assert float(z[0, 0]) != float(z[0, 1]) and z.float()[0, 0] == z.float()[0, 1]
    got, _ = _correct_recorded(z, target, "cpu")
    assert got.tolist() == [1.0, 1.0]


def test_the_torch_fallback_records_the_same():
    """CartoLoss's torch fallback (class-probability targets aside: what the kernel does not take)
    adds the same p(y) and correctness as the kernel."""
    from gdc_ext import _fallback

    g = torch.Generator().manual_seed(1)
    z = torch.randint(-2, 3, (30, 6), generator=g).float()
    t = torch.randint(0, 6, (30,), generator=g)
    ids = torch.randint(0, 5, (30,), generator=g)
    a = CartoState(5, burn_in=1, eps=1.0, cartography=True)
    b = CartoState(5, burn_in=1, eps=1.0, cartography=True)
    CartoLoss(state=a)(z, t, ids)
    _fallback.record(b, z, t, ids, torch.ones(30, dtype=torch.bool))
    # the NLL (and so p(y)) within float32 rounding: the kernel computes it in float32, the
    # fallback in float64 and rounds it; the correct-token counts exactly
    torch.testing.assert_close(b.acc, a.acc, rtol=1e-6, atol=1e-6)
    c = layout.column("correct_sum", a.groups)
    assert b.acc[:, c].tolist() == a.acc[:, c].tolist() and a.acc[:, c].sum() > 0


# ---------------------------------------------------------------- the papers' own definitions
def _allenai_forgetfulness(correct_by_epoch):
    """Forgetfulness as Swayamdipta et al.'s code defines it (written from the definition): the
    times an example is predicted incorrectly after having been predicted correctly; an example
    never predicted correctly gets 1000 (their stand-in for the maximum)."""
    if not any(correct_by_epoch):
        return 1000
    learnt, forgotten = False, 0
    for ok in correct_by_epoch:
        if learnt and not ok:
            forgotten += 1
        learnt = bool(ok)
    return forgotten


def _toneva_forgetting(acc_by_presentation):
    """Toneva et al. 2019: a forgetting event is acc_t > acc_{t+1} between consecutive
    presentations; an example never learnt has infinitely many."""
    if not any(acc_by_presentation):
        return float("inf")
    return sum(1 for a, b in zip(acc_by_presentation[:-1], acc_by_presentation[1:]) if a > b)


def test_classifier_dynamics_match_the_papers_definitions():
    """An MLP on a 5-class Gaussian mixture with 10% flipped labels, 12 epochs of shuffled
    mini-batches, each sample once per epoch. The training dynamics (each sample's gold
    probability and argmax correctness in its training step, recorded here from the logits)
    give, by Swayamdipta et al.'s and Toneva et al.'s definitions, exactly the state's scores."""
    rng = np.random.default_rng(0)
    n, classes, dim, T = 300, 5, 6, 12
    centers = rng.normal(0, 1.2, (classes, dim))
    y = rng.integers(0, classes, n)
    x = torch.from_numpy((centers[y] + rng.normal(0, 1, (n, dim))).astype(np.float32))
    flipped = rng.random(n) < 0.1
    y[flipped] = (y[flipped] + rng.integers(1, classes, int(flipped.sum()))) % classes
    y = torch.from_numpy(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    state = CartoState(n, burn_in=2, eps=1.0, cartography=True)
    loss_fn = CartoLoss(state=state)
    p_gold, correct = np.zeros((T, n)), np.zeros((T, n), dtype=bool)
    for t in range(T):
        for batch in torch.randperm(n).split(32):
            logits = model(x[batch])
            p_gold[t, batch.numpy()] = torch.softmax(logits.detach().double(), 1)[torch.arange(len(batch)),
                                                                                  y[batch]].numpy()
            correct[t, batch.numpy()] = (logits.detach().argmax(1) == y[batch]).numpy()
            opt.zero_grad()
            loss_fn(logits, y[batch], batch).backward()
            opt.step()
        state.end_epoch()
    s = state.scores()
    np.testing.assert_allclose(s.confidence.numpy(), p_gold.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.variability.numpy(), p_gold.std(0), rtol=1e-5, atol=1e-6)
    assert s.correctness.tolist() == correct.sum(0).tolist()
    assert s.accuracy_last.tolist() == correct[-1].astype(float).tolist()
    ours = np.where(s.never_learnt.numpy(), 1000, s.forgetting.numpy())
    assert ours.tolist() == [_allenai_forgetfulness(correct[:, i]) for i in range(n)]
    toneva = np.array([_toneva_forgetting(correct[:, i].astype(int)) for i in range(n)])
    assert np.where(s.never_learnt.numpy(), np.inf, s.forgetting.numpy()).tolist() == toneva.tolist()
    first = [float(np.argmax(correct[:, i]) + 1) if correct[:, i].any() else np.nan for i in range(n)]
    np.testing.assert_array_equal(s.first_learned.numpy(), first)
    # the dynamics are not trivial: forgetting events, never-learnt (flipped) samples, and
    # flipped labels with a lower confidence than the others
    assert s.forgetting.sum() > 10 and 0 < int(s.never_learnt.sum()) < n
    assert s.confidence[flipped].mean() < 0.5 * s.confidence[~flipped].mean()


# --------------------------------------------------------------------------------- sequences
def test_a_sequence_is_learnt_when_every_token_is_correct():
    """Per-token ids: the epoch's token accuracy is the fraction of the sample's tokens whose
    argmax is the target; learnt (correctness, forgetting, first learnt) means all of them."""
    s = CartoState(2, burn_in=1, eps=1.0, cartography=True)
    loss = CartoLoss(state=s)
    good = torch.tensor([[5.0, 0.0, 0.0]])
    bad = torch.tensor([[0.0, 5.0, 0.0]])
    ids = torch.tensor([0, 0, 0, 1, 1])
    target = torch.zeros(5, dtype=torch.long)
    for rows in ([good, good, good, good, good], [good, bad, good, good, good], [good, good, good, good, bad]):
        loss(torch.cat(rows), target, ids)
        s.end_epoch()
    sc = s.scores()
    assert sc.correctness.tolist() == [2, 2]  # 0: learnt, not (one bad token), learnt; 1: learnt twice, then not
    assert sc.forgetting.tolist() == [1, 1]
    assert sc.first_learned.tolist() == [1.0, 1.0]
    np.testing.assert_allclose(sc.accuracy_last.numpy(), [1.0, 0.5])
    assert not sc.never_learnt.any()


def test_hand_computed_cartography():
    """cartography_from_matrices on a history worked out by hand (NaN: not observed)."""
    nan = np.nan
    P = np.array([[0.2, 0.9, nan], [0.6, 0.8, 0.1], [0.4, nan, 0.3], [0.8, 0.7, nan]])
    A = np.array([[0.0, 1.0, nan], [1.0, 1.0, 0.5], [0.5, nan, 0.0], [1.0, 0.0, nan]])
    r = reference.cartography_from_matrices(P, A)
    np.testing.assert_allclose(r["confidence"], [0.5, 0.8, 0.2])
    np.testing.assert_allclose(r["variability"], [np.sqrt(0.05), np.sqrt(2 / 300), 0.1])
    assert r["correctness"].tolist() == [2, 2, 0]
    # sample 0: 0 -> 1 -> 0.5 (forgotten) -> 1; sample 1: 1 -> 1 (gap) -> 0: forgotten at t = 4
    assert r["forgetting"].tolist() == [1, 1, 0]
    assert r["never_learnt"].tolist() == [False, False, True]
    np.testing.assert_array_equal(r["first_learned"], [2.0, 1.0, nan])
    np.testing.assert_allclose(r["accuracy_last"], [1.0, 0.0, 0.0])


# --------------------------------------------------------------------------------- record()
def test_record_weights_p_y_and_correct_by_the_counts():
    """A per-sample mean over n tokens counts as n rows: p_y and correct (a fraction) too."""
    s = CartoState(3, burn_in=1, eps=1.0, cartography=True)
    s.record(torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 0, 2]), counts=torch.tensor([3.0, 1.0, 2.0]),
             p_y=torch.tensor([0.6, 0.2, 0.1]), correct=torch.tensor([1.0, 0.0, 0.5]))
    s.end_epoch()
    sc = s.scores()
    np.testing.assert_allclose(sc.confidence.numpy(), [(3 * 0.6 + 0.2) / 4, np.nan, 0.1], equal_nan=True)
    np.testing.assert_allclose(sc.accuracy_last.numpy(), [0.75, np.nan, 0.5], equal_nan=True)
    assert sc.correctness.tolist() == [0, 0, 0] and sc.never_learnt.tolist() == [True, False, True]


@pytest.mark.parametrize("bad, match", [
    (dict(p_y=None), "p_y: this state keeps the cartography statistics"),
    (dict(correct=None), "correct: this state keeps"),
    (dict(p_y=torch.tensor([0.5, 1.5])), r"p_y\[1\] = 1.5: expected a value in \[0, 1\]"),
    (dict(p_y=torch.tensor([float("nan"), 0.5])), r"p_y\[0\] = nan"),
    (dict(correct=torch.tensor([-1.0, 1.0])), r"correct\[0\] = -1.0"),
    (dict(correct=torch.tensor([1.0, 0.0, 1.0])), "correct must have the shape of losses"),
])
def test_record_refuses_bad_p_y_and_correct(bad, match):
    s = CartoState(3, burn_in=1, eps=1.0, cartography=True)
    before = s.acc.clone()
    kw = dict(p_y=torch.tensor([0.5, 0.25]), correct=torch.tensor([True, False]))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        s.record(torch.tensor([0.7, 1.4]), torch.tensor([0, 1]), **kw)
    assert torch.equal(s.acc, before)


def test_record_refuses_p_y_for_a_state_without_the_group():
    s = CartoState(3, burn_in=1, eps=1.0)
    with pytest.raises(ValueError, match=r"p_y: this state does not keep the cartography statistics; build it with "
                                         r"CartoState\(\.\.\., cartography=True\)"):
        s.record(torch.tensor([0.7]), torch.tensor([0]), p_y=torch.tensor([0.5]))


def test_a_skipped_row_is_not_read():
    """A count of 0 skips its row: its p_y and correct are not checked either (padding)."""
    s = CartoState(2, burn_in=1, eps=1.0, cartography=True)
    s.record(torch.tensor([0.7, 9.0]), torch.tensor([0, 5]), counts=torch.tensor([1.0, 0.0]),
             p_y=torch.tensor([0.5, float("nan")]), correct=torch.tensor([1.0, 7.0]))
    assert s.acc[0, layout.column("p_sum", s.groups)] == 0.5 and s.acc[1].abs().sum() == 0


# ------------------------------------------------------------------ group, bytes, errors, files
def test_bytes_per_sample_and_columns():
    """The group costs 34 bytes per sample (16 accumulator, 12 float32, 6 int16); the default state
    stays within 32."""
    N = 1000
    for extras in (False, True):
        base = CartoState(N, burn_in=2, eps=1.0, extras=extras).nbytes()
        assert CartoState(N, burn_in=2, eps=1.0, extras=extras, cartography=True).nbytes() - base == 34 * N
    assert CartoState(N, burn_in=2).nbytes() / N <= 32
    assert layout.bytes_per_sample(layout.CORE | layout.CARTOGRAPHY, 1) - layout.bytes_per_sample(layout.CORE, 1) == 34
    s = gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=1.0, cartography=True).state
    assert s.cartography and s.groups == layout.CORE | layout.CARTOGRAPHY


@pytest.mark.parametrize("column", ["confidence", "variability", "correctness", "accuracy_last", "forgetting",
                                    "never_learnt", "first_learned"])
def test_reading_a_cartography_column_without_the_group_says_how_to_enable_it(column):
    s = CartoState(3, burn_in=1, eps=1.0, extras=True)
    s.record(torch.tensor([0.5]), torch.tensor([0]))
    s.end_epoch()
    sc = s.scores()
    assert not sc.has(column) and sc.has("loss_mean")
    with pytest.raises(ValueError, match=rf"Scores\.{column} needs the cartography statistics.*cartography=True"):
        getattr(sc, column)
    # what Scores.confidence was (exp(-mean loss)) keeps a name that says what it is
    np.testing.assert_allclose(sc.geometric_confidence.numpy(), np.exp(-sc.loss_mean.numpy()), equal_nan=True)
    assert "confidence" not in sc.to_pandas() and "geometric_confidence" in sc.to_pandas()


def test_save_load_and_state_dict_keep_the_group(tmp_path):
    s = CartoState(4, burn_in=1, eps=[0.5, 1.0], cartography=True)
    loss = CartoLoss(state=s)
    for _ in range(3):
        loss(torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.arange(8) % 4)
        s.end_epoch()
    s.save(tmp_path / "s.gdc")
    t = CartoState.load(tmp_path / "s.gdc")
    assert t.cartography and not t.extras
    for name, x in s.tensors().items():
        assert torch.equal(getattr(t, name), x), name
    frame = t.scores().to_pandas()
    for col in ("confidence", "variability", "correctness", "forgetting", "never_learnt", "first_learned"):
        assert col in frame
    with pytest.raises(ValueError, match="cartography is True in the saved state but False in this CartoState"):
        CartoState(4, burn_in=1, eps=[0.5, 1.0]).load_state_dict(s.state_dict())
    u = CartoState(4, burn_in=1, eps=[0.5, 1.0], cartography=True)
    u.load_state_dict(s.state_dict())
    assert torch.equal(u.istats, s.istats)
    bad = s.state_dict()
    bad["istats"][0, layout.column("learnt", s.groups)] = 99
    with pytest.raises(ValueError, match="cartography counters out of order"):
        u.load_state_dict(bad)


def test_compiled_step_records_what_eager_records():
    """torch.compile(fullgraph=True) of a step with a cartography state adds the same p(y) and
    correct-token sums as eager (the fakes follow the layout)."""
    V, N = 7, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, V, generator=g)
    t = torch.randint(0, V, (12,), generator=g)
    ids = torch.randint(0, N, (12,), generator=g)
    accs = []
    for compiled in (False, True):
        s = CartoState(N, burn_in=1, eps=1.0, cartography=True)
        loss = CartoLoss(state=s)

        def step(z, y, i, loss=loss):
            return loss(z * 2.0, y, i)

        fn = torch.compile(step, fullgraph=True) if compiled else step
        fn(x.clone().requires_grad_(), t, ids).backward()
        accs.append(s.acc.clone())
    torch.testing.assert_close(accs[1], accs[0], rtol=1e-6, atol=1e-6)
    assert accs[0][:, layout.column("correct_sum", layout.CORE | layout.CARTOGRAPHY)].sum() > 0
