"""scikit-build-core metadata provider: the wheel's dependencies, with torch pinned to the
release series the extension is compiled against.

The C++ extension links against libtorch, whose ABI is not stable across minor releases, so a
wheel built with torch 2.13.x must not be installed beside torch 2.14. Building runs without
build isolation against the installed torch (docs/build.md), so that torch's version is the pin.
"""
from __future__ import annotations

import importlib.metadata

__all__ = ["dynamic_metadata", "torch_requirement"]

# Everything but torch; kept here, the one place the runtime dependencies are declared.
BASE_DEPENDENCIES = ["numpy", "safetensors", "tqdm", "matplotlib"]


def torch_requirement() -> str:
    """'torch>=X.Y,<X.(Y+1)' for the installed torch X.Y.*, which the build compiles against."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "gdc_ext builds against the installed torch, and none is installed: install torch first, then "
            "`pip install --no-build-isolation .` (see README, Install)") from None
    major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def dynamic_metadata(field: str, settings=None, project=None) -> list:
    if field != "dependencies":
        raise RuntimeError(f"build_support.torch_pin provides 'dependencies', not {field!r}")
    return [torch_requirement(), *BASE_DEPENDENCIES]
