import os

import pytest
import torch
from helpers import require_cuda_kernels
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Each xdist worker gets one intra-op thread: two workers already fill CI's two cores.
torch.set_num_threads(int(os.environ.get("GDC_TEST_THREADS", "1")))

_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


@pytest.fixture(scope="session", params=["cpu", _CUDA])
def device(request) -> str:
    """Runs a test on the CPU and, where a CUDA device is present, on CUDA (marked `cuda`, so
    `pytest -m cuda tests` runs every CUDA case). Session-scoped: usable with hypothesis."""
    if request.param == "cuda":
        require_cuda_kernels()
    return request.param
