"""Streaming scores (fused kernel + end_epoch) equal the NumPy reference that builds the T x N
matrix, on random training histories (on the CPU and, where present, on CUDA)."""
import numpy as np
from hypothesis import given
from helpers import check_streaming_equals_reference, histories

from gdc_ext import reference


@given(h=histories())
def test_streaming_equals_reference(h, device):
    check_streaming_equals_reference(h, device)


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
