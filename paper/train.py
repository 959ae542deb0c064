"""Training loop of the experiments: Algorithm 1 of the paper with a checkpoint at the burn-in.

Record phase: train T epochs on the full corpus with a recording CartoLoss, snapshot model and
optimizer at the end of epoch T_e (the burn-in), and read the scores after epoch T.
Intervention phase: from the burn-in snapshot, train the remaining T - T_e epochs on the
intervened data (some ids pruned, or per-sample loss weights), with the same data-order seed for
every intervention, so that interventions differ only in what they do to the data.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from gdc_ext import CartoLoss, CartoState
from paper.goldfish import apply_target_mask

__all__ = ["TrainSpec", "Snapshot", "RecordRun", "train_epoch", "run_epochs", "record_run", "record_phase",
           "intervention_phase"]


@dataclass
class TrainSpec:
    epochs: int = 8          # T
    burn_in: int = 3         # T_e
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    eps: tuple = (1.0,)      # forget thresholds tracked together (nats); which one scores: eps_index
    eps_index: int = 0


@dataclass
class Snapshot:
    model: dict
    opt: dict


def _optimizer(model: nn.Module, spec: TrainSpec):
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def train_epoch(model: nn.Module, opt, data: torch.Tensor, order: torch.Tensor, loss_fn, batch: int,
                clip: float = 0.0, desc: str = "", progress: bool = True,
                target_mask: Optional[torch.Tensor] = None) -> float:
    """One pass over ``order`` (sample ids into data [N, L], repeats allowed) in batches of ``batch``:
    next-token loss with one sample id per sequence. Returns the mean training loss of the pass.
    target_mask [N, L-1] bool: targets to leave out of the loss (set to ignore_index; goldfish
    loss). Shared by the reproduction and examples/demo.py."""
    model.train()
    total, steps = 0.0, 0
    for b in tqdm(range(0, len(order), batch), desc=desc, leave=False, disable=not progress, mininterval=1.0):
        bid = order[b:b + batch]
        x = data[bid]
        logits = model(x[:, :-1])
        tgt = x[:, 1:] if target_mask is None else apply_target_mask(x[:, 1:], target_mask[bid], loss_fn.ignore_index)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), bid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def run_epochs(model: nn.Module, opt, data: torch.Tensor, ids: torch.Tensor, loss_fn: CartoLoss, epochs: int,
               spec: TrainSpec, gen: torch.Generator, state: Optional[CartoState] = None,
               on_epoch: Optional[Callable[[int], None]] = None, desc: str = "", progress: bool = True,
               target_mask: Optional[torch.Tensor] = None) -> list:
    """Trains `epochs` passes over the sample ids `ids` (shuffled with gen) of data [N, L].
    Returns the mean training loss of each epoch."""
    losses = []
    for e in range(epochs):
        order = ids[torch.randperm(len(ids), generator=gen)]
        losses.append(train_epoch(model, opt, data, order, loss_fn, spec.batch, spec.clip,
                                  f"{desc} epoch {e + 1}/{epochs}", progress, target_mask))
        if state is not None:
            state.end_epoch()
        if on_epoch is not None:
            on_epoch(e + 1)
    return losses


@dataclass
class RecordRun:
    """One recording run: the model after T epochs, the scores after epoch T and after the label
    epoch k (labels a single training job could use), snapshots at the burn-in T_e and at k, and
    the per-epoch training losses."""

    model: nn.Module
    scores: object
    snap: Snapshot
    scores_k: object
    snap_k: Snapshot
    label_epoch: int
    losses: list


def record_run(make_model: Callable[[], nn.Module], data: torch.Tensor, spec: TrainSpec, seed: int,
               label_epoch: Optional[int] = None, progress: bool = True) -> RecordRun:
    """Trains T epochs with recording; snapshots (model, optimizer) at the end of epoch T_e and of
    the label epoch k (default T_e), where it also reads the scores."""
    k = spec.burn_in if label_epoch is None else int(label_epoch)
    if not spec.burn_in <= k <= spec.epochs:
        raise ValueError(f"label_epoch must be in [burn_in, epochs] = [{spec.burn_in}, {spec.epochs}], got {k}")
    torch.manual_seed(seed)
    model = make_model()
    opt = _optimizer(model, spec)
    N = data.shape[0]
    eps = spec.eps[0] if len(spec.eps) == 1 else list(spec.eps)
    # extras: the reproduction reads grad_energy and loss_mean (paper/run.py), opt-in since the compact layout
    state = CartoState(N, burn_in=spec.burn_in, eps=eps, extras=True)
    loss_fn = CartoLoss(state=state)
    gen = torch.Generator().manual_seed(seed)
    snap = {}

    def on_epoch(e):
        if e in (spec.burn_in, k):
            snap[e] = Snapshot(copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        if e == k:
            snap["scores_k"] = state.scores()
    losses = run_epochs(model, opt, data, torch.arange(N), loss_fn, spec.epochs, spec, gen, state=state,
                        on_epoch=on_epoch, desc="record", progress=progress)
    return RecordRun(model, state.scores(), snap[spec.burn_in], snap["scores_k"], snap[k], k, losses)


def record_phase(make_model: Callable[[], nn.Module], data: torch.Tensor, spec: TrainSpec, seed: int,
                 progress: bool = True):
    """Trains T epochs with recording. Returns (model after T epochs, scores, burn-in Snapshot,
    per-epoch training losses)."""
    r = record_run(make_model, data, spec, seed, progress=progress)
    return r.model, r.scores, r.snap, r.losses


def intervention_phase(make_model: Callable[[], nn.Module], data: torch.Tensor, spec: TrainSpec, snap: Snapshot,
                       seed: int, keep: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                       desc: str = "", progress: bool = True, start_epoch: Optional[int] = None,
                       target_mask: Optional[torch.Tensor] = None) -> nn.Module:
    """From a snapshot taken at the end of epoch start_epoch (default: the burn-in T_e), trains the
    remaining T - start_epoch epochs on the kept ids (all when None) with the given per-sample loss
    weights [N] (none when None) and target mask [N, L-1] (goldfish; none when None). The data
    order depends on (seed, start_epoch) only, so interventions from one snapshot differ only in
    what they do to the data."""
    start = spec.burn_in if start_epoch is None else int(start_epoch)
    model = make_model()
    model.load_state_dict(snap.model)
    opt = _optimizer(model, spec)
    opt.load_state_dict(copy.deepcopy(snap.opt))
    loss_fn = CartoLoss()
    if weights is not None:
        loss_fn.set_sample_weights(weights)
    ids = torch.arange(data.shape[0]) if keep is None else torch.as_tensor(keep, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed * 7919 + start)
    run_epochs(model, opt, data, ids, loss_fn, spec.epochs - start, spec, gen, desc=desc, progress=progress,
               target_mask=target_mask)
    model.eval()
    return model
