"""The torch fallback of :func:`gdc_ext.functional.cross_entropy`: inputs the fused kernel does
not take (class-probability targets, float64 logits, CUDA tensors without CUDA kernels) are
computed by ``F.cross_entropy`` with the same results; recording and per-sample weights are
added around it in plain torch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gdc_ext._recording import recording_into
from gdc_ext._reduction import mean_denominator, reduce_rows
from gdc_ext._rows import as_rows, expand_sample_ids
from gdc_ext import layout
from gdc_ext.ops import ArgumentError

__all__ = ["cross_entropy", "record"]


def cross_entropy(input: torch.Tensor, target: torch.Tensor, sample_ids: Optional[torch.Tensor], *, state,
                  weight: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float,
                  sample_weight: Optional[torch.Tensor], recording: bool, weighted: bool) -> torch.Tensor:
    """torch's own computation; arguments as :func:`gdc_ext.functional.cross_entropy` resolved
    them (``recording``: record into ``state``; ``weighted``: apply ``sample_weight``)."""
    if not (recording or weighted):
        return F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    # torch first: its own checks of the input and target reject bad arguments with its error types
    per = F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    if target.dtype.is_floating_point:
        raise ArgumentError("target: recording or per-sample weights need class-index targets; "
                            "class-probability targets carry no single token to score")
    logits, tgt = as_rows(input, target)
    ids = expand_sample_ids(sample_ids, target, tgt.shape[0])
    valid = tgt != ignore_index
    N = state.num_samples if state is not None else sample_weight.numel()
    bad = valid & ((ids < 0) | (ids >= N))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ArgumentError(f"sample_ids[{r}] = {int(ids[r])} is out of range: expected a sample id in [0, {N})")
    if recording:
        record(state, logits.detach(), tgt, ids, valid)
    flat = per.reshape(-1)
    if weighted:
        flat = flat * sample_weight.to(flat.device, flat.dtype)[ids.clamp(0, N - 1)] * valid
    denom = mean_denominator(tgt, valid, weight, logits.shape[1], flat.dtype) if reduction == "mean" else None
    return reduce_rows(flat, reduction, denom).reshape(per.shape if reduction == "none" else ())


def record(state, logits: torch.Tensor, tgt: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
    """Adds each valid row's NLL, a count of one, (with extras) its gradient energy and (with the
    cartography group) its p(y) = exp(-NLL) and argmax correctness to ``state.acc[ids]``, rounded
    through float32 like the kernel's per-row values (logits [R, V]; tgt, ids, valid [R])."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    t = tgt.clamp(0, logits.shape[1] - 1)
    nll = -logp.gather(1, t[:, None])[:, 0]
    p = logp.exp()
    energy = (p * p).sum(1) - 2 * p.gather(1, t[:, None])[:, 0] + 1
    if not bool(torch.isfinite(nll[valid]).all()):
        raise ArgumentError("input (logits) gives a non-finite loss: NaN or inf logits cannot be recorded; "
                            "the CartoState was left unchanged")
    # one column per accumulator statistic of the state, by its per-row source (csrc/state_stats.def)
    nll32 = nll.float().double()
    values = {"nll": nll32, "one": torch.ones_like(nll), "energy": energy.float().double()}
    if state.groups & layout.CARTOGRAPHY:
        # the kernel's p(y) (exp of the float32 NLL) and torch.argmax's rule (first index among ties)
        values["p_y"] = torch.exp(-nll32)
        values["correct"] = (logits.argmax(dim=-1) == tgt).double()
    upd = torch.stack([values[src] for src in layout.acc_sources(state.groups)], 1)
    # under the state's lock (threads sharing it); a sharded state gives a per-call accumulator
    dev = state.device
    with recording_into(state, True, ids[valid].to(dev), torch.empty(0, device=dev)) as (rows, _, acc):
        acc.index_add_(0, rows, upd[valid].to(acc.device))
