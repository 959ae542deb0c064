import os
import random

import numpy as np
import pytest
import torch
from helpers import require_cuda_kernels
from hypothesis import HealthCheck, settings

# No wall-clock deadline (a loaded CI machine runs an example many times slower), and the same
# examples on every run: "ci" is derandomized (hypothesis's own CI profile is too), so a rare
# example cannot fail one run in a hundred and pass the next (test_parity_property did, issue 17).
# "thorough" keeps drawing new random examples, for exploring: HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Each xdist worker gets one intra-op thread: two workers already fill CI's two cores.
torch.set_num_threads(int(os.environ.get("GDC_TEST_THREADS", "1")))


def pytest_runtest_setup(item):
    """Every test starts from the same global RNG state (torch, NumPy, random), whatever ran before
    it in its process: pytest-xdist hands tests to workers in an order that depends on timing."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


@pytest.fixture(scope="session", params=["cpu", _CUDA])
def device(request) -> str:
    """Runs a test on the CPU and, where a CUDA device is present, on CUDA (marked `cuda`, so
    `pytest -m cuda tests` runs every CUDA case). Session-scoped: usable with hypothesis."""
    if request.param == "cuda":
        require_cuda_kernels()
    return request.param
