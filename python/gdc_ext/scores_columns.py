"""How each :class:`~gdc_ext.Scores` column is derived from the state's statistics (declared in
csrc/state_stats.def, whose ``scores`` field names the column each one feeds).

A column is a function of the statistics of a range of rows, so :class:`~gdc_ext.Scores` computes
it chunk by chunk from a snapshot of the compact state: a column costs its own [N] output plus
O(:data:`CHUNK`) temporaries, whatever other columns exist.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

import torch

__all__ = ["CHUNK", "Column", "COLUMNS"]

# rows per chunk: 256K rows keep each float64 temporary at 2 MiB
CHUNK = 1 << 18
_NAN = float("nan")


class Column(NamedTuple):
    stats: Tuple[str, ...]   # the statistics it reads (all must be kept by the state)
    dtype: torch.dtype
    per_eps: bool            # [N, K] instead of [N]
    fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor]  # rows of the stats -> rows of the column
    doc: str


def _f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``t`` (always a copy: the callers modify it in place)."""
    return t.to(torch.float64, copy=True)


def _where_seen(v: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64, may be modified) where the sample was observed, NaN elsewhere."""
    return x.masked_fill_(v["observed"] <= 0, _NAN)


def _difficulty(v):
    count = v["diff_count"]
    return _f64(v["diff_sum"]).div_(count.clamp(min=1)).masked_fill_(count <= 0, _NAN)


def _last(v):
    return _where_seen(v, _f64(v["last"]))


def _std(v):
    return _where_seen(v, _f64(v["m2"]).div_(v["observed"].clamp(min=1)).clamp_(min=0).sqrt_())


def _transitions(v):
    return (v["observed"].to(torch.int32, copy=True) - 1).clamp_(min=0)


def _memorization(v):
    # forgets <= transitions, so samples without a transition (0 forgets) get 0
    return _f64(v["forgets"]).div_(_transitions(v).clamp_(min=1)[:, None])


def _gain(v):
    return _difficulty(v).sub_(_last(v))


def _p_std(v):
    return _where_seen(v, _f64(v["p_m2"]).div_(v["observed"].clamp(min=1)).clamp_(min=0).sqrt_())


def _first_learned(v):
    e = v["first_learnt"]
    return _f64(e).masked_fill_(e <= 0, _NAN)


def _never_learnt(v):
    return (v["observed"] > 0) & (v["learnt"] <= 0)


COLUMNS: Dict[str, Column] = {
    "difficulty": Column(("diff_sum", "diff_count"), torch.float64, False, _difficulty,
                         "[N] float64 d_i, the mean loss over observed burn-in epochs; NaN where none was observed"),
    "memorization_by_eps": Column(("forgets", "observed"), torch.float64, True, _memorization,
                                  "[N, K] float64 m_i = forgets / transitions (0 without a transition)"),
    "forgets_by_eps": Column(("forgets",), torch.int32, True, lambda v: v["forgets"].to(torch.int32, copy=True),
                             "[N, K] int32 forget events per threshold"),
    "transitions": Column(("observed",), torch.int32, False, _transitions,
                          "[N] int32 consecutive-observation pairs, max(observed - 1, 0)"),
    "observed": Column(("observed",), torch.int32, False, lambda v: v["observed"].to(torch.int32, copy=True),
                       "[N] int32 epochs in which the sample was seen"),
    "last_loss": Column(("last", "observed"), torch.float64, False, _last,
                        "[N] float64 loss of the last observed epoch; NaN if never observed"),
    "min_loss": Column(("min", "observed"), torch.float64, False, lambda v: _where_seen(v, _f64(v["min"])),
                       "[N] float64 lowest per-epoch loss (extras)"),
    "loss_mean": Column(("mean", "observed"), torch.float64, False, lambda v: _where_seen(v, _f64(v["mean"])),
                        "[N] float64 mean of L[., i] over observed epochs (extras)"),
    "loss_std": Column(("m2", "observed"), torch.float64, False, _std,
                       "[N] float64 population std of L[., i] over observed epochs (extras)"),
    "grad_energy": Column(("energy_total",), torch.float64, False, lambda v: _f64(v["energy_total"]),
                          "[N] float64 sum over tokens and epochs of ||softmax - onehot||^2 (extras)"),
    "geometric_confidence": Column(("mean", "observed"), torch.float64, False,
                                   lambda v: _where_seen(v, _f64(v["mean"]).neg_().exp_()),
                                   "[N] float64 exp(-loss_mean), the geometric mean over epochs of the per-epoch "
                                   "geometric-mean token probability (extras; what Scores.confidence was before the "
                                   "cartography group)"),
    # the cartography group (csrc/state_stats.def; docs/method.md, "Data cartography")
    "confidence": Column(("p_mean", "observed"), torch.float64, False, lambda v: _where_seen(v, _f64(v["p_mean"])),
                         "[N] float64 mean over observed epochs of P[t, i], the epoch's mean token p(y) "
                         "(Swayamdipta et al. 2020's confidence; cartography)"),
    "variability": Column(("p_m2", "observed"), torch.float64, False, _p_std,
                          "[N] float64 population std over observed epochs of P[t, i] (Swayamdipta et al. 2020's "
                          "variability; cartography)"),
    "accuracy_last": Column(("acc_last", "observed"), torch.float64, False,
                            lambda v: _where_seen(v, _f64(v["acc_last"])),
                            "[N] float64 token accuracy (fraction of argmax-correct tokens) at the last observed epoch: "
                            "exact memorization (Tirumala et al. 2022); NaN if never observed (cartography)"),
    "correctness": Column(("learnt",), torch.int32, False, lambda v: v["learnt"].to(torch.int32, copy=True),
                          "[N] int32 epochs in which the sample was learnt (every token argmax-correct; for one-row "
                          "samples the epochs predicted correctly, Swayamdipta et al. 2020) (cartography)"),
    "forgetting": Column(("forgot",), torch.int32, False, lambda v: v["forgot"].to(torch.int32, copy=True),
                         "[N] int32 forgetting events, learnt -> not learnt between consecutive observations "
                         "(Toneva et al. 2019); 0 for never-learnt samples, see never_learnt (cartography)"),
    "first_learned": Column(("first_learnt",), torch.float64, False, _first_learned,
                            "[N] float64 the first (1-based) epoch in which the sample was learnt; NaN if never "
                            "(cartography)"),
    "never_learnt": Column(("learnt", "observed"), torch.bool, False, _never_learnt,
                           "[N] bool: observed but never learnt (Toneva et al. 2019 give these the most forgetting "
                           "events; cartography)"),
    # derived columns that Scores exposes as properties, computed straight from the statistics
    "gain": Column(("diff_sum", "diff_count", "last", "observed"), torch.float64, False, _gain,
                   "[N] float64 difficulty - last_loss"),
    "scored": Column(("diff_count",), torch.bool, False, lambda v: v["diff_count"] > 0,
                     "[N] bool: seen in at least one burn-in epoch"),
}
