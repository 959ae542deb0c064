"""CartoSampler: per-epoch multiplicities (floor plus Bernoulli remainder), reproducibility and
the DistributedSampler-like split."""
import collections
import math

import pytest
import torch
from hypothesis import given, strategies as st

import gdc_ext
from gdc_ext import CartoSampler


@st.composite
def weights(draw):
    n = draw(st.integers(1, 30))
    w = draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 2.0, 0.5]), st.floats(0, 3.5)), min_size=n, max_size=n))
    return torch.tensor(w, dtype=torch.float64)


@given(weights(), st.integers(0, 2**31 - 1), st.integers(0, 50))
def test_each_index_appears_floor_or_floor_plus_one(w, seed, epoch):
    s = CartoSampler(w, seed=seed)
    s.set_epoch(epoch)
    got = collections.Counter(list(s))
    assert len(s) == sum(got.values())
    counts = s.counts()
    for i in range(len(w)):
        assert got[i] == int(counts[i])
        assert math.floor(w[i]) <= got[i] <= math.floor(w[i]) + 1
        if float(w[i]) == math.floor(w[i]):
            assert got[i] == int(w[i])  # integer multiplicities are exact
    assert list(s) == list(s)  # stable within the epoch


@given(st.integers(0, 2**31 - 1), st.integers(0, 1000))
def test_same_seed_and_epoch_same_order(seed, epoch):
    w = torch.tensor([0.3, 1.5, 2.0, 0.0, 1.0, 2.7])
    a, b = CartoSampler(w, seed=seed), CartoSampler(w, seed=seed)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    assert list(a) == list(b)
    b.set_epoch(epoch + 1)
    orders = {tuple(b)}
    for e in range(epoch + 2, epoch + 6):
        b.set_epoch(e)
        orders.add(tuple(b))
    assert len(orders) > 1  # epochs differ


def test_expected_counts():
    w = torch.tensor([0.0, 0.25, 1.0, 1.5, 2.0, 2.75], dtype=torch.float64)
    s = CartoSampler(w, seed=3)
    E = 2000
    total = torch.zeros(len(w), dtype=torch.float64)
    for e in range(E):
        total += s.counts(e)
    mean = total / E
    # Bernoulli(p) remainder: std of the mean <= 0.5 / sqrt(E) ~ 0.011; allow 5 sigma
    assert torch.allclose(mean, w, atol=0.06), mean
    assert s.expected_total == pytest.approx(float(w.sum()))


@given(st.lists(st.sampled_from([-1, 0, 1, 2, 3]), min_size=1, max_size=40), st.booleans(), st.integers(0, 99))
def test_quadrant_codes_and_outlier_removal(codes, keep, seed):
    c = torch.tensor(codes, dtype=torch.int8)
    s = CartoSampler(c, gamma=2.0, keep_outliers=keep, seed=seed)
    got = collections.Counter(list(s))
    for i, q in enumerate(codes):
        expected = {0: 1, 1: 2, 2: 1, 3: 1 if keep else 0, -1: 1}[q]
        assert got[i] == expected
    q = gdc_ext.Quadrants(c, 1.0, 0.0)
    assert list(CartoSampler(q, gamma=2.0, keep_outliers=keep, seed=seed)) == list(s)


@given(weights(), st.integers(1, 5), st.integers(0, 99), st.integers(0, 9))
def test_ranks_split_padded_list(w, R, seed, epoch):
    samplers = [CartoSampler(w, seed=seed, num_replicas=R, rank=r) for r in range(R)]
    for s in samplers:
        s.set_epoch(epoch)
    full = CartoSampler(w, seed=seed)
    full.set_epoch(epoch)
    drawn = list(full)
    lens = {len(s) for s in samplers}
    assert len(lens) == 1  # equal length per rank
    n = lens.pop()
    if not drawn:
        assert n == 0
        return
    total = n * R
    assert total == math.ceil(len(drawn) / R) * R
    padded = [None] * total
    for r, s in enumerate(samplers):  # rank r holds positions r, r + R, ...: disjoint, covering all
        for j, i in enumerate(s):
            padded[r + j * R] = i
    assert padded[:len(drawn)] == drawn
    assert padded[len(drawn):] == (drawn * R)[:total - len(drawn)]  # padding repeats from the start


def test_removed_outliers_never_appear_over_epochs():
    c = torch.tensor([3, 0, 1, 3, 2], dtype=torch.int8)
    s = CartoSampler(c, num_replicas=2, rank=1)
    for e in range(5):
        s.set_epoch(e)
        assert not ({0, 3} & set(s))


def test_dataloader_and_bad_input():
    s = CartoSampler(torch.tensor([1.0, 2.0, 0.0]))
    dl = torch.utils.data.DataLoader(torch.arange(3), sampler=s, batch_size=2)
    assert sorted(torch.cat(list(dl)).tolist()) == [0, 1, 1]
    with pytest.raises(ValueError, match="quadrants_or_weights"):
        CartoSampler(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="quadrants_or_weights"):
        CartoSampler([1.0, 2.0])
    with pytest.raises(ValueError, match="num_replicas"):
        CartoSampler(torch.tensor([1.0]), num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="rank"):
        CartoSampler(torch.tensor([1.0]), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="gamma"):
        CartoSampler(torch.tensor([0, 1], dtype=torch.int8), gamma=0.5)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
