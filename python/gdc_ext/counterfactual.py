"""Counterfactual references: the loss of each sample under a model that did not train on it.

A score read at the end of a run cannot tell a sample that is easy because it generalizes from
one the model memorized: both have a low last loss. The loss of the same sample under a model
that never saw it separates the two (reference-model calibration, Watson et al. 2022; LiRA's
reference models, Carlini et al. 2022; counterfactual memorization, Zhang et al. 2021): an easy
sample is easy for that model too, a memorized one is not. The calibrated scores ``"excess"``
(``ref - last``) and ``"relative_excess"`` (``1 - last / ref``) of :func:`gdc_ext.score_values`
take such a reference.

Three ways to get a model that did not train on a sample (docs/method.md, "Counterfactual
references"):

- the initial model of a fine-tuning run: score the training set once before the first step
  (:func:`reference_losses`; ``Cartographer(..., reference="initial")`` and the integrations do
  it for you);
- cross-fit halves: :func:`crossfit_split` splits the ids into two halves keeping groups
  (duplicates: :func:`duplicate_groups`) on one side; a model trained on one half scores the
  other;
- any other model with the same tokenizer, trained on independent data of the same source.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Iterable, Optional, Tuple

import numpy as np
import torch

from gdc_ext import functional
from gdc_ext._seed import check_seed
from gdc_ext.layout import ACC_COUNT, ACC_LOSS_SUM, TENSOR_DTYPES
from gdc_ext.linear_cross_entropy import linear_cross_entropy
from gdc_ext.references import _chunks, _classify
from gdc_ext.state import CartoState

__all__ = ["reference_losses", "crossfit_split", "duplicate_groups", "default_forward"]


def default_forward(model: torch.nn.Module, batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain-loop batch: ``(inputs, targets, sample_ids)`` with ``model(inputs)`` the logits
    [..., V] for targets [...]; sample_ids [B] (one per sequence) or one per target token."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise ValueError(f"batches: each batch must be an (inputs, targets, sample_ids) triple for the default "
                         f"forward (model(inputs) -> logits), got {type(batch).__name__}"
                         f"{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}; "
                         f"pass forward=(model, batch) -> (logits, targets, sample_ids) for other batches")
    inputs, targets, ids = batch
    out = model(inputs)
    logits = out["logits"] if isinstance(out, dict) else (out.logits if hasattr(out, "logits") else out)
    return logits, targets, ids


def _device_of(model: torch.nn.Module) -> Optional[torch.device]:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


@torch.no_grad()
def reference_losses(model: torch.nn.Module, batches: Iterable, num_samples: int, *, ignore_index: int = -100,
                     forward: Optional[Callable] = None, linear_head: Optional[torch.nn.Linear] = None,
                     ids=None, progress: bool = True) -> torch.Tensor:
    """Each sample's mean token NLL (nats) under ``model``: a no-grad pass through the fused kernel.

    The pass records exactly as training does (the same kernel, token and id rules: per-sequence
    [B] or per-token ids, ``ignore_index`` targets skipped), so scoring the model of a training
    step gives, bit for bit, the loss that step records. The model is put in eval mode (dropout
    off) for the pass and back in its previous mode after.

    Args:
        model: the reference model (``torch.nn.Module``).
        batches: an iterable of batches (a DataLoader, a list, ...), each ``(inputs, targets,
            sample_ids)`` with ``model(inputs)`` returning logits [..., V] (a tensor, or a dict /
            output object with ``logits``) for integer targets [...]; or any batch with ``forward``.
        num_samples: N, the number of sample ids (ids are 0..N-1).
        ignore_index: targets with this value are not scored (their ids are not read).
        forward: ``(model, batch) -> (logits, targets, sample_ids)`` for other batch shapes (a
            Hugging Face batch dict, say: shift the labels yourself).
        linear_head: the model's output projection (an ``nn.Linear`` [V, H]) for the fused linear
            path: ``forward`` then returns hidden states [..., H] in place of logits, and each
            batch's loss runs through :func:`gdc_ext.linear_cross_entropy` without materializing
            the logits (a large vocabulary, or a Hugging Face model; see
            :func:`gdc_ext.integrations.hf.reference_losses`).
        ids: the samples ``batches`` are meant to cover (int64 [M], e.g. one cross-fit half);
            None: all N. A warning names how many of them got no scored token.
        progress: show a tqdm progress bar.

    With torch.distributed initialised (world size > 1), every rank passes its share of the
    batches (e.g. a DistributedSampler's) and the token sums and counts are all-reduced, so
    every rank returns the same [N] reference.

    Returns:
        [N] float64 (CPU): the mean NLL over each sample's scored tokens, rounded to float32 like
        the state's last loss (so equal to the ``last_loss`` of a training pass over the same
        model and batches, bit for bit); NaN for a sample with no
        scored token in ``batches`` (a warning counts them). A calibrated score needs a finite
        reference for every sample, so cover the whole set.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if ids is not None:
        t = torch.as_tensor(ids)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or (t.numel() and (
                int(t.min()) < 0 or int(t.max()) >= int(num_samples))):
            raise ValueError(f"ids must be a 1-D integer tensor of sample ids in [0, {num_samples}), got "
                             f"{tuple(t.shape)} {t.dtype}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if linear_head is not None and not isinstance(linear_head, torch.nn.Linear):
        raise ValueError(f"linear_head must be an nn.Linear (the output projection) or None, "
                         f"got {type(linear_head).__name__}")
    if forward is None:
        forward = default_forward
    elif not callable(forward):
        raise ValueError(f"forward must be a callable (model, batch) -> (logits, targets, sample_ids), "
                         f"got {type(forward).__name__}")
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    state: Optional[CartoState] = None
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, total=total, desc="reference losses", unit="batch", disable=not progress):
            logits, targets, batch_ids = forward(model, batch)
            what = "hidden states [..., H]" if linear_head is not None else "logits [..., V]"
            if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
                raise ValueError(f"forward must return {what} as a tensor, got {type(logits).__name__}")
            if state is None:  # on the logits' device, so the kernel records where it computes
                state = CartoState(int(num_samples), burn_in=1, eps=1.0, device=logits.device, extras=False)
            targets = torch.as_tensor(targets, device=logits.device)
            batch_ids = torch.as_tensor(batch_ids, device=logits.device)
            flat = logits.reshape(-1, logits.shape[-1])
            if linear_head is None:
                functional.cross_entropy(flat, targets.reshape(-1), batch_ids, state=state, ignore_index=ignore_index,
                                         reduction="sum", record=True)
            else:
                linear_cross_entropy(flat.to(linear_head.weight.dtype), linear_head.weight, targets.reshape(-1), batch_ids,
                                     linear_bias=linear_head.bias, ignore_index=ignore_index, reduction="sum",
                                     state=state, record=True)
    finally:
        model.train(was_training)
    distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_world_size() > 1)
    if state is None and distributed:  # this rank's share was empty: it still joins the sum
        state = CartoState(int(num_samples), burn_in=1, eps=1.0, device=_device_of(model) or "cpu", extras=False)
    if state is None:
        raise ValueError("batches is empty: there is nothing to score")
    if distributed:
        # each rank scored its share of the batches (a distributed sampler): sum the token losses
        # and counts, so every rank ends with every sample's mean
        torch.distributed.all_reduce(state.acc)
    acc = state.acc.detach().cpu()
    count = acc[:, ACC_COUNT]
    out = torch.where(count > 0, acc[:, ACC_LOSS_SUM] / count.clamp(min=1), torch.full_like(count, float("nan")))
    # rounded as the state stores a last loss (float32 folded statistics, csrc/state_stats.def), so
    # that scoring a training step's model gives, bit for bit, the last_loss that step records
    out = out.to(TENSOR_DTYPES["fstats"]).to(torch.float64)
    expected = count if ids is None else count[torch.as_tensor(ids, dtype=torch.int64).reshape(-1)]
    missing = int((expected == 0).sum())
    if missing:
        warnings.warn(f"reference_losses: {missing} of {expected.numel()} samples had no scored token in batches; "
                      f"their reference is NaN (a calibrated score needs every sample covered)", UserWarning,
                      stacklevel=3)
    return out


def crossfit_split(num_samples: int, groups=None, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two halves of the ids 0..N-1 for cross-fit references, keeping each group on one side.

    Train one model on each half; each scores the half it did not see (:func:`reference_losses`),
    so every sample gets the loss of a model that never trained on it. Identical samples must
    sit on the same side, or the "unseen" model has seen a copy: pass ``groups`` (e.g.
    :func:`duplicate_groups`; also documents of one source, a user's records, ...).

    Args:
        num_samples: N.
        groups: [N] integer group labels (tensor, array or sequence; any values) or None (each
            sample its own group).
        seed: the seeded order in which groups are dealt out.

    Returns:
        (half_a, half_b): sorted int64 id tensors, disjoint, covering 0..N-1; groups are dealt in
        a seeded random order, each to the half with fewer samples so far, so the halves differ by
        at most the size of the largest group.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (two non-empty halves), got {num_samples!r}")
    seed = check_seed(seed)
    N = int(num_samples)
    if groups is None:
        g = np.arange(N)
    else:
        g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
        if g.ndim != 1 or g.shape[0] != N:
            raise ValueError(f"groups must be 1-D with one label per sample ([N = {N}]), got shape {tuple(g.shape)}")
        if g.dtype.kind not in "iu":
            raise ValueError(f"groups must hold integer group labels, got dtype {g.dtype}")
    labels, inverse, sizes = np.unique(g, return_inverse=True, return_counts=True)
    if len(labels) < 2:
        raise ValueError("groups: all samples are in one group, so no split keeps it together with two halves")
    order = np.random.default_rng(seed).permutation(len(labels))
    side = np.zeros(len(labels), dtype=np.int8)
    filled = [0, 0]
    for k in order:
        s = 0 if filled[0] <= filled[1] else 1
        side[k] = s
        filled[s] += int(sizes[k])
    on_b = side[inverse] == 1
    return (torch.from_numpy(np.flatnonzero(~on_b)).to(torch.int64),
            torch.from_numpy(np.flatnonzero(on_b)).to(torch.int64))


def duplicate_groups(samples, ignore_index: int = -100, num_samples: Optional[int] = None) -> torch.Tensor:
    """[N] int64 group labels where samples with identical scored tokens share a label (the
    smallest id among them), for :func:`crossfit_split`.

    samples: the per-sample form (``samples[i]`` = sample i's 1-D tokens, or a 2-D [N, L] array)
        or the batch form (an iterable of ``(tokens [B, L], sample_ids [B] or [B, L])``), as
        :func:`gdc_ext.unigram_reference` takes. Tokens equal to ``ignore_index`` are left out.
        A sample's tokens are read in the order they come. num_samples: N for the batch form (by
        default the largest id + 1).
    """
    kind = _classify(samples)
    if kind == "iterator":
        samples = list(samples)
        kind = _classify(samples)
    parts: dict = {}
    for tok, ids in _chunks(samples, kind, ignore_index, num_samples)():
        for t, i in zip(tok.tolist(), ids.tolist()):
            parts.setdefault(i, []).append(t)
    n = num_samples if num_samples is not None else (len(samples) if kind in ("array", "list")
                                                      else max(parts, default=-1) + 1)
    out = np.arange(n, dtype=np.int64)
    first: dict = {}
    for i in range(n):
        key = hashlib.blake2b(np.asarray(parts.get(i, []), dtype=np.int64).tobytes(), digest_size=16).digest()
        out[i] = first.setdefault(key, i)
    return torch.from_numpy(out)
