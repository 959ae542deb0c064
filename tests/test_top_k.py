"""cartography.top_k: the first k of selection_order by a partial sort (same ties), and prune on it."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gdc_ext
from gdc_ext.cartography import selection_order, top_k


@settings(deadline=None, max_examples=300)
@given(st.integers(0, 80), st.integers(0, 2**31 - 1), st.booleans())
def test_top_k_equals_the_head_of_the_full_order(n, seed, with_tiebreak):
    rng = np.random.default_rng(seed)
    # few distinct values, NaN scores and NaN / infinite tiebreaks: ties everywhere
    s = rng.choice([0.0, -0.0, 1.0, 2.5, np.inf, -np.inf, np.nan], size=n)
    t = rng.choice([0.0, 1.0, np.nan, -np.inf], size=n) if with_tiebreak else None
    full = selection_order(s, t).tolist()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n, n + 5} - {-1}):
        k = max(k, 0)
        assert top_k(s, k, t).tolist() == full[:k], k
        assert top_k(torch.from_numpy(s), k, t, ordered=False).tolist() == sorted(full[:k])


def test_top_k_errors_and_prune_uses_it():
    with pytest.raises(ValueError, match="k must be"):
        top_k([1.0, 2.0], -1)
    with pytest.raises(ValueError, match="tiebreak"):
        top_k([1.0, 2.0], 1, [1.0])
    assert gdc_ext.cartography.top_k is top_k
