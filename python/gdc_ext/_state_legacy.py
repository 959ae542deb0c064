"""States saved before the compact layout (format versions 1 and 2): their layout, frozen here, and
their conversion to the current one (csrc/state_stats.def, :mod:`gdc_ext.layout`).

Versions 1 and 2 held acc [N, 3] float64 (loss sum, token count, energy sum), fstats [N, 2] float64
(difficulty sum, last loss; [N, 6] with extras: + min, mean, M2, energy), istats [N, 3] int32
(burn-in epochs, observed epochs, transitions) and forgets [N, K] int32. The conversion rounds the
float statistics to float32 and narrows the counters to int16 (refusing values they cannot hold),
drops the transitions (derived now: max(observed - 1, 0), checked) and, without extras, the
energy sum. Files (CartoState.load) and checkpoints (load_state_dict) of those versions go
through it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from gdc_ext import layout

__all__ = ["LEGACY_VERSIONS", "legacy_shapes", "convert_legacy"]

LEGACY_VERSIONS = (1, 2)
# (tensor, column) of each statistic in the version 1/2 layout
_OLD: Dict[str, Tuple[str, int]] = {
    "loss_sum": ("acc", 0), "count": ("acc", 1), "energy_sum": ("acc", 2),
    "diff_sum": ("fstats", 0), "last": ("fstats", 1), "min": ("fstats", 2), "mean": ("fstats", 3),
    "m2": ("fstats", 4), "energy_total": ("fstats", 5),
    "diff_count": ("istats", 0), "observed": ("istats", 1), "forgets": ("forgets", 0),
}
_OLD_TRANSITIONS = 2
_F32_MAX = torch.finfo(torch.float32).max


def legacy_shapes(meta: dict) -> dict:
    """{name: (dtype, shape)} of every tensor of a version 1/2 state with this (checked) metadata."""
    N, K = meta["num_samples"], len(meta["eps"])
    return {"acc": (torch.float64, (N, 3)),
            "fstats": (torch.float64, (N, 6 if meta["extras"] else 2)),
            "istats": (torch.int32, (N, 3)),
            "forgets": (torch.int32, (N, K)),
            "epoch": (torch.int64, (1,)),
            "eps": (torch.float64, (K,))}


def convert_legacy(meta: dict, tensors: dict, where: str) -> dict:
    """The current layout's tensors (CPU) holding the state of ``tensors``, a version 1/2 state
    with metadata ``meta`` (num_samples, eps, extras). ValueError starting with ``where`` (the
    file or "state_dict") for tensors of the wrong shape or dtype, inconsistent counters, counters
    beyond int16 or float statistics beyond float32's range; ``tensors`` is left unchanged."""
    for name, (dtype, shape) in legacy_shapes(meta).items():
        t = tensors.get(name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: missing tensor {name!r}")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(t.shape)} {t.dtype}, a version "
                             f"{meta['version']} state needs {shape} {dtype}")
    old = {name: t.detach().cpu() for name, t in tensors.items()}
    N, K = meta["num_samples"], len(meta["eps"])
    ist = old["istats"]
    observed = ist[:, _OLD["observed"][1]]
    if bool(((observed - 1).clamp(min=0) != ist[:, _OLD_TRANSITIONS]).any()):
        raise ValueError(f"{where}: its transitions differ from max(observed - 1, 0): the state is corrupted")
    epochs = int(old["epoch"][0])
    if epochs > layout.MAX_EPOCHS or bool((ist > layout.MAX_EPOCHS).any()) or bool((old["forgets"] > layout.MAX_EPOCHS).any()):
        raise ValueError(f"{where}: the state has folded {epochs} epochs; its counters exceed what this gdc_ext's "
                         f"int16 counters hold ({layout.MAX_EPOCHS} epochs)")
    bad = old["fstats"].abs() > _F32_MAX
    if bool(bad.any()):
        raise ValueError(f"{where}: a folded statistic ({float(old['fstats'][bad][0])}) is beyond float32's range, in "
                         f"which this gdc_ext keeps them")
    groups = layout.groups_for(meta["extras"])
    new = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in layout.shapes(N, K, groups).items()}
    for stat in layout.STATS:
        loc = layout.stat_location(stat.name, groups, K)
        if loc is None:
            continue
        tensor, c = loc
        src, s = _OLD[stat.name]
        if tensor == "forgets":
            new[tensor][:, c:c + K] = old[src][:, s:s + K]
        else:
            new[tensor][:, c] = old[src][:, s]
    new["epoch"] = old["epoch"].clone()
    new["eps"] = old["eps"].clone()
    return new
