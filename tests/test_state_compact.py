"""The compact state against the float64 NumPy reference: float32 statistics within the stated
tolerance (docs/method.md, "Storage"), identical selections (quadrants, prune order), int16
counters refused before they overflow, states of format versions 1 and 2 converted on load, and
Scores computing only the columns that are read."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from helpers import assert_within_storage_tolerance, near_threshold, storage_atol

import gdc_ext
from gdc_ext import CartoState, layout, reference
from gdc_ext.state import MAX_RECORD_LOSS

DATA = os.path.join(os.path.dirname(__file__), "data")


# ------------------------------------------------------------------------------ vs the reference
@st.composite
def streams(draw):
    """Per-sample losses of any model recorded over T epochs: scales from 1e-3 to 1e3 nats,
    sometimes signed (record() takes any finite loss), sometimes rounded (ties)."""
    N = draw(st.integers(1, 10))
    T = draw(st.integers(1, 9))
    burn_in = draw(st.integers(1, 5))
    eps = sorted(draw(st.lists(st.floats(0.05, 5.0), min_size=1, max_size=3, unique=True)))
    scale = draw(st.sampled_from([1e-3, 0.3, 1.0, 4.0, 1e3]))
    signed = draw(st.booleans())
    rounded = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    batches = [draw(st.integers(0, 3)) for _ in range(T)]
    return dict(N=N, burn_in=burn_in, eps=eps, scale=scale, signed=signed, rounded=rounded, seed=seed,
                batches=batches)


def _run(h):
    rng = np.random.default_rng(h["seed"])
    N = h["N"]
    state = CartoState(N, burn_in=h["burn_in"], eps=h["eps"], extras=True)
    history = []
    for n_batches in h["batches"]:
        ep = []
        for _ in range(n_batches):
            B = int(rng.integers(1, 7))
            ids = rng.integers(0, N, B)
            losses = rng.random(B) * h["scale"] * (rng.choice([-1.0, 1.0], B) if h["signed"] else 1.0)
            if h["rounded"]:
                losses = np.round(losses, 1)
            state.record(torch.from_numpy(losses), torch.from_numpy(ids))
            ep.append((ids, losses))
        history.append(ep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # epochs that recorded nothing warn
            state.end_epoch()
    return state, reference.loss_matrix(history, N)


@given(streams())
@settings(max_examples=300)
def test_scores_within_the_storage_tolerance_of_the_float64_reference(h):
    """Every float score within STORAGE_TOLERANCE * n_i * max_t |L[t, i]| (2**-23 per observed
    epoch, relative to the sample's largest loss) of the reference; counters exact unless a loss
    lies within float32 rounding of a threshold."""
    state, L = _run(h)
    assume(not near_threshold(L, h["eps"]))
    ref = reference.scores_from_matrix(L, h["burn_in"], h["eps"])
    s = state.scores()
    for name in ("difficulty", "last_loss", "min_loss", "loss_mean", "loss_std", "gain"):
        assert_within_storage_tolerance(getattr(s, name).numpy(), ref[name], L, name)
    for name in ("forgets", "transitions", "observed"):
        np.testing.assert_array_equal(getattr(s, name).numpy().reshape(np.shape(ref[name])), ref[name], err_msg=name)
    np.testing.assert_array_equal(s.memorization_by_eps.numpy(), np.asarray(ref["memorization"]).reshape(h["N"], -1))


def _separated(values: np.ndarray, atol: np.ndarray, L: np.ndarray) -> bool:
    """Whether the finite values differ pairwise by more than twice their tolerance, so that
    float32 rounding can neither merge nor swap them. Equal values count as separated only for
    samples with identical loss histories (which the compact state scores identically too: equal
    float64 values reached by different sums need not stay equal, in float32 or in float64)."""
    ok = np.flatnonzero(np.isfinite(values))
    for a_i, i in enumerate(ok):
        for j in ok[a_i + 1:]:
            gap = abs(values[i] - values[j])
            same_history = np.array_equal(L[:, i], L[:, j], equal_nan=True)
            if not same_history and gap <= 2 * (atol[i] + atol[j]):
                return False
    return True


@given(streams(), st.sampled_from([0.25, 0.5, 0.75]), st.sampled_from([0.1, 0.3, 0.5]))
@settings(max_examples=300)
def test_selections_equal_the_float64_references(h, alpha, fraction):
    """Quadrants and the prune selection (by memorization, gain, loss and last) of the compact
    state equal those computed from the float64 reference's scores, when distinct scores are
    farther apart than the storage tolerance (ties: see _separated)."""
    state, L = _run(h)
    assume(not near_threshold(L, h["eps"]))
    ref = reference.scores_from_matrix(L, h["burn_in"], h["eps"])
    s = state.scores()
    atol = storage_atol(L)
    d_ref = ref["difficulty"]
    last_ref = reference.last_observed(L)
    assume(_separated(d_ref, atol, L) and _separated(ref["gain"], 2 * atol, L) and _separated(last_ref, atol, L))
    m_ref = np.asarray(ref["memorization"]).reshape(h["N"], -1)[:, 0]
    codes_ref, _ = reference.quadrants(d_ref, m_ref, alpha, alpha)
    assert s.quadrants(alpha, alpha).codes.numpy().tolist() == codes_ref.tolist()
    unscored = np.isnan(d_ref)
    for by, spec in (("memorization", np.where(unscored, np.nan, m_ref)), ("gain", ref["gain"]), ("loss", d_ref),
                     ("last", np.where(unscored, np.nan, -last_ref))):
        kept = gdc_ext.prune(s, fraction, by=by).tolist()
        removed = reference.select(spec, fraction, d_ref)
        assert sorted(set(range(h["N"])) - set(removed.tolist())) == kept, by


# ------------------------------------------------------------------------------ saturation
def test_end_epoch_refuses_to_overflow_the_int16_counters():
    """A state that has folded MAX_EPOCHS epochs refuses the next one, changing nothing (its
    counters could otherwise wrap to negative values)."""
    s = CartoState(3, burn_in=1, eps=0.5)
    s.epoch.fill_(layout.MAX_EPOCHS - 1)
    s.istats[:, layout.I_OBSERVED] = layout.MAX_EPOCHS - 1
    s.record(torch.tensor([1.0, 0.2]), torch.tensor([0, 1]))
    s.end_epoch()  # the last epoch that fits
    assert s.epochs_done == layout.MAX_EPOCHS and int(s.istats[0, layout.I_OBSERVED]) == layout.MAX_EPOCHS
    s.record(torch.tensor([1.0]), torch.tensor([0]))
    before = {k: v.clone() for k, v in s.tensors().items()}
    with pytest.raises(ValueError, match="int16 counters.*nothing was changed"):
        s.end_epoch()
    with pytest.raises(ValueError, match="int16 counters"):  # the kernel refuses too (direct op callers)
        torch.ops.gdc.end_epoch_(s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps, 1, s.groups)
    for k, v in s.tensors().items():
        assert torch.equal(v, before[k]), k


def test_record_refuses_losses_beyond_the_float32_statistics():
    s = CartoState(2, burn_in=1, eps=0.5)
    with pytest.raises(ValueError, match="MAX_RECORD_LOSS"):
        s.record(torch.tensor([1.0, -2 * MAX_RECORD_LOSS], dtype=torch.float64), torch.tensor([0, 1]))
    assert not s.acc.any()
    s.record(torch.tensor([MAX_RECORD_LOSS, -MAX_RECORD_LOSS], dtype=torch.float64), torch.tensor([0, 1]))
    s.end_epoch()
    assert torch.isfinite(s.fstats).all()


def test_load_refuses_counters_beyond_the_epochs():
    s = CartoState(3, burn_in=1, eps=0.5)
    sd = s.state_dict()
    sd["istats"][0, layout.I_OBSERVED] = 1  # observed once, no epoch folded
    with pytest.raises(ValueError, match="counters"):
        s.load_state_dict(sd)
    sd = s.state_dict()
    sd["epoch"].fill_(layout.MAX_EPOCHS + 1)
    with pytest.raises(ValueError, match="epoch counter"):
        s.load_state_dict(sd)


# ------------------------------------------------------------------------------ format versions 1, 2
def _legacy_expected(name):
    with open(os.path.join(DATA, "legacy_states.json")) as fh:
        return json.load(fh)["scores"][name]


def _nan(values):
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@pytest.mark.parametrize("name", ["state_v2_extras", "state_v2_basic", "state_v1_extras"])
def test_legacy_file_loads_converted_with_its_scores(name):
    """Files written by gdc_ext before the compact layout (tests/data, written by commit 776d1c5):
    loaded into the compact layout; the accumulator exactly, the counters exactly, the float
    scores within float32 rounding of what that gdc_ext computed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # version 1: no checksum
        s = CartoState.load(os.path.join(DATA, name + ".safetensors"))
    exp = _legacy_expected(name)
    assert s.extras == (exp["min_loss"] is not None)
    assert s.acc.tolist() == [row[:layout.widths(s.groups, 1)["acc"]] for row in exp["acc"]]
    sc = s.scores()
    for f in ("forgets_by_eps", "transitions", "observed"):
        assert getattr(sc, f).double().reshape(-1).tolist() == exp[f], f
    for f in ("difficulty", "memorization_by_eps", "last_loss", "min_loss", "loss_mean", "loss_std", "grad_energy"):
        got = getattr(sc, f)
        if exp[f] is None:
            assert got is None, f
            continue
        np.testing.assert_allclose(got.reshape(-1).numpy(), _nan(exp[f]), rtol=2 ** -22, atol=1e-30, err_msg=f)
    # it goes on: one more epoch, saved as version 3
    s.record(torch.ones(s.num_samples, dtype=torch.float64), torch.arange(s.num_samples))
    s.end_epoch()
    assert s.state_dict()["meta"]["version"] == 3


def test_legacy_checkpoint_state_dict_loads():
    """A Hugging Face / Lightning checkpoint of that gdc_ext holds its state_dict (version 2 meta,
    float64 / int32 tensors): load_state_dict converts it like a file."""
    from safetensors import safe_open

    path = os.path.join(DATA, "state_v2_extras.safetensors")
    with safe_open(path, framework="pt") as fh:
        meta = json.loads(fh.metadata()["gdc_ext"])
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta["version"] == 2 and sd["istats"].dtype == torch.int32
    s = CartoState(meta["num_samples"], burn_in=meta["burn_in"], eps=meta["eps"], extras=True)
    s.load_state_dict({**sd, "meta": meta})
    ref = CartoState.load(path)
    for k, v in ref.tensors().items():
        assert torch.equal(v, s.tensors()[k]), k
    # a damaged one (transitions that are not observed - 1) is refused, changing nothing
    bad = dict(sd, istats=sd["istats"].clone())
    bad["istats"][0, 2] += 1
    before = {k: v.clone() for k, v in s.tensors().items()}
    with pytest.raises(ValueError, match="transitions"):
        s.load_state_dict({**bad, "meta": meta})
    big = dict(sd, istats=sd["istats"].clone())
    big["istats"][0, 1], big["istats"][0, 2] = 40000, 39999
    with pytest.raises(ValueError, match="int16"):
        s.load_state_dict({**big, "meta": meta})
    for k, v in s.tensors().items():
        assert torch.equal(v, before[k]), k
    # without extras in the new state: the extras of the old one are a mismatch, named
    with pytest.raises(ValueError, match="extras"):
        CartoState(meta["num_samples"], burn_in=meta["burn_in"], eps=meta["eps"]).load_state_dict({**sd, "meta": meta})


def test_version_3_file_with_foreign_columns_is_refused(tmp_path):
    s = CartoState(4, burn_in=1, eps=0.5)
    sd = s.state_dict()
    meta = dict(sd.pop("meta"))
    meta["columns"] = dict(meta["columns"], fstats=["diff_sum", "last", "new_statistic"])
    with pytest.raises(ValueError, match="columns"):
        s.load_state_dict({**sd, "meta": meta})


# ------------------------------------------------------------------------------ lazy Scores
def _trained(N=50, extras=True):
    s = CartoState(N, burn_in=2, eps=[0.5, 2.0], extras=extras)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        s.record(torch.rand(3 * N, generator=g, dtype=torch.float64) * 4, torch.randint(0, N, (3 * N,), generator=g))
        s.end_epoch()
    return s


def test_scores_compute_only_the_columns_read():
    s = _trained()
    sc = s.scores()
    assert sc._cols == {}
    gain = sc.gain  # straight from the snapshot: difficulty and last loss are not kept
    assert sc._cols == {}
    torch.testing.assert_close(gain, sc.difficulty - sc.last_loss, rtol=0, atol=0, equal_nan=True)
    assert set(sc._cols) == {"difficulty", "last_loss"}
    assert torch.equal(sc.scored, ~torch.isnan(sc.difficulty))


def test_scores_are_a_snapshot():
    s = _trained()
    sc = s.scores()
    s.record(torch.full((50,), 9.0, dtype=torch.float64), torch.arange(50))
    s.end_epoch()
    later = s.scores()
    assert sc.epoch == 4 and later.epoch == 5
    assert not torch.equal(sc.last_loss, later.last_loss)


@pytest.mark.parametrize("extras", [False, True])
def test_lazy_scores_equal_hand_built_ones(extras):
    """Scores from a state equal Scores built by hand from their columns, subsets included."""
    s = _trained(extras=extras)
    sc = s.scores()
    cols = {f: getattr(sc, f) for f in ("difficulty", "memorization_by_eps", "forgets_by_eps", "transitions",
                                         "observed", "last_loss", "min_loss", "loss_mean", "loss_std", "grad_energy")}
    assert (cols["loss_std"] is None) == (not extras) and (sc.geometric_confidence is None) == (not extras)
    hand = gdc_ext.Scores(**cols, eps=sc.eps, epoch=sc.epoch, burn_in=sc.burn_in)
    lazy = s.scores()
    assert repr(lazy) == repr(hand).replace(f"extras={extras}", f"extras={extras}")
    ids = torch.tensor([7, 0, 3, 3])
    for a, b in ((lazy, hand), (lazy.take(ids), hand.take(ids))):
        for f, t in cols.items():
            x, y = getattr(a, f), getattr(b, f)
            if t is None:
                assert x is None and y is None
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f)
        torch.testing.assert_close(a.gain, b.gain, rtol=0, atol=0, equal_nan=True)
        assert a.quadrants().codes.tolist() == b.quadrants().codes.tolist()
