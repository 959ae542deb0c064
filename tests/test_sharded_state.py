"""ShardedCartoState: one process (the world-size-1 case, no torch.distributed) equals a plain
CartoState bit for bit; 1, 2 and 4 gloo ranks recording a DistributedSampler-like stream (each
sample's rows in one call) end every epoch with exactly the single process's shard rows (fused
CartoLoss, functional, linear_cross_entropy, record() with counts, the float64 fallback); split
samples agree to float64 rounding; no collective moves a tensor with N entries; ranks that
disagree raise the same ValueError on every rank."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sharded_common import (BURN_IN, COLLECTIVES, EPS, N, assert_same_tensors, record, run_sharded, run_single, run_world,
                            shard_of, stream)

from gdc_ext import ArgumentError, CartoLoss, CartoState, ShardedCartoState, functional
from gdc_ext.sharded import owner_of, shard_bounds

EPOCHS = 3


# ------------------------------------------------------------------------------------------ one process
def _tensors(state: CartoState) -> dict:
    return {k: v for k, v in state.state_dict().items() if k != "meta"}


def test_world_size_one_equals_cartostate_on_the_stream():
    _, single_after, single_mid = run_single(EPOCHS)
    sharded = ShardedCartoState(N, BURN_IN, EPS)
    after, mid = run_sharded(sharded, 0, 1, EPOCHS)
    assert_same_tensors(mid, shard_of(single_mid, 0, N))
    for got, want in zip(after, single_after):
        assert_same_tensors(got, shard_of(want, 0, N))


def test_world_size_one_equals_cartostate_when_samples_are_split_over_calls():
    """One process owns every id: a sample's rows spread over calls still add in the same order."""
    _, single_after, _ = run_single(EPOCHS, split=True)
    after, _ = run_sharded(ShardedCartoState(N, BURN_IN, EPS), 0, 1, EPOCHS, split=True)
    for got, want in zip(after, single_after):
        assert_same_tensors(got, shard_of(want, 0, N))


@pytest.mark.filterwarnings("ignore:.*nothing was recorded")  # epochs with no call: both states warn
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3), st.booleans()), min_size=1, max_size=6),
       st.integers(0, 2 ** 31 - 1))
def test_world_size_one_equals_cartostate_property(calls, seed):
    """Random calls (per-token or per-sequence ids with repeats, ignored rows, counts with zeros)."""
    g = torch.Generator().manual_seed(seed)
    n = 9
    a, b = CartoState(n, 1, [0.3, 2.0]), ShardedCartoState(n, 1, [0.3, 2.0])
    for rows, kind, per_token in calls:
        if kind == 3:
            a.end_epoch()
            b.end_epoch()
            continue
        ids = torch.randint(0, n, (rows * 2,) if per_token else (rows,), generator=g)
        if kind == 2:
            losses = torch.rand(rows * 2, generator=g)
            counts = torch.randint(0, 3, (rows * 2,), generator=g).double()
            a.record(losses, ids if per_token else ids.repeat_interleave(2), counts)
            b.record(losses, ids if per_token else ids.repeat_interleave(2), counts)
            continue
        logits = torch.randn(rows * 2, 5, generator=g)
        target = torch.randint(0, 5, (rows * 2,), generator=g)
        target[torch.rand(rows * 2, generator=g) < 0.3] = -100
        for s in (a, b):
            x = logits.clone().requires_grad_()
            CartoLoss(state=s, reduction="sum" if kind else "mean")(x, target, ids).backward()
    assert_same_tensors(_tensors(b.local), _tensors(a))


def test_sample_weights_with_a_sharded_state_give_cartostate_losses_and_gradients():
    n = 12
    a, b = CartoState(n, 1), ShardedCartoState(n, 1)
    w = torch.rand(n) + 0.1
    logits = torch.randn(16, 6)
    target = torch.randint(0, 6, (16,))
    ids = torch.randint(0, n, (16,))
    out = []
    for s in (a, b):
        fn = CartoLoss(state=s)
        fn.set_sample_weights(w)
        x = logits.clone().requires_grad_()
        loss = fn(x, target, ids)
        loss.backward()
        out.append((loss.detach(), x.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert_same_tensors(_tensors(b.local), _tensors(a))


def test_bad_ids_raise_cartostates_messages_and_leave_the_state_unchanged():
    n = 10
    a, b = CartoState(n, 1), ShardedCartoState(n, 1)
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for bad in (torch.tensor([0, 1, 10, 2]), torch.tensor([-1, 1, 2, 3])):
        msgs = []
        for s in (a, b):
            before = _tensors(s.local if isinstance(s, ShardedCartoState) else s)
            with pytest.raises(ArgumentError) as e:
                CartoLoss(state=s)(logits.clone().requires_grad_(), target, bad)
            msgs.append(str(e.value))
            after = _tensors(s.local if isinstance(s, ShardedCartoState) else s)
            assert all(torch.equal(before[k], after[k]) for k in before)
        assert msgs[0] == msgs[1], msgs
        rec = []
        for s in (a, b):
            with pytest.raises(ValueError) as e:
                s.record(torch.ones(4), bad)
            rec.append(str(e.value))
        assert rec[0] == rec[1], rec
    # an ignored row's id is not read, in both
    for s in (a, b):
        CartoLoss(state=s)(logits.clone().requires_grad_(), torch.tensor([0, 1, -100, 0]), torch.tensor([0, 1, 99, 2]))
    assert_same_tensors(_tensors(b.local), _tensors(a))
    # NaN logits: refused, nothing recorded
    before = _tensors(b.local)
    with pytest.raises(ArgumentError):
        functional.cross_entropy(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), torch.tensor([0, 1]),
                                 state=b, record=True)
    assert all(torch.equal(v, _tensors(b.local)[k]) for k, v in before.items())


@pytest.mark.parametrize("kwargs", [dict(num_samples=0, burn_in=1), dict(num_samples=5, burn_in=0),
                                    dict(num_samples=5, burn_in=1, eps="x"), dict(num_samples=2.5, burn_in=1)])
def test_constructor_raises_cartostates_valueerrors(kwargs):
    with pytest.raises(ValueError) as want:
        CartoState(**kwargs)
    with pytest.raises(ValueError) as got:
        ShardedCartoState(**kwargs)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("flush_every", [0, -1, 1.5, True, "2"])
def test_bad_flush_every_raises(flush_every):
    with pytest.raises(ValueError, match="flush_every"):
        ShardedCartoState(5, 1, flush_every=flush_every)


def test_not_picklable_and_repr():
    import pickle

    s = ShardedCartoState(5, 1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(s)
    assert "ids=[0, 5)" in repr(s)


def test_nothing_recorded_warns_once_per_epoch():
    s = ShardedCartoState(5, 1)
    with pytest.warns(UserWarning, match="nothing was recorded") as rec:
        s.end_epoch()
    assert len([w for w in rec if "nothing was recorded" in str(w.message)]) == 1


@given(st.integers(1, 200), st.integers(1, 9))
def test_shard_bounds_partition_the_ids(n, world):
    if n < world:
        return
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    owners = owner_of(torch.arange(n), n, world)
    for r, (a, b) in enumerate(bounds):
        assert bool((owners[a:b] == r).all())


# ------------------------------------------------------------------------------------------ gloo ranks
def _worker(rank, world):
    out = {}
    for name, kw, split in (("exact", {}, False), ("every3", dict(flush_every=3), False),
                            ("at_end", dict(flush_every=None), False), ("split", {}, True)):
        state = ShardedCartoState(N, BURN_IN, EPS, **kw)
        after, mid = run_sharded(state, rank, world, EPOCHS, split=split)
        out[name] = dict(after=after, mid=mid, bounds=(state.start, state.stop))
    # no collective moves N values: a large N, calls of a few ids each
    big = 100_000
    first = len(COLLECTIVES)
    s = ShardedCartoState(big, BURN_IN, EPS)
    for e in range(2):
        calls = stream(e, 64, batches=8)
        for step in range(len(calls) // world):
            record(s, calls[step * world + rank])
        s.end_epoch()
    out["big_window"] = (first, len(COLLECTIVES))
    out["disagree"] = _disagreements(rank, world)
    return out


def _disagreements(rank, world):
    """Each case makes every rank raise at the same collective; the ranks stay paired."""
    msgs = {}
    if world == 1:
        return msgs
    cases = {
        "num_samples": dict(num_samples=N + (rank == world - 1)),
        "eps": dict(eps=[0.5, 1.25] if rank == 1 else EPS),
        "flush_every": dict(flush_every=2 if rank == 0 else 1),
    }
    for case, kw in cases.items():
        args = dict(num_samples=N, burn_in=BURN_IN, eps=EPS)
        args.update(kw)
        try:
            ShardedCartoState(**args)
        except ValueError as e:
            msgs[case] = str(e)
    # a rank with an extra recording call: its flush meets the others' end_epoch
    s = ShardedCartoState(N, BURN_IN, EPS)
    s.record(torch.ones(1), torch.tensor([rank]))
    try:
        if rank == 1:
            s.record(torch.ones(1), torch.tensor([0]))
        else:
            s.end_epoch()
    except ValueError as e:
        msgs["extra_call"] = str(e)
    # a rank restored from a later epoch
    s = ShardedCartoState(N, BURN_IN, EPS)
    s.record(torch.ones(N), torch.arange(N))
    if rank == 0:  # its shard folded one epoch more (a later checkpoint's shard)
        s.local.end_epoch()
    try:
        s.end_epoch()
    except ValueError as e:
        msgs["epochs"] = str(e)
    return msgs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_state")
    return {world: run_world(_worker, world, out) for world in (1, 2, 4)}


@pytest.fixture(scope="module")
def single():
    return {split: run_single(EPOCHS, split=split) for split in (False, True)}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("case", ["exact", "every3", "at_end"])
def test_gloo_ranks_equal_one_process_bit_for_bit(ranks, single, world, case):
    _, single_after, single_mid = single[False]
    for rank, got in enumerate(ranks[world]):
        res = got[case]
        start, stop = res["bounds"]
        assert (start, stop) == shard_bounds(N, world, rank)
        if case == "exact":  # the accumulator mid-epoch too (routed at every call)
            assert_same_tensors(res["mid"], shard_of(single_mid, start, stop))
        for g, w in zip(res["after"], single_after):
            assert_same_tensors(g, shard_of(w, start, stop))


@pytest.mark.parametrize("world", [2, 4])
def test_split_samples_agree_to_rounding(ranks, single, world):
    """A sample's rows spread over calls of other ranks are summed in another order: counters
    exact, float sums within float64 rounding."""
    _, single_after, _ = single[True]
    for got in ranks[world]:
        res = got["split"]
        start, stop = res["bounds"]
        for g, w in zip(res["after"], single_after):
            assert_same_tensors(g, shard_of(w, start, stop), exact=False)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_no_collective_moves_n_values(ranks, world):
    """N = 100000 ids, calls of a few ids: every collective (the header all-gather, the routed
    rows' all_to_all) holds O(W + batch) elements, nothing like N."""
    for got in ranks[world]:
        first, last = got["big_window"]
        sizes = got["collectives"][first:last]
        if world > 1:
            assert {name for name, _ in sizes} >= {"all_gather_into_tensor", "all_to_all_single"}, sizes
            assert max(n for _, n in sizes) <= 2048, sizes
        assert all(n < 100_000 // 10 for _, n in got["collectives"])


@pytest.mark.parametrize("world", [2, 4])
def test_disagreeing_ranks_raise_the_same_valueerror(ranks, world):
    msgs = [got["disagree"] for got in ranks[world]]
    for case, field in (("num_samples", "num_samples (N) differs"), ("eps", "eps differs"),
                        ("flush_every", "flush_every differs"), ("extra_call", "different calls"),
                        ("epochs", "epochs_done differs")):
        got = [m.get(case) for m in msgs]
        assert all(g is not None for g in got), (case, got)
        assert len(set(got)) == 1, (case, got)
        assert field in got[0], got[0]
    assert f"rank {world - 1}: {N + 1}" in msgs[0]["num_samples"]
    assert "rank 1: end_epoch" in msgs[0]["extra_call"] or "a recording call's flush" in msgs[0]["extra_call"]


def test_num_samples_below_world_size_is_refused_clearly():
    with pytest.raises(ValueError, match="smaller than the world size"):
        # a fake group of 4 ranks
        import gdc_ext._dist as d

        real = d.world_and_rank
        d.world_and_rank = lambda group=None: (4, 0)
        try:
            ShardedCartoState(3, 1)
        finally:
            d.world_and_rank = real
