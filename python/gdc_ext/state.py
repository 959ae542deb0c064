"""CartoState: the O(N) per-sample training-dynamics state that CartoLoss records into.

No tensor here grows with the number of epochs: each epoch's losses are folded into running
statistics by ``end_epoch()`` (see docs/method.md for the exact definitions).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from gdc_ext import ops
from gdc_ext._io import write_atomic
from gdc_ext.layout import (ACC_COLS, ACC_COUNT, F_COLS_BASE, F_COLS_EXTRAS, F_DIFF_SUM, F_ENERGY, F_LAST, F_M2, F_MEAN, F_MIN,
                            I_COLS, I_DIFF_COUNT, I_OBSERVED, I_TRANSITIONS)
from gdc_ext.layout import ACC_LOSS_SUM

__all__ = ["CartoState", "Scores", "FORMAT_VERSION", "MAX_RECORD_COUNT", "check_reference"]

FORMAT_VERSION = 1
# The largest count one row may carry in CartoState.record: 2**53, the largest float64 up to which
# every integer count is exact. Larger counts (1e308, say) would overflow the accumulator to inf
# and end the epoch with NaN scores, so they are refused.
MAX_RECORD_COUNT = 2.0 ** 53
_TENSORS = ("acc", "fstats", "istats", "forgets", "epoch", "eps")


def check_reference(reference, num_samples: int, positive: bool = False) -> torch.Tensor:
    """A per-sample reference loss (nats per token) as a CPU float64 tensor [N], checked.

    reference: [N] real numbers (a tensor, NumPy array or sequence), all finite (and > 0 with
    ``positive``, as a ratio needs). Raises a ValueError naming ``reference`` and what was
    expected for None, a non-numeric or non-1-D input, a wrong length, a NaN/inf value or (with
    ``positive``) a value <= 0.
    """
    what = (f"a 1-D [N = {num_samples}] array of finite{' positive' if positive else ''} per-sample reference "
            f"losses (nats per token)")
    if reference is None:
        raise ValueError(f"reference is required here: expected {what}")
    if isinstance(reference, torch.Tensor):
        if reference.dtype == torch.bool or reference.dtype.is_complex:
            raise ValueError(f"reference must be {what}, got a {reference.dtype} tensor")
        a = reference.detach().cpu().to(torch.float64).numpy()
    else:
        try:
            a = np.asarray(reference)
        except (ValueError, TypeError) as e:  # ragged nested sequences
            raise ValueError(f"reference must be {what}, got {type(reference).__name__} ({e})") from None
        if a.dtype.kind not in "iuf":  # not bool, complex, strings or objects
            raise ValueError(f"reference must be {what}, got dtype {a.dtype}")
        a = a.astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"reference must be {what}, got shape {tuple(a.shape)}")
    if a.shape[0] != num_samples:
        raise ValueError(f"reference must be {what}, got {a.shape[0]} values")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"reference must be {what}, got {bad.size} NaN/inf value(s) (first at id {int(bad[0])})")
    if positive:
        bad = np.flatnonzero(a <= 0)
        if bad.size:
            raise ValueError(f"reference must be {what} (relative_excess divides by it), got {bad.size} value(s) <= 0 "
                             f"(first at id {int(bad[0])}: {a[bad[0]]!r})")
    return torch.from_numpy(a.copy())


@dataclass
class Scores:
    """Per-sample scores after the epochs folded so far. All tensors are on the CPU.

    Shapes: N samples; K thresholds (``eps``). Memorization and forget counts are kept per
    threshold, always [N, K]: read one threshold with :meth:`memorization_at` /
    :meth:`forgets_at`. The :attr:`memorization` / :attr:`forgets` convenience properties are
    [N] when the state was built with a single float ``eps`` (``single_eps``) and [N, K] when
    built with a sequence.
    """

    difficulty: torch.Tensor            # [N] float64, NaN where no burn-in epoch was observed
    memorization_by_eps: torch.Tensor   # [N, K] float64, forgets / transitions (0 if no transition)
    forgets_by_eps: torch.Tensor        # [N, K] int32, forget events per threshold
    transitions: torch.Tensor     # [N] int32, consecutive-observation pairs
    observed: torch.Tensor        # [N] int32, epochs in which the sample was seen
    last_loss: torch.Tensor       # [N] float64, NaN if never observed
    min_loss: Optional[torch.Tensor]     # [N] float64 (extras)
    loss_mean: Optional[torch.Tensor]    # [N] float64, mean of L[., i] over observed epochs (extras)
    loss_std: Optional[torch.Tensor]     # [N] float64, population std of L[., i] (extras)
    grad_energy: Optional[torch.Tensor]  # [N] float64, sum over tokens and epochs of ||softmax - onehot||^2
    eps: tuple                    # the K thresholds (nats), in the order of the columns
    epoch: int
    burn_in: int
    single_eps: bool = False      # built with one float eps: the convenience properties are [N]

    def __post_init__(self):
        # Scores built by hand with [N] tables (one threshold) are stored [N, 1] like all others.
        if self.memorization_by_eps.dim() == 1:
            self.memorization_by_eps = self.memorization_by_eps[:, None]
            self.single_eps = True
        if self.forgets_by_eps.dim() == 1:
            self.forgets_by_eps = self.forgets_by_eps[:, None]
        self.eps = tuple(float(e) for e in self.eps)
        K = len(self.eps)
        for name in ("memorization_by_eps", "forgets_by_eps"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[1] != K or t.shape[0] != self.difficulty.shape[0]:
                raise ValueError(f"{name} must be [N, K] = [{self.difficulty.shape[0]}, {K}] (K = len(eps)), "
                                 f"got {tuple(t.shape)}")

    # ----------------------------------------------------------------------------- per threshold
    def _column(self, eps: Optional[float]) -> int:
        """Column of the [N, K] tables for a tracked threshold (None: the first)."""
        if eps is None:
            return 0
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
            raise ValueError(f"eps must be a float equal to one of the tracked thresholds {list(self.eps)} or None, "
                             f"got {eps!r}")
        gaps = np.abs(np.asarray(self.eps) - float(eps))
        k = int(np.argmin(gaps))
        if not np.isclose(float(eps), self.eps[k]):
            raise ValueError(f"eps = {eps!r} is not a tracked threshold; these scores track eps = {list(self.eps)}")
        return k

    def memorization_at(self, eps: Optional[float] = None) -> torch.Tensor:
        """[N] float64 memorization m_i at the tracked threshold ``eps`` (np.isclose to one of
        :attr:`eps`; None: the first). Raises ValueError for an untracked ``eps``."""
        return self.memorization_by_eps[:, self._column(eps)]

    def forgets_at(self, eps: Optional[float] = None) -> torch.Tensor:
        """[N] int32 forget events at the tracked threshold ``eps`` (as :meth:`memorization_at`)."""
        return self.forgets_by_eps[:, self._column(eps)]

    @property
    def memorization(self) -> torch.Tensor:
        """[N] float64 for a state built with one float eps, else [N, K]. Library code uses
        :meth:`memorization_at`, whose shape does not depend on how the state was built."""
        return self.memorization_by_eps[:, 0] if self.single_eps else self.memorization_by_eps

    @property
    def forgets(self) -> torch.Tensor:
        """[N] int32 for a state built with one float eps, else [N, K] (see :attr:`memorization`)."""
        return self.forgets_by_eps[:, 0] if self.single_eps else self.forgets_by_eps

    # ----------------------------------------------------------------------------- derived
    @property
    def scored(self) -> torch.Tensor:
        """[N] bool: samples with a difficulty (seen in at least one burn-in epoch)."""
        return ~torch.isnan(self.difficulty)

    @property
    def gain(self) -> torch.Tensor:
        """[N] float64 learning gain ``difficulty - last_loss``: hard during burn-in, easy at the
        last observation, as a rote-learnt sample looks (docs/method.md, "Scores beyond the
        paper"). NaN where unscored (no burn-in difficulty)."""
        return self.difficulty.double() - self.last_loss.double()

    def excess(self, reference) -> torch.Tensor:
        """[N] float64 reference-calibrated excess ``reference - last_loss``: how much lower the
        model's last loss is than a reference that predicts the sample without memorizing it.

        reference: [N] per-sample reference loss in nats per token (tensor or array, finite),
            e.g. a unigram model's mean token NLL of the sample. ValueError otherwise.
        NaN where the sample was never observed (no last loss).
        """
        ref = check_reference(reference, self.difficulty.shape[0])
        return ref - self.last_loss.double()

    def relative_excess(self, reference) -> torch.Tensor:
        """[N] float64 relative excess ``1 - last_loss / reference``: the fraction of the reference's
        loss that the model no longer pays on the sample. Where the model fits everything (every
        last loss far below every reference) the absolute excess is large for ordinary samples too;
        the ratio divides that out (docs/method.md, "Counterfactual references").

        reference: [N] per-sample reference losses in nats per token, finite and > 0 (the loss of
            a model that did not train on the sample, e.g. :func:`gdc_ext.reference_losses`).
        NaN where the sample was never observed (no last loss).
        """
        ref = check_reference(reference, self.difficulty.shape[0], positive=True)
        return 1.0 - self.last_loss.double() / ref

    @property
    def confidence(self) -> Optional[torch.Tensor]:
        """Cartography's confidence analogue: exp(-mean loss), the geometric-mean token probability."""
        return None if self.loss_mean is None else torch.exp(-self.loss_mean)

    @property
    def variability(self) -> Optional[torch.Tensor]:
        """Cartography's variability analogue: std of the per-epoch loss."""
        return self.loss_std

    def quadrants(self, alpha_d: float = 0.75, alpha_m: float = 0.75, eps_index: Optional[int] = None, *,
                  eps: Optional[float] = None, by: Optional[str] = None, memorization: Optional[str] = None,
                  reference=None, seed: int = 0):
        """Quadrant codes from these scores; see :func:`gdc_ext.cartography.quadrants`.

        by (or its alias ``memorization``): the score on the memorized axis, one of
            :data:`gdc_ext.cartography.SCORES` (default "memorization", the paper's m_i); see
            :func:`gdc_ext.cartography.score_values`. ``reference`` [N] is needed by "excess",
            ``seed`` is used by "random".
        eps / eps_index: the threshold of m_i (a tracked value / its position; default the first).
        """
        from gdc_ext.cartography import quadrants, score_values

        if by is not None and memorization is not None and by != memorization:
            raise ValueError(f"give by or memorization (the same choice), not both: got by={by!r}, "
                             f"memorization={memorization!r}")
        name = by if by is not None else (memorization if memorization is not None else "memorization")
        m = score_values(self, name, seed=seed, eps=eps, eps_index=eps_index, reference=reference)
        return quadrants(self.difficulty, m, alpha_d=alpha_d, alpha_m=alpha_m)


class CartoState:
    """Per-sample accumulators for N training samples.

    Args:
        num_samples: N, the number of sample ids (ids are 0..N-1): an int >= 1 (NumPy ints and
            0-d integer tensors too).
        burn_in: T_e, the number of (1-based) epochs whose losses define difficulty (an int >= 1).
        eps: forget threshold in nats (a positive number or 0-d tensor), or a non-empty sequence
            of K thresholds tracked together (a list, tuple or 1-D tensor / array).
        device: where the state lives; CartoLoss must run on the same device.
        extras: also keep min loss, Welford mean/variance and gradient energy (+32 bytes/sample).

    A bad ``num_samples``, ``burn_in`` or ``eps`` (a string, None, a bool, a float count, nested
    lists, ...) raises a ValueError naming the argument.

    Memory: 24 (epoch accumulator) + 16 (+32 with extras) + 12 + 4K bytes per sample, whatever
    the number of epochs.
    """

    def __init__(self, num_samples: int, burn_in: int, eps: Union[float, Sequence[float]] = 0.1,
                 device: Union[str, torch.device] = "cpu", extras: bool = True):
        num_samples = _as_int("num_samples", num_samples, "a positive int")
        burn_in = _as_int("burn_in", burn_in, "an int >= 1 (epochs)")
        self._eps_scalar, eps_list = _eps_values(eps)
        self.num_samples = num_samples
        self.burn_in = burn_in
        self.extras = bool(extras)
        N, K, dev = self.num_samples, len(eps_list), torch.device(device)
        self.acc = torch.zeros(N, ACC_COLS, dtype=torch.float64, device=dev)
        self.fstats = torch.zeros(N, F_COLS_EXTRAS if extras else F_COLS_BASE, dtype=torch.float64, device=dev)
        self.istats = torch.zeros(N, I_COLS, dtype=torch.int32, device=dev)
        self.forgets = torch.zeros(N, K, dtype=torch.int32, device=dev)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=dev)
        self.eps = torch.tensor(eps_list, dtype=torch.float64, device=dev)
        self.process_group = None  # torch.distributed group to all-reduce over (None: the default group)

    # ----------------------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def num_eps(self) -> int:
        return int(self.eps.numel())

    @property
    def epochs_done(self) -> int:
        """Epochs folded so far (a host read of a one-element tensor)."""
        return int(self.epoch.item())

    def tensors(self) -> dict:
        return {name: getattr(self, name) for name in _TENSORS}

    def nbytes(self) -> int:
        """Total bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: Union[str, torch.device]) -> "CartoState":
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self

    def __repr__(self) -> str:
        return (f"CartoState(num_samples={self.num_samples}, burn_in={self.burn_in}, eps={self.eps.tolist()}, "
                f"device={self.device}, extras={self.extras})")

    # ----------------------------------------------------------------------------- epochs
    def end_epoch(self) -> None:
        """Folds this epoch's accumulated losses into the scores and clears the accumulators.

        With torch.distributed initialised (world size > 1), the accumulators are first summed
        across ranks, so every rank ends with identical scores.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size(self.process_group) > 1:
                torch.distributed.all_reduce(self.acc, group=self.process_group)
        # An epoch that recorded nothing is almost always a wiring mistake (no sample ids, the loss
        # in eval mode, ...). The check reads the accumulator, which is free on the CPU; on a GPU it
        # would cost a host synchronisation every epoch, so there it is skipped.
        if self.acc.device.type == "cpu" and not bool((self.acc[:, ACC_COUNT] > 0).any()):
            warnings.warn(f"CartoState.end_epoch: nothing was recorded in epoch {self.epochs_done + 1}: no loss "
                          f"was recorded with sample ids since the last end_epoch(), so no sample is observed in "
                          f"it (were sample_ids passed to the loss, or record() called?)", UserWarning,
                          stacklevel=2)
        ops.end_epoch_(self.acc, self.fstats, self.istats, self.forgets, self.epoch, self.eps, self.burn_in)

    def record(self, losses: torch.Tensor, sample_ids: torch.Tensor,
               counts: Optional[Union[torch.Tensor, float]] = None) -> None:
        """Accumulates per-row or per-sample losses of any model into this epoch's accumulator.

        For losses that CartoLoss does not compute: a diffusion model's per-sample MSE, a VAE's
        ELBO, Liger's or CCE's ``reduction="none"`` token losses, ... The semantics are those of
        the fused kernel's recording: the epoch's loss of sample i is the sum of its recorded
        losses weighted by their counts over the sum of the counts, i.e. with ``counts=None`` the
        mean of the rows recorded for it in the epoch, and :meth:`end_epoch` folds it as usual.

        Args:
            losses: float tensor of any shape S, one loss per row (a token, a sample, ...).
            sample_ids: integer tensor of shape S (one id per row), or 1-D [B] with one id per
                sequence, the flattened losses being B equal consecutive groups (per-sequence ids of
                [B, L] or flat [B*L] losses), exactly as CartoLoss reads sample ids.
            counts: how many tokens each loss averages over (a per-sample mean loss over n tokens
                counts as n rows of that loss); a tensor of shape S or [B] like sample_ids (a bool mask counts
                True as 1), or a number. None:
                each row counts once. A count of 0 skips its row (its id and loss are not read),
                so a padding mask can be passed as ``counts``. Counts are finite, >= 0 and at
                most :data:`MAX_RECORD_COUNT` (2**53), and each ``loss * count`` (and the batch's
                sum of them added to the accumulator) must stay within float64's range.

        Recording is explicit: it happens whatever the grad mode and model mode, and never
        touches autograd (the losses are detached). Inputs are moved to the state's device. The
        gradient-energy column is left unchanged: it is not defined for an arbitrary loss, so
        ``Scores.grad_energy`` counts only what CartoLoss recorded.

        Invalid input: on the CPU it is validated eagerly and raises ValueError naming the
        argument (ids out of [0, N), a non-finite loss, a negative or non-finite count, shapes
        that do not match, a count above the bound or losses * counts that overflow float64),
        leaving the state unchanged. On CUDA nothing is validated on the host,
        since that would synchronise: a batch with any invalid row is skipped as a whole on the
        device (mask-and-skip, as the fused CUDA kernel does), so the state is again unchanged.
        """
        acc = self.acc
        dev = acc.device
        if not isinstance(losses, torch.Tensor):
            raise ValueError(f"losses must be a float tensor, got {type(losses).__name__}")
        if not losses.dtype.is_floating_point:
            raise ValueError(f"losses must be a floating-point tensor, got {losses.dtype}")
        loss = losses.detach().to(dev, torch.float64).reshape(-1)
        ids = _rows_like("sample_ids", sample_ids, losses, dev, integer=True)
        if counts is None:
            cnt = torch.ones_like(loss)
        elif _is_real_number(counts):
            try:
                c = float(counts)
            except OverflowError:  # a Python int beyond float64 (10**400)
                c = float("inf")
            if not 0 <= c <= MAX_RECORD_COUNT:
                raise ValueError(f"counts = {_short(counts)}: expected a finite count in [0, 2**53]")
            cnt = torch.full_like(loss, c)
        else:
            cnt = _rows_like("counts", counts, losses, dev, integer=False).to(torch.float64)
        N = self.num_samples
        used = cnt > 0
        # what each row adds to the loss sum; unused rows add 0 (a skipped row's loss is not read)
        prod = torch.where(used, loss * cnt, torch.zeros((), dtype=torch.float64, device=dev))
        if dev.type == "cpu":
            bad = (~torch.isfinite(cnt)) | (cnt < 0) | (cnt > MAX_RECORD_COUNT)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise ValueError(f"counts[{r}] = {float(cnt[r])}: expected a finite count in [0, 2**53]")
            bad = used & ((ids < 0) | (ids >= N))
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise ValueError(f"sample_ids[{r}] = {int(ids[r])} is out of range: expected a sample id in [0, {N})")
            bad = used & ~torch.isfinite(loss)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise ValueError(f"losses[{r}] = {float(loss[r])} is not finite: NaN or inf losses cannot be "
                                 f"recorded; the CartoState was left unchanged")
            bad = ~torch.isfinite(prod)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise ValueError(f"losses[{r}] * counts[{r}] = {float(loss[r])} * {float(cnt[r])} overflows float64; "
                                 f"the CartoState was left unchanged")
            if not bool(torch.isfinite(_sum_bound(acc, ids, used, prod))):
                raise ValueError("counts: the batch's losses * counts, added to this epoch's accumulator, overflow "
                                 "float64; the CartoState was left unchanged")
            ok = used
        else:
            # no host synchronisation: the batch's validity is a device scalar that masks every row
            in_range = (ids >= 0) & (ids < N)
            row_bad = (~torch.isfinite(cnt)) | (cnt < 0) | (cnt > MAX_RECORD_COUNT) \
                | (used & ~(in_range & torch.isfinite(loss) & torch.isfinite(prod)))
            ok = used & ~row_bad.any() & torch.isfinite(_sum_bound(acc, ids, used & in_range, prod))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        upd = torch.stack([torch.where(ok, prod, zero), torch.where(ok, cnt, zero), zero.expand_as(loss)], 1)
        acc.index_add_(0, torch.where(ok, ids, torch.zeros_like(ids)), upd)

    def reset_epoch(self) -> None:
        """Drops what was recorded since the last end_epoch() (an aborted epoch, say)."""
        self.acc.zero_()

    # ----------------------------------------------------------------------------- scores
    def scores(self) -> Scores:
        """The per-sample scores of the epochs folded so far (CPU tensors; see :class:`Scores`)."""
        f = self.fstats.detach().cpu()
        ist = self.istats.detach().cpu()
        fg = self.forgets.detach().cpu()
        diff_count = ist[:, I_DIFF_COUNT]
        observed = ist[:, I_OBSERVED].clone()
        transitions = ist[:, I_TRANSITIONS].clone()
        nan = torch.full_like(f[:, F_DIFF_SUM], float("nan"))
        difficulty = torch.where(diff_count > 0, f[:, F_DIFF_SUM] / diff_count.clamp(min=1).double(), nan)
        mem = torch.where(transitions[:, None] > 0, fg.double() / transitions.clamp(min=1)[:, None].double(),
                          torch.zeros_like(fg, dtype=torch.float64))
        seen = observed > 0
        last = torch.where(seen, f[:, F_LAST], nan)
        min_loss = loss_mean = loss_std = energy = None
        if self.extras:
            min_loss = torch.where(seen, f[:, F_MIN], nan)
            loss_mean = torch.where(seen, f[:, F_MEAN], nan)
            loss_std = torch.where(seen, torch.sqrt((f[:, F_M2] / observed.clamp(min=1).double()).clamp(min=0)), nan)
            energy = f[:, F_ENERGY].clone()
        return Scores(difficulty=difficulty, memorization_by_eps=mem, forgets_by_eps=fg.clone(),
                      transitions=transitions, observed=observed, last_loss=last, min_loss=min_loss,
                      loss_mean=loss_mean, loss_std=loss_std, grad_energy=energy, eps=tuple(self.eps.tolist()),
                      epoch=self.epochs_done, burn_in=self.burn_in, single_eps=self._eps_scalar)

    # ----------------------------------------------------------------------------- persistence
    def _meta(self) -> dict:
        return {"format": "gdc_ext.CartoState", "version": FORMAT_VERSION, "num_samples": self.num_samples,
                "burn_in": self.burn_in, "eps": self.eps.tolist(), "eps_scalar": self._eps_scalar,
                "extras": self.extras}

    def state_dict(self) -> dict:
        """Tensors (cloned, on the state's device) plus a ``meta`` dict of the configuration."""
        d = {name: t.clone() for name, t in self.tensors().items()}
        d["meta"] = self._meta()
        return d

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of a state with the same N, eps, burn-in and extras; all checks run
        before anything is replaced, so a rejected dict leaves this state unchanged."""
        for name, t in self._checked_state_dict(state_dict).items():
            setattr(self, name, t)

    def _checked_state_dict(self, state_dict: dict) -> dict:
        """The tensors :meth:`load_state_dict` would set (copies on this state's device), after all
        its checks; raises ValueError and changes nothing. Lets a caller that restores more than
        this state (a Cartographer) validate everything before it changes anything."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("meta"), dict):
            raise ValueError("state_dict: expected a dict from CartoState.state_dict() with a 'meta' entry")
        meta = state_dict["meta"]
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"state_dict: format version {meta.get('version')!r} is not supported "
                             f"(this gdc_ext reads version {FORMAT_VERSION})")
        mine = self._meta()
        for key in ("num_samples", "burn_in", "eps", "extras"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"state_dict: mismatched state: {key} is {meta.get(key)!r} in the saved state "
                                 f"but {mine[key]!r} in this CartoState")
        new = {}
        for name, t in self.tensors().items():
            s = state_dict.get(name)
            if not isinstance(s, torch.Tensor):
                raise ValueError(f"state_dict: missing tensor {name!r}")
            if s.shape != t.shape or s.dtype != t.dtype:
                raise ValueError(f"state_dict: tensor {name!r} has shape {tuple(s.shape)} {s.dtype}, "
                                 f"expected {tuple(t.shape)} {t.dtype}")
            new[name] = s.to(t.device).clone().contiguous()
        _check_consistent(new)
        return new

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the state to a safetensors file atomically (temp file, fsync, rename)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        meta = {"gdc_ext": json.dumps(self._meta())}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), prefix=".gdc-state-")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "CartoState":
        """Reads a state written by :meth:`save`. Raises ValueError for a missing, corrupted or
        foreign file, or one of another format version."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CartoState.load: no state file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                raw_meta = (fh.metadata() or {}).get("gdc_ext")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"CartoState.load: {path!r} is not a readable safetensors state file ({e})") from None
        if raw_meta is None:
            raise ValueError(f"CartoState.load: {path!r} has no gdc_ext metadata: not a CartoState file")
        meta = _parse_meta(raw_meta, lambda why: ValueError(f"CartoState.load: {path!r} {why}"))
        eps = meta["eps"][0] if meta["eps_scalar"] else meta["eps"]
        state = cls(meta["num_samples"], meta["burn_in"], eps, device=device, extras=meta["extras"])
        state.load_state_dict({**tensors, "meta": meta})
        return state


def _sum_bound(acc: torch.Tensor, ids: torch.Tensor, used: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
    """A device scalar bounding |acc[i, loss sum] + this batch's sum for i| over the batch's ids:
    the largest |loss sum| of a used id plus the batch's sum of |loss * count| (finite iff no
    sample's accumulated loss can overflow to inf in this record call). Ids of unused rows are
    not read (they may be out of range)."""
    zero = torch.zeros((), dtype=torch.float64, device=acc.device)
    held = torch.where(used, acc[torch.where(used, ids, torch.zeros_like(ids)), ACC_LOSS_SUM].abs(), zero)
    return (held.max() if held.numel() else zero) + prod.abs().sum()


def _parse_meta(raw: str, bad) -> dict:
    """The ``gdc_ext`` metadata of a saved state, every field checked, so a damaged or crafted file
    is a ValueError (made by ``bad(why)``, which names the file) naming the field, never a
    KeyError / AttributeError / TypeError from reading it, and nothing is allocated from an
    unchecked value."""
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad(f"has corrupted metadata ({e})") from None
    if not isinstance(meta, dict):
        raise bad(f"has corrupted metadata: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != "gdc_ext.CartoState":
        raise bad(f"has metadata field format = {_short(meta.get('format'))}: not a CartoState file")
    if isinstance(meta.get("version"), bool) or meta.get("version") != FORMAT_VERSION:
        raise bad(f"has format version {_short(meta.get('version'))}; this gdc_ext reads version {FORMAT_VERSION}")

    def field(name: str, ok, what: str):
        if name not in meta:
            raise bad(f"has incomplete metadata: field {name!r} is missing")
        if not ok(meta[name]):
            raise bad(f"has damaged metadata: field {name!r} must be {what}, got {_short(meta[name])}")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    field("num_samples", count, "an int >= 1")
    field("burn_in", count, "an int >= 1")
    field("eps", lambda v: isinstance(v, list) and len(v) > 0 and all(_positive_float(e) is not None for e in v),
          "a non-empty list of positive finite numbers")
    field("eps_scalar", lambda v: isinstance(v, bool) and (not v or len(meta["eps"]) == 1),
          "true (one eps) or false" if len(meta["eps"]) == 1 else "false (the file holds several eps)")
    field("extras", lambda v: isinstance(v, bool), "true or false")
    return meta


def _as_int(name: str, value, what: str) -> int:
    """A count argument (``num_samples``, ``burn_in``) as a Python int >= 1: a Python or NumPy
    integer, or a 0-d integer tensor; not a bool or a float (1e12 is not a sample count)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and not value.dtype.is_complex and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be {what}, got {_short(value)}")
    return int(value)


def _is_real_number(x) -> bool:
    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, float, np.integer, np.floating))


def _positive_float(x) -> Optional[float]:
    """``x`` as a finite float > 0, or None when it is not one (an int beyond float64 included)."""
    if not _is_real_number(x):
        return None
    try:
        v = float(x)
    except OverflowError:
        return None
    return v if np.isfinite(v) and v > 0 else None


def _eps_values(eps) -> tuple:
    """``(scalar, [floats])`` from CartoState's ``eps``: one threshold (a real number, a 0-d tensor or
    array) or a non-empty 1-D sequence of them (a list, tuple, 1-D tensor or array); each finite
    and > 0. Anything else (a string, None, a bool, nested lists) is a ValueError naming eps."""
    what = "a positive finite float or a non-empty 1-D sequence of them"
    if isinstance(eps, (torch.Tensor, np.ndarray)):
        real = not (eps.dtype.is_complex or eps.dtype == torch.bool) if isinstance(eps, torch.Tensor) \
            else eps.dtype.kind in "iuf"
        if not real or eps.ndim > 1:
            raise ValueError(f"eps must be {what}, got a {tuple(eps.shape)} {eps.dtype} "
                             f"{type(eps).__name__}")
        scalar, items = eps.ndim == 0, eps.reshape(-1).tolist()
    elif _is_real_number(eps):
        scalar, items = True, [eps]
    elif isinstance(eps, (list, tuple)):
        scalar, items = False, list(eps)
    else:
        raise ValueError(f"eps must be {what}, got {_short(eps)}")
    values = [_positive_float(e) for e in items]
    if not values or None in values:
        raise ValueError(f"eps must be {what}, got {_short(eps)}")
    return scalar, values


def _short(value) -> str:
    """repr of an argument for an error message, cut to one readable line."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _check_consistent(t: dict) -> None:
    """Cheap invariants that a damaged or hand-edited state breaks."""
    ist, fg = t["istats"], t["forgets"]
    if bool((ist < 0).any()) or bool((fg < 0).any()):
        raise ValueError("state_dict: negative counters: the state is corrupted")
    transitions = ist[:, I_TRANSITIONS]
    if bool((transitions > ist[:, I_OBSERVED]).any()) or bool((fg > transitions[:, None]).any()):
        raise ValueError("state_dict: counters out of order (transitions > observed or forgets > transitions)")
    if int(t["epoch"].reshape(-1)[0]) < 0:
        raise ValueError("state_dict: negative epoch counter")


def _rows_like(name: str, value, losses: torch.Tensor, dev: torch.device, integer: bool) -> torch.Tensor:
    """``value`` as a flat tensor with one entry per element of ``losses``: either of the shape of
    ``losses``, or 1-D [B] repeated over B equal consecutive groups of the flattened losses."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a tensor, got {type(value).__name__}") from None
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if not integer and value.dtype.is_complex:  # a bool mask is fine: True counts once
        raise ValueError(f"{name} must be a real-valued tensor, got {value.dtype}")
    value = value.detach().to(dev, torch.int64 if integer else torch.float64)
    if value.shape == losses.shape:
        return value.reshape(-1)
    if value.dim() == 1 and value.numel() > 0 and losses.numel() % value.numel() == 0:
        # one entry per sequence, as CartoLoss reads per-sequence ids (gdc_ext.expand_sample_ids): the
        # flattened losses are equal consecutive groups ([B, L] losses with [B] ids, or flat [B*L] ones)
        return value.repeat_interleave(losses.numel() // value.numel())
    raise ValueError(f"{name} must have the shape of losses {tuple(losses.shape)} or be 1-D with one entry per "
                     f"sequence, dividing the {losses.numel()} losses into equal consecutive groups; got shape "
                     f"{tuple(value.shape)}")
