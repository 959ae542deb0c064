"""Per-sample reference losses (gdc_ext.references) against hand-computed values."""
import math
import zlib

import numpy as np
import pytest
import torch

from gdc_ext import unigram_reference, zlib_reference


def test_unigram_hand_computed():
    # tokens 0,0,1 | 2 ; counts (2, 1, 1), total 4, V = 3 -> p = (3/7, 2/7, 2/7)
    ref = unigram_reference([[0, 0, 1], [2]])
    p = np.array([3, 2, 2]) / 7
    assert ref.dtype == np.float64 and ref.shape == (2,)
    assert ref[0] == pytest.approx(-(2 * math.log(p[0]) + math.log(p[1])) / 3)
    assert ref[1] == pytest.approx(-math.log(p[2]))
    # vocab_size larger than the largest id: V = 5 -> p(v) = (count + 1) / 9
    ref5 = unigram_reference([[0, 0, 1], [2]], vocab_size=5)
    assert ref5[1] == pytest.approx(-math.log(2 / 9))


def test_unigram_ignore_index_and_empty():
    ref = unigram_reference([[0, -100, 0, 1], [-100, -100], [2]])
    expected = unigram_reference([[0, 0, 1], [], [2]])
    assert ref[0] == pytest.approx(expected[0]) and ref[2] == pytest.approx(expected[2])
    assert math.isnan(ref[1]) and math.isnan(expected[1])
    # a custom ignore_index
    assert unigram_reference([[0, 7, 0, 1], [2]], ignore_index=7)[0] == pytest.approx(expected[0])
    assert np.isnan(unigram_reference([[]])).all()


def test_unigram_batch_form_equals_list_form():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 9, (12, 6))
    data[rng.random(data.shape) < 0.2] = -100
    ref = unigram_reference([row for row in data], vocab_size=10)
    # the same data as a 2-D tensor, as batches with one id per row, and with one id per token
    assert np.allclose(unigram_reference(torch.from_numpy(data), vocab_size=10), ref, equal_nan=True)
    perm = rng.permutation(12)
    batches = [(torch.from_numpy(data[perm[b:b + 5]]), torch.from_numpy(perm[b:b + 5])) for b in range(0, 12, 5)]
    assert np.allclose(unigram_reference(batches, vocab_size=10), ref, equal_nan=True)
    tok_ids = [(data[perm[b:b + 5]], np.repeat(perm[b:b + 5, None], 6, 1)) for b in range(0, 12, 5)]
    assert np.allclose(unigram_reference(tok_ids, vocab_size=10), ref, equal_nan=True)
    # a sample seen twice (up-sampling) counts its tokens twice, in the model and in its mean
    twice = unigram_reference([(data[:2], np.array([0, 1])), (data[:1], np.array([0]))], vocab_size=10)
    assert twice[0] == pytest.approx(unigram_reference([np.r_[data[0], data[0]], data[1]], vocab_size=10)[0])
    # num_samples pads samples never seen with NaN
    padded = unigram_reference(batches, vocab_size=10, num_samples=14)
    assert padded.shape == (14,) and np.isnan(padded[12:]).all()


def test_unigram_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_reference([[0, 5]], vocab_size=3)
    with pytest.raises(ValueError, match="samples"):
        unigram_reference([[0, -1]])
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        unigram_reference([[0, 1], [[0, 1]]])
    with pytest.raises(ValueError, match="samples"):
        unigram_reference([[0.5, 1.0]])
    with pytest.raises(ValueError, match="one-shot"):
        unigram_reference((b for b in [(np.zeros((1, 2), dtype=np.int64), np.zeros(1, dtype=np.int64))]))
    with pytest.raises(ValueError, match="num_samples"):
        unigram_reference([(np.zeros((1, 2), dtype=np.int64), np.array([3]))], num_samples=2)
    with pytest.raises(ValueError, match="sample_ids"):
        unigram_reference([(np.zeros((2, 2), dtype=np.int64), np.array([0, 1, 2]))])


def test_zlib_hand_computed():
    s = [1, 2, 3, 1, 2, 3]
    got = zlib_reference([s, [5, -100]])
    b = np.array(s, dtype="<i4").tobytes()
    assert got[0] == pytest.approx(8 * len(zlib.compress(b, 9)) / 6 * math.log(2))
    assert got[1] == pytest.approx(8 * len(zlib.compress(np.array([5], "<i4").tobytes(), 9)) * math.log(2))
    # text samples need their token counts
    txt = zlib_reference(["hello hello hello"], num_tokens=[3])
    assert txt[0] == pytest.approx(8 * len(zlib.compress(b"hello hello hello", 9)) / 3 * math.log(2))
    with pytest.raises(ValueError, match="num_tokens"):
        zlib_reference(["hello"])
    # batch form (a generator is fine: one pass) == list form
    data = np.array([[1, 2, 3, 4], [4, 4, 4, 4], [9, 8, -100, -100]])
    batches = ((data[b:b + 2], np.arange(b, min(b + 2, 3))) for b in range(0, 3, 2))
    assert np.allclose(zlib_reference(batches), zlib_reference(list(data)))
    assert np.isnan(zlib_reference([[-100]])).all()
    with pytest.raises(ValueError, match="samples"):
        zlib_reference([[1, -3]])
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        zlib_reference([np.zeros((2, 2), dtype=np.int64)])
