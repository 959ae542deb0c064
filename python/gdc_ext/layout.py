"""The CartoState layout: the statistics declared once in ``csrc/state_stats.def``, as compiled into
the extension (``gdc_ext._C.state_layout()``, read once at import).

Every Python place that depends on which statistics a state keeps follows this module: the state's
tensors and their shapes and dtypes (:func:`shapes`), the fake implementations of the ops
(gdc_ext.ops), ``record()`` and the torch fallback (what goes into each accumulator column:
:func:`acc_sources`), save/load (the columns a file must hold: :func:`columns`) and
:class:`~gdc_ext.Scores` (which columns exist: :func:`scores_columns`). tests/test_state_layout.py
checks that this table equals the one parsed from the .def file, so a stale build is caught.

Groups: a state keeps ``core`` always, ``extras`` when built with ``extras=True`` and
``cartography`` when built with ``cartography=True``; a group set is a bit mask (:data:`CORE`,
:data:`EXTRAS`, :data:`CARTOGRAPHY`). Columns of a tensor are the statistics of the enabled groups
in declaration order (per-eps tensors: K columns per statistic).

The ``ACC_*`` / ``F_*`` / ``I_*`` constants name columns that sit at the same place in every
layout with them (core first, then extras), for code that reads one column by hand.
"""
from __future__ import annotations

import functools
import json
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from gdc_ext import _C

__all__ = [
    "Stat", "TABLE", "GROUPS", "CORE", "EXTRAS", "CARTOGRAPHY", "ALL_GROUPS", "TENSORS", "TENSOR_DTYPES", "SOURCES", "SIGNALS",
    "FOLDS", "STATS", "MAX_EPOCHS", "groups_for", "groups_of_meta", "check_groups", "group_names", "columns", "column", "widths",
    "shapes", "acc_sources", "saved_columns", "stat_location", "scores_columns", "optional_scores_columns",
    "group_scores_columns", "infer_groups", "bytes_per_sample",
    "ACC_LOSS_SUM", "ACC_COUNT", "ACC_ENERGY_SUM", "ACC_COLS",
    "F_DIFF_SUM", "F_LAST", "F_MIN", "F_MEAN", "F_M2", "F_ENERGY", "F_COLS_BASE", "F_COLS_EXTRAS",
    "I_DIFF_COUNT", "I_OBSERVED", "I_COLS",
]


class Stat(NamedTuple):
    """One GDC_STAT declaration of csrc/state_stats.def."""
    name: str
    group: str    # a GDC_GROUP
    tensor: str   # acc, fstats, istats or forgets
    fold: str     # a GDC_FOLD kind
    input: str    # acc: a GDC_SOURCE; others: a GDC_SIGNAL or an acc statistic
    saved: str    # the column's name in saved files
    scores: str   # the Scores column it feeds ("none": none)


TABLE: dict = json.loads(_C.state_layout())
GROUPS: Dict[str, int] = {name: int(bit) for name, bit in TABLE["groups"]}
CORE: int = GROUPS["core"]
EXTRAS: int = GROUPS["extras"]
CARTOGRAPHY: int = GROUPS["cartography"]
ALL_GROUPS: int = functools.reduce(lambda a, b: a | b, GROUPS.values())
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "int16": torch.int16}
TENSORS: Tuple[str, ...] = tuple(name for name, _, _ in TABLE["tensors"])
TENSOR_DTYPES: Dict[str, torch.dtype] = {name: _DTYPES[dtype] for name, dtype, _ in TABLE["tensors"]}
_PER_EPS = {name for name, _, per in TABLE["tensors"] if per == "eps"}
SOURCES: Tuple[str, ...] = tuple(TABLE["sources"])
SIGNALS: Dict[str, str] = {name: total for name, total in TABLE["signals"]}
FOLDS: Dict[str, str] = {name: tensor for name, tensor in TABLE["folds"]}
STATS: Tuple[Stat, ...] = tuple(Stat(*row) for row in TABLE["stats"])
# Counters are int16 and grow by at most 1 per epoch: a state folds at most this many epochs.
MAX_EPOCHS: int = int(TABLE["max_epochs"])
_BY_NAME = {s.name: s for s in STATS}


def groups_for(extras: bool, cartography: bool = False) -> int:
    """The group mask of a CartoState built with ``extras`` and ``cartography``."""
    return CORE | (EXTRAS if extras else 0) | (CARTOGRAPHY if cartography else 0)


def groups_of_meta(meta: dict) -> int:
    """The group mask of a saved state's metadata (``extras``; ``cartography``, absent from files
    written before the group existed: False)."""
    return groups_for(meta["extras"], meta.get("cartography", False))


def check_groups(groups) -> int:
    """``groups`` as an int mask with core set and no unknown bit; ValueError otherwise."""
    if isinstance(groups, bool) or not isinstance(groups, int) or not groups & CORE or groups & ~ALL_GROUPS:
        raise ValueError(f"groups must be a bit mask of {GROUPS} with core set, got {groups!r}")
    return groups


def group_names(groups: int) -> Tuple[str, ...]:
    return tuple(name for name, bit in GROUPS.items() if groups & bit)


@functools.lru_cache(maxsize=None)
def _layout(groups: int) -> Dict[str, Tuple[str, ...]]:
    check_groups(groups)
    return {t: tuple(s.name for s in STATS if s.tensor == t and groups & GROUPS[s.group]) for t in TENSORS}


def columns(tensor: str, groups: int) -> Tuple[str, ...]:
    """The statistics stored in ``tensor`` for ``groups``, in column order (per-eps tensors: each
    statistic stands for K consecutive columns)."""
    return _layout(groups)[tensor]


def column(name: str, groups: int, K: int = 1) -> Optional[int]:
    """The column of statistic ``name`` in its tensor (per-eps: its first of K), or None when its
    group is off."""
    s = _BY_NAME[name]
    names = columns(s.tensor, groups)
    if name not in names:
        return None
    return names.index(name) * (K if s.tensor in _PER_EPS else 1)


def widths(groups: int, K: int) -> Dict[str, int]:
    """Columns of each state tensor."""
    return {t: len(columns(t, groups)) * (K if t in _PER_EPS else 1) for t in TENSORS}


def shapes(N: int, K: int, groups: int) -> Dict[str, Tuple[torch.dtype, Tuple[int, int]]]:
    """{tensor: (dtype, (N, columns))} of the per-sample tensors of a state."""
    return {t: (TENSOR_DTYPES[t], (N, w)) for t, w in widths(groups, K).items()}


def acc_sources(groups: int) -> Tuple[str, ...]:
    """The GDC_SOURCE added into each accumulator column (nll, one, energy, ...)."""
    return tuple(_BY_NAME[n].input for n in columns("acc", groups))


def saved_columns(groups: int) -> Dict[str, List[str]]:
    """{tensor: saved names of its statistics in column order}: what a saved file's metadata
    lists under "columns" (per-eps tensors: one name per statistic, standing for its K columns)."""
    return {t: [_BY_NAME[n].saved for n in columns(t, groups)] for t in TENSORS}


def stat_location(name: str, groups: int, K: int = 1) -> Optional[Tuple[str, int]]:
    """(tensor, column) of statistic ``name``, or None when its group is off."""
    c = column(name, groups, K)
    return None if c is None else (_BY_NAME[name].tensor, c)


def scores_columns(groups: Optional[int] = None) -> Tuple[str, ...]:
    """The Scores columns fed by the statistics (of ``groups``; None: of every group), in
    declaration order; :func:`optional_scores_columns` those of the groups beyond core."""
    out: List[str] = []
    for s in STATS:
        if s.scores != "none" and s.scores not in out and (groups is None or groups & GROUPS[s.group]):
            out.append(s.scores)
    return tuple(out)


def optional_scores_columns() -> Tuple[str, ...]:
    """Scores columns that only groups beyond core feed (absent from a state without them)."""
    core = scores_columns(CORE)
    return tuple(c for c in scores_columns() if c not in core)


def group_scores_columns(group: str) -> Tuple[str, ...]:
    """The Scores columns fed by the statistics of group ``group`` (a name of :data:`GROUPS`)."""
    return tuple(dict.fromkeys(s.scores for s in STATS if s.group == group and s.scores != "none"))


def bytes_per_sample(groups: int, K: int) -> int:
    """Bytes of the per-sample tensors of a state with ``groups`` and K thresholds, per sample."""
    return sum(w * torch.empty((), dtype=TENSOR_DTYPES[t]).element_size() for t, w in widths(groups, K).items())


def infer_groups(K: int, **tensor_widths: int) -> Optional[int]:
    """The group mask whose layout has these widths (``acc=2, fstats=2, ...``), or None when no
    mask or several fit."""
    fits = [g for g in range(1, ALL_GROUPS + 1) if g & CORE and not g & ~ALL_GROUPS
            and all(widths(g, K)[t] == w for t, w in tensor_widths.items())]
    return fits[0] if len(fits) == 1 else None


def _fixed(name: str) -> int:
    """The column of ``name`` in every layout that has it (checked: core first, then extras, then
    cartography)."""
    cols = {column(name, g) for g in range(1, ALL_GROUPS + 1) if g & CORE and not g & ~ALL_GROUPS} - {None}
    assert len(cols) == 1, f"{name} moves between layouts: {cols}"
    return cols.pop()


# acc [N, ACC_COLS] float64: this epoch's sums (zeroed by end_epoch); ACC_ENERGY_SUM with extras.
ACC_LOSS_SUM = _fixed("loss_sum")
ACC_COUNT = _fixed("count")
ACC_ENERGY_SUM = _fixed("energy_sum")
ACC_COLS = widths(CORE, 1)["acc"]
# fstats [N, F_COLS_BASE or F_COLS_EXTRAS] float32: folded statistics.
F_DIFF_SUM = _fixed("diff_sum")
F_LAST = _fixed("last")
F_MIN = _fixed("min")
F_MEAN = _fixed("mean")
F_M2 = _fixed("m2")
F_ENERGY = _fixed("energy_total")
F_COLS_BASE = widths(CORE, 1)["fstats"]
F_COLS_EXTRAS = widths(CORE | EXTRAS, 1)["fstats"]
# istats [N, I_COLS] int16: counters (transitions = max(observed - 1, 0) is derived, not stored).
I_DIFF_COUNT = _fixed("diff_count")
I_OBSERVED = _fixed("observed")
I_COLS = widths(CORE, 1)["istats"]
