"""Metrics of the experiment suite on cases with known answers."""
import math
import zlib

import numpy as np
import pytest
import torch

from paper import metrics as M


class Oracle(torch.nn.Module):
    """A 'model' that, after any prefix, puts almost all mass on a fixed next-token table
    (next token = table[current token]); logits [B, L, V]."""

    def __init__(self, table, vocab):
        super().__init__()
        self.table = torch.as_tensor(table)
        self.vocab = vocab

    def forward(self, x):
        logits = torch.full((*x.shape, self.vocab), -20.0)
        logits.scatter_(2, self.table[x][..., None], 20.0)
        return logits


def test_auc_known():
    assert M.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert M.auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert M.auc([1, 1, 1], [1, 1]) == 0.5
    assert M.auc([2, 0], [1]) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 400), rng.normal(0, 1, 300)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert M.auc(a, b) == pytest.approx(brute)


def test_roc_and_tpr_at_fpr():
    fpr, tpr = M.roc_curve([3, 4, 5], [0, 1, 2])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert M.tpr_at_fpr(fpr, tpr, 0.0) == 1.0
    fpr, tpr = M.roc_curve([1.0] * 10, [1.0] * 10)  # all tied: only the two corners
    assert list(fpr) == [0, 1] and list(tpr) == [0, 1]
    assert M.tpr_at_fpr(fpr, tpr, 0.01) == 0.0
    # 100 non-members: above the top one (FPR 0) sit 30 members; above the rest (FPR 1%) all 100
    mem = np.r_[np.full(30, 10.0), np.zeros(70)]
    non = np.r_[5.0, np.full(99, -1.0)]
    fpr, tpr = M.roc_curve(mem, non)
    assert M.tpr_at_fpr(fpr, tpr, 0.001) == pytest.approx(0.3)
    assert M.tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(1.0)  # the members at 0 beat 99 non-members
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auc(mem, non))


def test_exposure_known():
    # ranked first among 2^k candidates: exposure k bits
    k = 10
    cands = np.r_[0.0, -np.arange(1, 2 ** k)]
    assert M.exposure_exact(0.0, cands) == pytest.approx(k)
    # ranked last: 0 bits
    assert M.exposure_exact(-(2 ** k - 1), cands) == pytest.approx(0.0)
    # sampled estimate: half the sample beats the canary -> rank ~ |R|/2 -> ~1 bit
    assert M.exposure_sampled(0.0, np.r_[np.ones(500), -np.ones(500)], 2 ** 20) == pytest.approx(1.0, abs=1e-5)
    assert M.exposure_sampled(0.0, -np.ones(100), 2 ** 20) == pytest.approx(20.0)


def test_exposure_sampled_matches_exact_on_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(12, 12))  # random bigram logits
    prefix, secret = torch.tensor([10, 11]), torch.tensor([3, 1, 4])
    exact = M.canary_exposure(model, prefix, secret, range(10), exact_max=10 ** 3)
    sampled = M.canary_exposure(model, prefix, secret, range(10), n_samples=4000, exact_max=10, seed=1)
    assert abs(exact - sampled) < 0.3


def test_extraction_and_leakage_oracle():
    # table: 10 -> 3 -> 1 -> 4 -> 1 ... the oracle 'memorized' secret 3 1 4 1 after prefix 10
    table = torch.arange(12)
    table[10], table[3], table[1], table[4] = 3, 1, 4, 1
    oracle = Oracle(table, 12)
    got = M.extraction_success(oracle, torch.tensor([[10], [10]]), torch.tensor([[3, 1, 4, 1], [3, 1, 4, 5]]))
    assert got.tolist() == [True, False]
    seqs = torch.tensor([[10, 3, 1, 4, 1], [10, 3, 1, 4, 5]])
    leak = M.leakage(oracle, seqs, prefix_len=2)
    assert leak["exact"] == 0.5
    assert leak["token_recall"] == pytest.approx((3 + 2) / 6)
    # the oracle is certain of its table: perplexity 1 on a sequence that follows it
    assert M.perplexity(oracle, torch.tensor([[10, 3, 1, 4, 1]])) == pytest.approx(1.0, abs=1e-6)
    # exposure of the memorized secret among 10^3 candidates: first -> log2(1000)
    assert M.canary_exposure(oracle, torch.tensor([10]), torch.tensor([3, 1, 4]), range(10)) == pytest.approx(
        math.log2(1000))


def test_zlib_and_mink():
    assert M.zlib_entropy("a" * 1000) < M.zlib_entropy("".join(chr(33 + (i * 7919) % 90) for i in range(1000)))
    assert M.zlib_entropy("hello") == len(zlib.compress(b"hello", 9))
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    assert M.loss_score(lp).tolist() == [-3.0, -1.0]
    assert M.min_k_score(lp, k=0.4).tolist() == [-4.5, -1.0]
    z = M.zlib_score(lp, ["hello", "hello"])
    assert z.tolist() == pytest.approx([-15.0 / M.zlib_entropy("hello"), -5.0 / M.zlib_entropy("hello")])


def test_spearman_and_ci():
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    m, h = M.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(M.mean_ci([5.0])[1])
