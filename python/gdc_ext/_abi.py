"""Import-time check (importing this module runs it) that the installed torch is the one the C++ extension was compiled against.

libtorch's C++ ABI changes between minor releases: loading the extension into another torch fails
with an undefined-symbol error or, worse, misbehaves. This turns that into a clear ImportError.
"""
from __future__ import annotations

import torch

__all__ = ["check_torch_abi"]


def _series(version: str) -> tuple:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def check_torch_abi() -> None:
    """Raises ImportError naming both versions when torch's major.minor differs from the build's."""
    try:
        from gdc_ext._build_info import TORCH_VERSION
    except ImportError:  # a source tree that was never built: the extension import reports it
        return
    if _series(TORCH_VERSION) != _series(torch.__version__):
        raise ImportError(
            f"gdc_ext was compiled against torch {TORCH_VERSION} but torch {torch.__version__} is installed; "
            f"the C++ ABI differs between torch releases. Reinstall gdc_ext against this torch "
            f"(`pip install --no-build-isolation --force-reinstall .`) or install torch "
            f"{'.'.join(map(str, _series(TORCH_VERSION)))}.*")


check_torch_abi()
