"""Downstream of a sharded state: 1, 2 and 4 gloo ranks give the single process's quadrant
thresholds and codes, prune / top-k / flagged selections (same ties) and quantiles bit for bit,
without gathering per-sample values; the sharded sampler's draws are the same multiset whatever
the world size, balanced to equal lengths. The distributed selection primitives against NumPy's
own quantile and gdc_ext's top_k in one process (hypothesis)."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sharded_common import BURN_IN, EPS, N, run_sharded, run_single, run_world

import gdc_ext
from gdc_ext import ShardedCartoSampler, ShardedCartoState
from gdc_ext.cartography import flagged_ids, quantiles, score_values, top_k
from gdc_ext.sharded_selection import float_keys, kth_smallest, quantile, top_k_mask

EPOCHS = 4
REFERENCE = np.random.default_rng(5).random(N) * 3
BYS = ("memorization", "gain", "loss", "last", "excess", "relative_excess")
ALPHAS = ((0.75, 0.75), (0.5, 0.9), (0.0, 1.0), (0.3, 0.1))
FRACTIONS = (0.0, 0.05, 0.3, 1.0)


# ------------------------------------------------------------------------------------------ one process
values = st.lists(st.one_of(st.floats(allow_nan=False, width=64), st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0])),
                  min_size=1, max_size=40)


@given(values, st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.75, 0.25]), st.floats(0, 1)))
def test_quantile_equals_numpy(v, q):
    a = np.array(v)
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.quantile(a, q)
        got = quantile(a, q)
    assert got == want or (np.isnan(got) and np.isnan(want))


@given(values, st.floats(0, 1))
def test_percentile_route_equals_numpy(v, alpha):
    a = np.array(v)
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.percentile(a, 100 * alpha)
        got = quantile(a, np.true_divide(100 * alpha, 100))
    assert got == want or (np.isnan(got) and np.isnan(want))


def test_quantile_of_nothing_or_nan_is_nan():
    assert np.isnan(quantile(np.zeros(0), 0.5))
    assert np.isnan(quantile(np.array([1.0, np.nan]), 0.5))


@given(st.lists(st.integers(0, 2 ** 64 - 1), min_size=1, max_size=30), st.data())
def test_kth_smallest_equals_sorting(keys, data):
    a = np.array(keys, dtype=np.uint64)
    k = data.draw(st.integers(0, len(keys) - 1))
    assert kth_smallest(a, k) == int(np.sort(a)[k])


@given(st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=30))
def test_float_keys_keep_the_order(v):
    a = np.array(v)
    k = float_keys(a)
    i, j = np.meshgrid(np.arange(len(a)), np.arange(len(a)))
    assert np.array_equal(a[i] < a[j], k[i] < k[j])


@given(st.lists(st.one_of(st.sampled_from([np.nan, 0.0, 1.0, 1.0, 2.0, -0.0]), st.floats(-3, 3)), min_size=1,
                max_size=40),
       st.data())
def test_top_k_mask_equals_top_k(s, data):
    a = np.array(s)
    t = np.array(data.draw(st.lists(st.sampled_from([np.nan, 0.0, 1.0, 2.0]), min_size=len(s), max_size=len(s))))
    k = data.draw(st.integers(0, len(s) + 2))
    want = np.sort(top_k(torch.from_numpy(a), k, torch.from_numpy(t), ordered=False).numpy())
    assert np.array_equal(np.flatnonzero(top_k_mask(a, k, t)), want)


def test_sharded_scores_of_one_process_equal_cartography():
    state, _, _ = run_single(EPOCHS)
    sh = ShardedCartoState(N, BURN_IN, EPS)
    run_sharded(sh, 0, 1, EPOCHS)
    s, ss = state.scores(), sh.scores()
    for by in BYS:
        q, qq = s.quadrants(0.6, 0.8, by=by, reference=REFERENCE), ss.quadrants(0.6, 0.8, by=by, reference=REFERENCE)
        assert torch.equal(q.codes, qq.codes) and (q.tau_d, q.tau_m) == (qq.tau_d, qq.tau_m)
        assert torch.equal(gdc_ext.prune(s, 0.2, by=by, reference=REFERENCE), ss.prune(0.2, by=by, reference=REFERENCE))
    with pytest.raises(ValueError, match="reference must hold"):
        ss.score_values("excess", reference=np.zeros(5))


# ------------------------------------------------------------------------------------------ gloo ranks
def _worker(rank, world):
    state = ShardedCartoState(N, BURN_IN, EPS)
    run_sharded(state, rank, world, EPOCHS)
    sc = state.scores()
    ref = REFERENCE  # the whole [N]: each rank reads its slice
    out = {"bounds": (state.start, state.stop), "quadrants": {}, "prune": {}, "top": {}, "flagged": {}}
    for by in BYS:
        for a in ALPHAS:
            q = sc.quadrants(*a, by=by, reference=ref)
            out["quadrants"][by, a] = (q.codes, q.tau_d, q.tau_m)
        for f in FRACTIONS:
            out["prune"][by, f] = sc.prune(f, by=by, reference=ref[state.start:state.stop])  # or its slice
        for k in (5, N + 3):
            out["top"][by, k] = sc.top_k(k, by=by, reference=ref, ordered=True)
        out["flagged"][by, "q2"] = sc.flagged_ids(by, quadrant=2, reference=ref)
        out["flagged"][by, "f"] = sc.flagged_ids(by, fraction=0.1, reference=ref)
    out["memorization@1.5"] = sc.quadrants(0.5, 0.5, eps=1.5).codes
    out["quantiles"] = sc.quantiles(sc.local.gain, (0.0, 0.1, 0.5, 0.99, 1.0))
    out["random"] = (sc.score_values("random", seed=3), sc.prune(0.3, by="random", seed=3))
    q = sc.quadrants(0.5, 0.5, by="gain")
    sampler = ShardedCartoSampler(state, q, gamma=1.5, seed=7)
    draws = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        draws.append((sampler.counts(), sampler.epoch_ids(), list(sampler), len(sampler)))
    trimmed = ShardedCartoSampler(state, torch.rand(state.num_local, generator=torch.Generator().manual_seed(rank)) * 2,
                                  seed=1, drop_last=True)
    out["sampler"] = draws
    out["trimmed"] = (trimmed.counts(), list(trimmed))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_selection")
    return {world: run_world(_worker, world, out) for world in (1, 2, 4)}


@pytest.fixture(scope="module")
def single():
    state, _, _ = run_single(EPOCHS)
    return state.scores()


def _cat(ranks, *path):
    """The ranks' r[path[0]][path[1]]... concatenated in rank order."""
    def get(r):
        for p in path:
            r = r[p]
        return np.asarray(r)
    return np.concatenate([get(r) for r in ranks])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_quadrants_equal_one_process(ranks, single, world):
    got = ranks[world]
    for by in BYS:
        for a in ALPHAS:
            q = single.quadrants(*a, by=by, reference=REFERENCE)
            for r in got:
                _, tau_d, tau_m = r["quadrants"][by, a]
                assert (tau_d, tau_m) == (q.tau_d, q.tau_m), (by, a)
            assert np.array_equal(_cat(got, "quadrants", (by, a), 0), q.codes.numpy()), (by, a)
    want = single.quadrants(0.5, 0.5, eps=1.5).codes.numpy()
    assert np.array_equal(_cat(got, "memorization@1.5"), want)
    assert set(np.unique(want)) >= {0, 1, 2, 3}  # every quadrant occupied: a non-trivial case


@pytest.mark.parametrize("world", [1, 2, 4])
def test_prune_top_k_and_flagged_equal_one_process(ranks, single, world):
    got = ranks[world]
    for by in BYS:
        for f in FRACTIONS:
            want = gdc_ext.prune(single, f, by=by, reference=REFERENCE).numpy()
            assert np.array_equal(_cat(got, "prune", (by, f)), want), (by, f)
        s = score_values(single, by, reference=REFERENCE)
        for k in (5, N + 3):
            want = top_k(s, k, single.difficulty, ordered=True).numpy()
            for r in got:
                assert np.array_equal(r["top"][by, k].numpy(), want), (by, k)
        want = flagged_ids(single, by=by, quadrant=2, reference=REFERENCE).numpy()
        assert np.array_equal(_cat(got, "flagged", (by, "q2")), want)
        want = flagged_ids(single, by=by, fraction=0.1, reference=REFERENCE).numpy()
        assert np.array_equal(_cat(got, "flagged", (by, "f")), want)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_quantiles_equal_one_process(ranks, single, world):
    want = quantiles(single.gain, (0.0, 0.1, 0.5, 0.99, 1.0))
    for r in ranks[world]:
        assert r["quantiles"] == want


def test_random_score_is_the_same_for_every_world_size(ranks):
    base = _cat(ranks[1], "random", 0)
    kept = _cat(ranks[1], "random", 1)
    assert np.isfinite(base).sum() > N // 2 and len(kept) == N - round(0.3 * N)
    for world in (2, 4):
        assert np.array_equal(_cat(ranks[world], "random", 0), base, equal_nan=True)
        assert np.array_equal(_cat(ranks[world], "random", 1), kept)


def test_sampler_draws_the_same_multiset_for_every_world_size(ranks):
    for epoch in (0, 1):
        counts = {w: _cat(ranks[w], "sampler", epoch, 0) for w in (1, 2, 4)}
        assert np.array_equal(counts[1], counts[2]) and np.array_equal(counts[1], counts[4])
        assert (counts[1] == 2).any() and (counts[1] == 0).any()  # up-sampled and removed ids: non-trivial
    assert not np.array_equal(_cat(ranks[1], "sampler", 0, 0), _cat(ranks[1], "sampler", 1, 0))
    for world in (1, 2, 4):
        for epoch in (0, 1):
            lengths = {r["sampler"][epoch][3] for r in ranks[world]}
            assert len(lengths) == 1  # equal lengths for DDP
            length = lengths.pop()
            drawn = [int(r["sampler"][epoch][0].sum()) for r in ranks[world]]
            assert length == max(drawn)
            for r in ranks[world]:
                counts, ids, listed, n = r["sampler"][epoch]
                start, stop = r["bounds"]
                assert listed == ids.tolist() and len(ids) == n
                m = int(counts.sum())
                # the first m positions are a permutation of the rank's draws; the rest repeat them
                assert np.array_equal(np.bincount(ids[:m] - start, minlength=stop - start), counts.numpy())
                assert np.array_equal(ids[m:], ids[:n - m])


def test_sampler_drop_last_trims_to_the_shortest_rank(ranks):
    for world in (2, 4):
        got = ranks[world]
        lengths = {len(r["trimmed"][1]) for r in got}
        assert len(lengths) == 1
        assert lengths.pop() == min(int(r["trimmed"][0].sum()) for r in got)


def test_sampler_checks_its_arguments():
    state = ShardedCartoState(6, 1)
    with pytest.raises(ValueError, match="one value per owned id"):
        ShardedCartoSampler(state, torch.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        ShardedCartoSampler(state, -torch.ones(6))
    with pytest.raises(ValueError, match="seed"):
        ShardedCartoSampler(state, torch.ones(6), seed=-1)
    with pytest.raises(ValueError, match="ShardedCartoState or ShardedScores"):
        ShardedCartoSampler(object(), torch.ones(6))
    with pytest.raises(ValueError, match="quadrant codes must be in"):
        ShardedCartoSampler(state, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="gamma"):
        ShardedCartoSampler(state, torch.zeros(6, dtype=torch.int8), gamma=0.5)
    codes = torch.tensor([-1, 0, 1, 2, 3, 1])
    s = ShardedCartoSampler(state, codes, gamma=3.0, keep_outliers=True)
    assert s.expected_total == 1 + 1 + 3 + 1 + 1 + 3 and s.counts().tolist() == [1, 1, 3, 1, 1, 3]
    assert sorted(s) == sorted(torch.repeat_interleave(torch.arange(6), s.counts()).tolist())
    s = ShardedCartoSampler(state, torch.full((6,), 2.0))
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    assert sorted(s) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
