"""CartoState: the O(N) per-sample training-dynamics state that CartoLoss records into.

No tensor here grows with the number of epochs: each epoch's losses are folded into running
statistics by ``end_epoch()`` (see docs/method.md for the exact definitions).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import threading
import warnings
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from gdc_ext import _state_references, ops
from gdc_ext._io import write_atomic
from gdc_ext._state_file import _READABLE_VERSIONS, FORMAT_VERSION, read_state_file, write_state_file
from gdc_ext import layout
from gdc_ext._state_legacy import LEGACY_VERSIONS, convert_legacy
from gdc_ext.layout import ACC_COUNT, ACC_LOSS_SUM, MAX_EPOCHS
from gdc_ext.scores_columns import CHUNK, COLUMNS

__all__ = ["CartoState", "Scores", "FORMAT_VERSION", "MAX_RECORD_COUNT", "MAX_RECORD_LOSS", "RELATIVE_FLOOR",
           "check_reference"]

# The largest count one row may carry in CartoState.record: 2**53, the largest float64 up to which
# every integer count is exact. Larger counts (1e308, say) would overflow the accumulator to inf
# and end the epoch with NaN scores, so they are refused.
MAX_RECORD_COUNT = 2.0 ** 53
# The largest |loss| record() takes, in nats: the folded statistics are float32, and with losses
# within +-1e15 every sum of them over epochs and every squared deviation (M2) stays finite there.
MAX_RECORD_LOSS = 1e15
# relative_excess floors both losses at this many nats, so that a reference of exactly 0 (a sample
# the reference model predicts perfectly) gives a defined score instead of a division by zero
RELATIVE_FLOOR = 1e-6
_TENSORS = ("acc", "fstats", "istats", "forgets", "epoch", "eps")


def _synchronized(method):
    """Runs a CartoState method under the state's lock (see :attr:`CartoState.lock`)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def check_reference(reference, num_samples: int, nonnegative: bool = False) -> torch.Tensor:
    """A per-sample reference loss (nats per token) as a CPU float64 tensor [N], checked.

    reference: [N] real numbers (a tensor, NumPy array or sequence), all finite (and >= 0 with
    ``nonnegative``, as losses are). Raises a ValueError naming ``reference`` and what was
    expected for None, a non-numeric or non-1-D input, a wrong length, a NaN/inf value or (with
    ``nonnegative``) a negative value.
    """
    what = (f"a 1-D [N = {num_samples}] array of finite{' non-negative' if nonnegative else ''} per-sample reference "
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
    if nonnegative:
        bad = np.flatnonzero(a < 0)
        if bad.size:
            raise ValueError(f"reference must be {what} (a loss in nats), got {bad.size} negative value(s) "
                             f"(first at id {int(bad[0])}: {a[bad[0]]!r})")
    return torch.from_numpy(a.copy())


# the columns Scores(...) takes by hand (its constructor's signature)
_SCORES_FIELDS = ("difficulty", "memorization_by_eps", "forgets_by_eps", "transitions", "observed", "last_loss",
                  "min_loss", "loss_mean", "loss_std", "grad_energy")
# the columns Scores exposes as attributes: every column of gdc_ext.scores_columns but the derived
# properties (a new statistic's column appears here with its derivation, None in hand-built Scores)
_DERIVED = ("gain", "scored")
_COLUMN_FIELDS = tuple(name for name in COLUMNS if name not in _DERIVED)


class Scores:
    """Per-sample scores after the epochs folded so far. All tensors are on the CPU.

    Shapes: N samples; K thresholds (``eps``). Memorization and forget counts are kept per
    threshold, always [N, K]: read one threshold with :meth:`memorization_at` /
    :meth:`forgets_at`. The :attr:`memorization` / :attr:`forgets` convenience properties are
    [N] when the state was built with a single float ``eps`` (``single_eps``) and [N, K] when
    built with a sequence.

    Columns (see :data:`gdc_ext.scores_columns.COLUMNS`): difficulty [N] float64 (NaN where no
    burn-in epoch was observed), memorization_by_eps [N, K] float64, forgets_by_eps [N, K] int32,
    transitions [N] int32, observed [N] int32, last_loss [N] float64 (NaN if never observed), and,
    for a state with extras, min_loss, loss_mean, loss_std, grad_energy and geometric_confidence
    (exp(-loss_mean)) [N] float64 (None without); for a state with the cartography group
    (``cartography=True``; docs/method.md, "Data cartography"), confidence, variability,
    accuracy_last, first_learned [N] float64, correctness, forgetting [N] int32 and never_learnt
    [N] bool (reading them without the group raises ValueError saying how to enable it;
    :meth:`has` tells whether a column exists). ``CartoState.scores()`` keeps a snapshot of the state's compact tensors and computes
    each column when it is first read (then cached), chunk by chunk, so reading one column costs
    the snapshot plus that column's [N] values. Scores built by hand take every column as a tensor.
    """

    def __init__(self, difficulty: torch.Tensor, memorization_by_eps: torch.Tensor, forgets_by_eps: torch.Tensor,
                 transitions: torch.Tensor, observed: torch.Tensor, last_loss: torch.Tensor,
                 min_loss: Optional[torch.Tensor], loss_mean: Optional[torch.Tensor], loss_std: Optional[torch.Tensor],
                 grad_energy: Optional[torch.Tensor], eps: tuple, epoch: int, burn_in: int, single_eps: bool = False):
        self._snap = None
        self._cols = dict(difficulty=difficulty, memorization_by_eps=memorization_by_eps, forgets_by_eps=forgets_by_eps,
                          transitions=transitions, observed=observed, last_loss=last_loss, min_loss=min_loss,
                          loss_mean=loss_mean, loss_std=loss_std, grad_energy=grad_energy)
        self.eps, self.epoch, self.burn_in, self.single_eps = eps, epoch, burn_in, single_eps
        # Scores built by hand with [N] tables (one threshold) are stored [N, 1] like all others.
        if self._cols["memorization_by_eps"].dim() == 1:
            self._cols["memorization_by_eps"] = self._cols["memorization_by_eps"][:, None]
            self.single_eps = True
        if self._cols["forgets_by_eps"].dim() == 1:
            self._cols["forgets_by_eps"] = self._cols["forgets_by_eps"][:, None]
        self.eps = tuple(float(e) for e in self.eps)
        self._n = int(difficulty.shape[0])
        K = len(self.eps)
        for name in ("memorization_by_eps", "forgets_by_eps"):
            t = self._cols[name]
            if t.dim() != 2 or t.shape[1] != K or t.shape[0] != self._n:
                raise ValueError(f"{name} must be [N, K] = [{self._n}, {K}] (K = len(eps)), got {tuple(t.shape)}")

    @classmethod
    def _from_snapshot(cls, snapshot: dict, groups: int, eps: tuple, epoch: int, burn_in: int,
                       single_eps: bool) -> "Scores":
        """Scores over ``snapshot`` ({tensor name: CPU tensor} of a state's fstats, istats and
        forgets, owned by the Scores), computing each column on first access."""
        self = cls.__new__(cls)
        self._snap = snapshot
        self._groups = groups
        self._cols = {}
        self.eps = tuple(float(e) for e in eps)
        self.epoch, self.burn_in, self.single_eps = epoch, burn_in, single_eps
        self._n = int(next(iter(snapshot.values())).shape[0])
        return self

    # ----------------------------------------------------------------------------- columns
    def _has(self, name: str) -> bool:
        """Whether column ``name`` exists (the state kept the statistics it needs)."""
        if self._snap is None:
            return self._cols.get(name) is not None
        K = len(self.eps)
        return all(layout.stat_location(s, self._groups, K) is not None for s in COLUMNS[name].stats)

    def _compute(self, name: str) -> Optional[torch.Tensor]:
        """Column ``name`` computed from the snapshot, chunk by chunk (None if it does not exist)."""
        if not self._has(name):
            return None
        col = COLUMNS[name]
        K = len(self.eps)
        where = {s: layout.stat_location(s, self._groups, K) for s in col.stats}
        out = torch.empty((self._n, K) if col.per_eps else (self._n,), dtype=col.dtype)
        for i0 in range(0, self._n, CHUNK):
            i1 = min(i0 + CHUNK, self._n)
            rows = {}
            for s, (tensor, c) in where.items():
                t = self._snap[tensor]
                rows[s] = t[i0:i1, c:c + K] if tensor == "forgets" else t[i0:i1, c]
            out[i0:i1] = col.fn(rows)
        return out

    def _get(self, name: str) -> Optional[torch.Tensor]:
        """Column ``name`` (cached after the first read; None if the state did not keep it)."""
        if name not in self._cols:
            self._cols[name] = self._compute(name)
        return self._cols[name]

    def _derived(self, name: str, inputs: tuple, from_columns):
        """A derived column (``gain``, ``scored``): straight from the snapshot, without computing
        and caching the columns ``inputs`` it is defined by, unless they are already cached."""
        if self._snap is not None and not all(c in self._cols for c in inputs):
            return self._compute(name)
        return from_columns()

    def take(self, ids: torch.Tensor) -> "Scores":
        """These scores restricted to the samples ``ids`` ([k] int64 tensor), rows in that order (a
        snapshot-backed Scores stays lazy: it keeps the k rows of the snapshot)."""
        if self._snap is not None:
            return Scores._from_snapshot({k: v[ids] for k, v in self._snap.items()}, self._groups, self.eps,
                                         self.epoch, self.burn_in, self.single_eps)
        cols = {f: None if self._cols.get(f) is None else self._cols[f][ids] for f in _COLUMN_FIELDS}
        out = Scores(**{f: cols.pop(f) for f in _SCORES_FIELDS}, eps=self.eps, epoch=self.epoch, burn_in=self.burn_in,
                     single_eps=self.single_eps)
        out._cols.update(cols)
        return out

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
        return self._derived("scored", ("difficulty",), lambda: ~torch.isnan(self.difficulty))

    @property
    def gain(self) -> torch.Tensor:
        """[N] float64 learning gain ``difficulty - last_loss``: hard during burn-in, easy at the
        last observation, as a rote-learnt sample looks (docs/method.md, "Scores beyond the
        paper"). NaN where unscored (no burn-in difficulty)."""
        return self._derived("gain", ("difficulty", "last_loss"),
                             lambda: self.difficulty.double() - self.last_loss.double())

    def excess(self, reference) -> torch.Tensor:
        """[N] float64 reference-calibrated excess ``reference - last_loss``: how much lower the
        model's last loss is than a reference that predicts the sample without memorizing it.

        reference: [N] per-sample reference loss in nats per token (tensor or array, finite),
            e.g. a unigram model's mean token NLL of the sample. ValueError otherwise.
        NaN where the sample was never observed (no last loss).
        """
        ref = check_reference(reference, self._n)
        return ref - self.last_loss.double()

    def relative_excess(self, reference) -> torch.Tensor:
        """[N] float64 relative excess ``1 - max(last_loss, f) / max(reference, f)`` with the floor
        ``f = RELATIVE_FLOOR`` (1e-6 nats): the fraction of the reference's loss that the model no
        longer pays on the sample. Where the model fits everything (every last loss far below every
        reference) the absolute excess is large for ordinary samples too; the ratio divides that
        out (docs/method.md). The floor keeps a reference of exactly 0 (a sample the reference model
        predicts perfectly, common in float32 classifiers) defined: 0 when both losses are at most f.

        reference: [N] per-sample reference losses in nats per token, finite and >= 0 (the loss of
            a model that did not train on the sample, e.g. :func:`gdc_ext.reference_losses`).
        NaN where the sample was never observed (no last loss).
        """
        ref = check_reference(reference, self._n, nonnegative=True)
        return 1.0 - self.last_loss.double().clamp(min=RELATIVE_FLOOR) / ref.clamp(min=RELATIVE_FLOOR)

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

    # ----------------------------------------------------------------------------- views
    def __repr__(self) -> str:
        N = self._n
        return (f"Scores(N={N}, epochs={self.epoch}, burn_in={self.burn_in}, eps={self.eps}, "
                f"scored={int(self.scored.sum())}, extras={self._has('loss_mean')}, "
                f"cartography={self._has('confidence')})")

    def has(self, name: str) -> bool:
        """Whether column ``name`` (one of :data:`gdc_ext.scores_columns.COLUMNS`) exists: the state
        kept the statistics it needs (extras' columns are None without them; reading a cartography
        column without them raises ValueError)."""
        if name not in COLUMNS:
            raise ValueError(f"unknown Scores column {name!r}; the columns are {', '.join(COLUMNS)}")
        return self._has(name)

    def to_pandas(self, reference=None, *, quadrants=None, seed: int = 0):
        """A ``pandas.DataFrame`` with one row per sample (index ``sample_id``, 0..N-1) and every
        column of :func:`gdc_ext.cartography.score_columns`: the recorded statistics, each
        ``score_BY`` of :data:`gdc_ext.cartography.SCORES` that can be computed ("excess" and
        "relative_excess" need ``reference`` [N], nats per token; "random" is seeded by ``seed``),
        and, given ``quadrants`` (``scores.quadrants(...)`` or [N] codes), ``quadrant`` (int8) and
        ``quadrant_name`` (categorical). pandas is imported here, on use."""
        import pandas as pd

        from gdc_ext.cartography import QUADRANT_NAMES, score_columns

        cols = score_columns(self, reference, seed=seed, quadrants=quadrants)
        frame = pd.DataFrame(cols, index=pd.RangeIndex(self._n, name="sample_id"))
        if "quadrant" in cols:
            names = np.array([QUADRANT_NAMES[c] for c in (-1, 0, 1, 2, 3)], dtype=object)
            frame["quadrant_name"] = pd.Categorical(names[cols["quadrant"].astype(np.int64) + 1],
                                                    categories=[QUADRANT_NAMES[c] for c in (0, 1, 2, 3, -1)])
        return frame

    def summary(self, reference=None, *, quantiles: Sequence[float] = (0.01, 0.1, 0.5, 0.9, 0.99), seed: int = 0) -> str:
        """A short text: N, epochs, burn-in, the tracked eps, how many samples are scored, and for
        every column of :func:`gdc_ext.cartography.score_columns` (the score columns with
        ``reference`` when given) the number of finite values, min, the ``quantiles`` and max."""
        from gdc_ext.cartography import iter_score_columns
        from gdc_ext.cartography import quantiles as _quantiles

        qs = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError(f"quantiles must be in [0, 1], got {qs}")
        cols = iter_score_columns(self, reference, seed=seed)  # one column of N at a time
        N = self._n
        scored = int(self.scored.sum())
        head = [f"Scores: N = {N} samples, {self.epoch} epochs (burn-in {self.burn_in}), eps = {list(self.eps)}",
                f"scored (seen in a burn-in epoch): {scored} ({scored / max(N, 1):.1%}), unscored: {N - scored}"]
        names = ["min"] + [f"p{100 * q:g}" for q in qs] + ["max"]
        width = 24
        lines = [f"{'column':<{width}}{'finite':>10}" + "".join(f"{n:>11}" for n in names)]
        for name, v in cols:
            finite = np.isfinite(v.astype(np.float64))
            vals = [float("nan")] * (len(qs) + 2)
            if finite.any():
                f = v[finite].astype(np.float64)
                q = _quantiles(f, (0.0, *qs, 1.0))
                vals = [q[k] for k in (0.0, *qs, 1.0)]
            lines.append(f"{name:<{width}}{int(finite.sum()):>10}" + "".join(f"{x:>11.4g}" for x in vals))
        return "\n".join(head + lines)



# The groups whose columns raise when read on a state without them (extras' columns are None, as
# they were before the groups existed): {group: how to enable it}.
_REQUIRED_GROUPS = {"cartography": "cartography=True"}


def missing_group_error(column: str, group: str) -> ValueError:
    """The ValueError for reading Scores column ``column`` of ``group`` on a state without it."""
    b = layout.bytes_per_sample(layout.CORE | layout.GROUPS[group], 1) - layout.bytes_per_sample(layout.CORE, 1)
    how = _REQUIRED_GROUPS[group]
    return ValueError(f"Scores.{column} needs the {group} statistics, which this state does not keep: record with "
                      f"CartoState(num_samples, burn_in, ..., {how}) or Cartographer(..., {how}) (the Hugging Face "
                      f"and Lightning integrations take that state or Cartographer), +{b} bytes per sample")


def _column_group(name: str) -> Optional[str]:
    """The group beyond core whose statistics column ``name`` reads (None: core only)."""
    groups = {layout.STATS[[x.name for x in layout.STATS].index(st)].group for st in COLUMNS[name].stats} - {"core"}
    return groups.pop() if groups else None


def _column_property(name: str) -> property:
    doc = COLUMNS[name].doc
    group = _column_group(name)
    required = group in _REQUIRED_GROUPS

    def get(self) -> Optional[torch.Tensor]:
        value = self._get(name)
        if value is None and required:
            raise missing_group_error(name, group)
        return value

    def set(self, value: Optional[torch.Tensor]) -> None:
        self._cols[name] = value

    return property(get, set, doc=doc)


for _name in _COLUMN_FIELDS:
    setattr(Scores, _name, _column_property(_name))
del _name


class CartoState:
    """Per-sample accumulators for N training samples.

    Args:
        num_samples: N, the number of sample ids (ids are 0..N-1): an int >= 1 (NumPy ints and
            0-d integer tensors too).
        burn_in: T_e, the number of (1-based) epochs whose losses define difficulty (an int >= 1).
        eps: forget threshold in nats (a positive number or 0-d tensor), or a non-empty sequence
            of K thresholds tracked together (a list, tuple or 1-D tensor / array).
        device: where the state lives; CartoLoss must run on the same device.
        extras: also keep min loss, Welford mean/variance and gradient energy (Scores.min_loss,
            loss_mean, loss_std, grad_energy and the confidence / variability views; None
            without). Opt-in since the compact layout (default False): they cost 24 bytes per
            sample beyond the 32-byte budget of the default state.
        cartography: also keep data cartography and forgetting events (Swayamdipta et al. 2020,
            Toneva et al. 2019), from each token's p(y) and argmax correctness, which the fused
            kernels compute in the same pass: Scores.confidence, variability, correctness,
            accuracy_last, forgetting, never_learnt, first_learned (reading them without the
            group raises ValueError). Opt-in (default False): 34 bytes per sample.

    A bad ``num_samples``, ``burn_in`` or ``eps`` (a string, None, a bool, a float count, nested
    lists, ...) raises a ValueError naming the argument.

    Memory, whatever the number of epochs (docs/method.md, "Storage"; the layout is declared in
    csrc/state_stats.def): per sample, the epoch accumulator acc (float64 loss sum and token
    count: 16 bytes; +8 for the energy sum with extras), the float32 folded statistics fstats
    (difficulty sum and last loss: 8; +16 for min, mean, M2 and energy with extras), the int16
    counters istats (burn-in epochs and observed epochs: 4) and int16 forgets (2 per eps):

    - default (``CartoState(N, burn_in)``, one eps): 16 + 8 + 4 + 2 = **30 bytes per sample**;
      28 + 2K with K thresholds;
    - ``extras=True``: 24 + 24 + 4 + 2K = 52 + 2K (54 with one eps);
    - ``cartography=True``: + 34 (float64 p(y) and correct-token sums: 16; float32 mean and M2 of
      the epoch's mean p(y) and the last token accuracy: 12; int16 learnt epochs, forgetting
      events and first learnt epoch: 6), so 62 + 2K without extras;

    plus 8 (epoch) + 8K (eps) bytes in all. The int16 counters bound a state to
    :data:`gdc_ext.layout.MAX_EPOCHS` (32767) folded epochs: end_epoch refuses the next one,
    changing nothing.
    """

    def __init__(self, num_samples: int, burn_in: int, eps: Union[float, Sequence[float]] = 0.1,
                 device: Union[str, torch.device] = "cpu", extras: bool = False, cartography: bool = False):
        num_samples = _as_int("num_samples", num_samples, "a positive int")
        burn_in = _as_int("burn_in", burn_in, "an int >= 1 (epochs)")
        self._eps_scalar, eps_list = _eps_values(eps)
        self.num_samples = num_samples
        self.burn_in = burn_in
        self.extras = bool(extras)
        self.cartography = bool(cartography)
        N, K, dev = self.num_samples, len(eps_list), torch.device(device)
        for name, (dtype, shape) in layout.shapes(N, K, self.groups).items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=dev))
        self.epoch = torch.zeros(1, dtype=torch.int64, device=dev)
        self.eps = torch.tensor(eps_list, dtype=torch.float64, device=dev)
        # epochs folded, as the host knows them (end_epoch's check without reading a CUDA tensor)
        self._epochs_host = 0
        self.process_group = None  # torch.distributed group to all-reduce over (None: the default group)
        self._lock = threading.RLock()  # see the lock property

    # ----------------------------------------------------------------------------- threads
    @property
    def lock(self) -> threading.RLock:
        """The state's re-entrant lock. Every method that reads or writes the tensors (record,
        end_epoch, reset_epoch, scores, state_dict, load_state_dict, save, to) and the fused
        kernels' recording (CartoLoss, functional.cross_entropy, linear_cross_entropy: the forward
        op that adds into ``acc``) hold it, so threads can share one state: no update is lost and
        each recorded batch lands wholly in one epoch. Hold it yourself to make several calls one
        step (``with state.lock: state.end_epoch(); state.save(path)``). Backward never takes it.

        Under torch.compile the compiled graph cannot take a Python lock: a compiled step's
        recording is not serialised against other threads using the same state."""
        return self._lock

    def _kernel_lock(self):
        """The lock around a fused kernel call that records into ``acc`` (a no-op context while
        torch.compile traces, as Dynamo cannot enter a lock)."""
        if torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return self._lock

    def __getstate__(self) -> dict:
        # a lock cannot be pickled or deep-copied: copies get a fresh one
        d = self.__dict__.copy()
        d.pop("_lock", None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def groups(self) -> int:
        """The statistic groups kept (a bit mask of :data:`gdc_ext.layout.GROUPS`: core, plus
        extras with ``extras=True``, cartography with ``cartography=True``); they fix the columns
        of the tensors."""
        return layout.groups_for(self.extras, self.cartography)

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

    @_synchronized
    def to(self, device: Union[str, torch.device]) -> "CartoState":
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self

    def __repr__(self) -> str:
        return (f"CartoState(num_samples={self.num_samples}, burn_in={self.burn_in}, eps={self.eps.tolist()}, "
                f"device={self.device}, extras={self.extras}, cartography={self.cartography})")

    # ----------------------------------------------------------------------------- epochs
    @_synchronized
    def end_epoch(self) -> None:
        """Folds this epoch's accumulated losses into the scores and clears the accumulators.

        With torch.distributed initialised (world size > 1), the accumulators are first summed
        across ranks, so every rank ends with identical scores. Before that, one small all-gather
        checks that every rank's state agrees on N, eps, burn_in, extras, cartography, the tensor layout and the
        number of epochs done: a state built differently, or restored from another epoch, raises
        the same ValueError on every rank (naming the field, the ranks and their values) and
        nothing is changed, where the all-reduce would otherwise mix mismatched states silently or
        abort the process.

        The int16 counters hold at most :data:`gdc_ext.layout.MAX_EPOCHS` (32767) epochs: folding
        one more raises ValueError and changes nothing (every rank alike). On CUDA the count the
        host keeps is checked (no synchronisation, so end_epoch stays CUDA-graph capturable); epochs
        folded by replaying a captured graph are not counted there, and the kernel itself leaves
        a full state unchanged.
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size(self.process_group) > 1
        if distributed:
            self._check_ranks_agree()  # first: every rank then has the same epoch count
        # the device's counter where reading it is free (or already done by the agreement check)
        host = getattr(self, "_epochs_host", None)
        done = self.epochs_done if distributed or host is None or self.epoch.device.type == "cpu" else host
        if done >= MAX_EPOCHS:
            raise ValueError(f"CartoState.end_epoch: the state has folded {done} epochs, the most its int16 counters "
                             f"(observed epochs, forget events) can hold ({MAX_EPOCHS}); nothing was changed. "
                             f"Save its scores and start a new CartoState to go on.")
        if distributed:
            torch.distributed.all_reduce(self.acc, group=self.process_group)
        # An epoch that recorded nothing is almost always a wiring mistake (no sample ids, the loss
        # in eval mode, ...). The check reads the accumulator, which is free on the CPU; on a GPU it
        # would cost a host synchronisation every epoch, so there it is skipped.
        if self.acc.device.type == "cpu" and not bool((self.acc[:, ACC_COUNT] > 0).any()):
            warnings.warn(f"CartoState.end_epoch: nothing was recorded in epoch {self.epochs_done + 1}: no loss "
                          f"was recorded with sample ids since the last end_epoch(), so no sample is observed in "
                          f"it (were sample_ids passed to the loss, or record() called?)", UserWarning,
                          stacklevel=2)
        ops.end_epoch_(self.acc, self.fstats, self.istats, self.forgets, self.epoch, self.eps, self.burn_in,
                       self.groups)
        self._epochs_host = done + 1

    @_synchronized
    def record(self, losses: torch.Tensor, sample_ids: torch.Tensor,
               counts: Optional[Union[torch.Tensor, float]] = None, *, p_y=None, correct=None) -> None:
        """Accumulates per-row or per-sample losses of any model into this epoch's accumulator.

        For losses that CartoLoss does not compute: a diffusion model's per-sample MSE, a VAE's
        ELBO, Liger's or CCE's ``reduction="none"`` token losses, ... The semantics are those of
        the fused kernel's recording: the epoch's loss of sample i is the sum of its recorded
        losses weighted by their counts over the sum of the counts, i.e. with ``counts=None`` the
        mean of the rows recorded for it in the epoch, and :meth:`end_epoch` folds it as usual.

        Args:
            losses: float tensor of any shape S, one loss per row (a token, a sample, ...), each
                finite and within +-:data:`MAX_RECORD_LOSS` (1e15 nats: the folded statistics are
                float32).
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
            p_y, correct: for a state with the cartography group (``cartography=True``), required
                there and refused elsewhere: each row's probability of its target, p(y) (the mean
                over the tokens it averages, for a count above 1), and whether its prediction is
                the target (argmax == target; for a count above 1 the fraction of its tokens that
                are, so a row is learnt when it is 1). Tensors of the shape of ``sample_ids`` (a
                bool tensor for ``correct`` counts True as 1), each value finite and in [0, 1];
                weighted by the counts like the losses.

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
        if self.cartography and (p_y is None or correct is None):
            missing = " and ".join(n for n, v in (("p_y", p_y), ("correct", correct)) if v is None)
            raise ValueError(f"{missing}: this state keeps the cartography statistics (cartography=True), so record() "
                             f"needs each row's p(y) (p_y=) and argmax correctness (correct=), tensors like the losses")
        if not self.cartography and (p_y is not None or correct is not None):
            given = " and ".join(n for n, v in (("p_y", p_y), ("correct", correct)) if v is not None)
            raise ValueError(f"{given}: this state does not keep the cartography statistics; build it with "
                             f"CartoState(..., cartography=True) to record them")
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
        extra = {}  # the cartography sources: p_y, correct [R] float64
        if self.cartography:
            extra = {"p_y": _rows_like("p_y", p_y, losses, dev, integer=False),
                     "correct": _rows_like("correct", correct, losses, dev, integer=False)}
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
            bad = used & (loss.abs() > MAX_RECORD_LOSS)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                raise ValueError(f"losses[{r}] = {float(loss[r])} is beyond +-{MAX_RECORD_LOSS:g} (MAX_RECORD_LOSS): "
                                 f"the folded statistics are float32; the CartoState was left unchanged")
            if not bool(torch.isfinite(_sum_bound(acc, ids, used, prod))):
                raise ValueError("counts: the batch's losses * counts, added to this epoch's accumulator, overflow "
                                 "float64; the CartoState was left unchanged")
            for name, v in extra.items():
                bad = used & ~((v >= 0) & (v <= 1))  # NaN fails both
                if bool(bad.any()):
                    r = int(bad.nonzero()[0, 0])
                    raise ValueError(f"{name}[{r}] = {float(v[r])}: expected a value in [0, 1] "
                                     f"({'a probability' if name == 'p_y' else 'the fraction of argmax-correct tokens'}); "
                                     f"the CartoState was left unchanged")
            ok = used
        else:
            # no host synchronisation: the batch's validity is a device scalar that masks every row
            in_range = (ids >= 0) & (ids < N)
            row_bad = (~torch.isfinite(cnt)) | (cnt < 0) | (cnt > MAX_RECORD_COUNT) \
                | (used & ~(in_range & torch.isfinite(loss) & torch.isfinite(prod) & (loss.abs() <= MAX_RECORD_LOSS)))
            for v in extra.values():
                row_bad = row_bad | (used & ~((v >= 0) & (v <= 1)))
            ok = used & ~row_bad.any() & torch.isfinite(_sum_bound(acc, ids, used & in_range, prod))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        # one column per accumulator statistic, by its per-row source (csrc/state_stats.def)
        values = {"nll": torch.where(ok, prod, zero), "one": torch.where(ok, cnt, zero)}
        for name, v in extra.items():  # unused rows add 0 (their values are not read)
            values[name] = torch.where(ok, v * cnt, zero)
        upd = torch.stack([values.get(src, zero.expand_as(loss)) for src in layout.acc_sources(self.groups)], 1)
        acc.index_add_(0, torch.where(ok, ids, torch.zeros_like(ids)), upd)

    @_synchronized
    def reset_epoch(self) -> None:
        """Drops what was recorded since the last end_epoch() (an aborted epoch, say)."""
        self.acc.zero_()

    # ----------------------------------------------------------------------------- distributed
    def _fingerprint(self) -> torch.Tensor:
        """What every rank's state must agree on before end_epoch's all-reduce, as an int64 tensor
        (columns _FP_NAMES, then the first eps values' bits) of a fixed size, so that the
        all-gather itself pairs up whatever the ranks' states are."""
        eps = [float(e) for e in self.eps.tolist()]
        eps_bytes = struct.pack(f"<{len(eps)}d", *eps)
        head = [struct.unpack("<q", struct.pack("<d", e))[0] for e in eps[:_FP_EPS_SHOWN]]
        head += [0] * (_FP_EPS_SHOWN - len(head))
        layout = repr([(n, tuple(t.shape), str(t.dtype), t.is_contiguous()) for n, t in self.tensors().items()])
        values = [_FP_MAGIC, self.num_samples, self.burn_in, int(self.extras), int(self.cartography), len(eps),
                  self.epochs_done,
                  _hash64(eps_bytes), _hash64(layout.encode()), *head]
        return torch.tensor(values, dtype=torch.int64)

    def _check_ranks_agree(self) -> None:
        """One all-gather of every rank's :meth:`_fingerprint`; raises the same ValueError on every
        rank when they differ (before any other collective, so no rank aborts or waits)."""
        dist = torch.distributed
        group = self.process_group
        mine = self._fingerprint().to(self.acc.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        rows = [g.cpu().tolist() for g in gathered]
        problems = []
        for field, col in _FP_CHECKS:
            if col == "eps":
                key = [(r[_FP_INDEX["num_eps"]], r[_FP_INDEX["eps_hash"]]) for r in rows]
                shown = [_fp_eps_repr(r) for r in rows]
            else:
                key = [r[_FP_INDEX[col]] for r in rows]
                shown = [_fp_repr(col, v) for v in key]
            if len(set(key)) > 1:
                problems.append(f"{field} differs: " + "; ".join(
                    f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {value}"
                    for value, ranks in _group_ranks(key, shown)))
        if any(r[0] != _FP_MAGIC for r in rows):
            problems.append("another collective was paired with this end_epoch (the ranks' calls are out of step)")
        if problems:
            raise ValueError("CartoState.end_epoch: the ranks' states disagree, nothing was changed: "
                             + " | ".join(problems) + ". Every rank must build the same CartoState (N, eps, burn_in, "
                             "extras, cartography), restore the same checkpoint and call end_epoch() once per epoch.")

    # ----------------------------------------------------------------------------- scores
    @_synchronized
    def scores(self) -> Scores:
        """The per-sample scores of the epochs folded so far (CPU tensors; see :class:`Scores`).

        Takes a snapshot of the folded statistics (a copy of fstats, istats and forgets: 14 bytes
        per sample by default) and computes each column when it is first read, so
        ``state.scores().gain`` costs the snapshot plus the [N] float64 gain, never every column."""
        snap = {}
        for name in ("fstats", "istats", "forgets"):
            t = getattr(self, name).detach()
            snap[name] = t.cpu() if t.device.type != "cpu" else t.clone()
        return Scores._from_snapshot(snap, self.groups, tuple(self.eps.tolist()), self.epochs_done, self.burn_in,
                                     self._eps_scalar)

    # ----------------------------------------------------------------------------- persistence
    def _meta(self) -> dict:
        # columns: the saved name of each column of each tensor (csrc/state_stats.def), so that a
        # file says which statistics it holds
        cols = layout.saved_columns(self.groups)
        return {"format": "gdc_ext.CartoState", "version": FORMAT_VERSION, "num_samples": self.num_samples,
                "burn_in": self.burn_in, "eps": self.eps.tolist(), "eps_scalar": self._eps_scalar,
                "extras": self.extras, "cartography": self.cartography, "columns": cols}

    @_synchronized
    def state_dict(self) -> dict:
        """Tensors (cloned, on the state's device) plus a ``meta`` dict of the configuration."""
        d = {name: t.clone() for name, t in self.tensors().items()}
        d["meta"] = self._meta()
        return d

    @_synchronized
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of a state with the same N, eps, burn-in and extras; all checks run
        before anything is replaced, so a rejected dict leaves this state unchanged."""
        for name, t in self._checked_state_dict(state_dict).items():
            setattr(self, name, t)
        self._epochs_host = self.epochs_done

    def _checked_state_dict(self, state_dict: dict) -> dict:
        """The tensors :meth:`load_state_dict` would set (copies on this state's device), after all
        its checks; raises ValueError and changes nothing. Lets a caller that restores more than
        this state (a Cartographer) validate everything before it changes anything."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("meta"), dict):
            raise ValueError("state_dict: expected a dict from CartoState.state_dict() with a 'meta' entry")
        meta = state_dict["meta"]
        if meta.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"state_dict: format version {meta.get('version')!r} is not supported "
                             f"(this gdc_ext reads versions {', '.join(map(str, _READABLE_VERSIONS))})")
        mine = self._meta()
        for key in ("num_samples", "burn_in", "eps", "extras", "cartography"):
            if meta.get(key, False if key == "cartography" else None) != mine[key]:
                raise ValueError(f"state_dict: mismatched state: {key} is {meta.get(key)!r} in the saved state "
                                 f"but {mine[key]!r} in this CartoState")
        tensors = {name: state_dict.get(name) for name in _TENSORS}
        if meta["version"] in LEGACY_VERSIONS:  # a checkpoint of gdc_ext before the compact layout
            tensors = convert_legacy(meta, tensors, "state_dict")
        elif meta.get("columns", mine["columns"]) != mine["columns"]:
            raise ValueError(f"state_dict: its columns {meta.get('columns')} are not this gdc_ext's layout "
                             f"{mine['columns']} for extras = {self.extras}, cartography = {self.cartography}")
        return self._checked_tensors(tensors, self.device, copy=True)

    def _adopt(self, tensors: dict, device: torch.device, copy: bool) -> None:
        """Makes ``tensors``, checked by :meth:`_checked_tensors`, this state's tensors; nothing is
        replaced unless every check passes."""
        for name, t in self._checked_tensors(tensors, device, copy).items():
            setattr(self, name, t)
        self._epochs_host = self.epochs_done

    def _checked_tensors(self, tensors: dict, device: torch.device, copy: bool) -> dict:
        """``tensors`` checked (shapes and dtypes of this state's, consistent counters) and placed on
        ``device``: copies when ``copy`` (the caller keeps its dict), else taken as they are when
        already there (a freshly loaded file)."""
        new = {}
        for name, t in self.tensors().items():
            s = tensors.get(name)
            if not isinstance(s, torch.Tensor):
                raise ValueError(f"state_dict: missing tensor {name!r}")
            if s.shape != t.shape or s.dtype != t.dtype:
                raise ValueError(f"state_dict: tensor {name!r} has shape {tuple(s.shape)} {s.dtype}, "
                                 f"expected {tuple(t.shape)} {t.dtype}")
            s = s.to(device)
            new[name] = s.clone().contiguous() if copy else s.contiguous()
        _check_consistent(new, self.groups)
        return new

    @_synchronized
    def save(self, path: Union[str, os.PathLike], references: Optional[Mapping] = None) -> None:
        """Writes the state to a safetensors file atomically (temp file, fsync, rename, folder
        fsync), with a sha256 checksum that :meth:`load` verifies. Temps left in the folder by
        saves of the same file that were killed are removed first.

        references: optional named per-sample references to store with the state, {name: [N]
        finite reference losses (nats per token)}, e.g. ``{"crossfit": ref}``; read back with
        :meth:`load_references` (``gdc report`` / ``plot`` / ``select`` use a stored one). Checked
        (names: 1-64 letters, digits, '_', '.', '-'; values as ``check_reference``) before
        anything is written; covered by the file's checksum. :meth:`load` ignores them."""
        path = os.fspath(path)
        refs = _state_references.checked_references(references, self.num_samples)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        meta = self._meta()
        if refs:  # the optional section: absent from files without references
            tensors.update(_state_references.file_tensors(refs))
            meta[_state_references.META_KEY] = list(refs)
        meta = json.dumps(meta)
        write_atomic(path, lambda tmp: write_state_file(tmp, tensors, meta), prefix=".gdc-state-")

    @staticmethod
    def load_references(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
        """The references stored by ``save(path, references=...)``: {name: CPU float64 [N]}, in
        the order saved; {} for a file without any (every file written before references could
        be stored). The file is checked as :meth:`load` checks it (checksum included); a damaged
        reference (non-finite values) raises ValueError naming the file and the reference."""
        return _state_references.read_references(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "CartoState":
        """Reads a state written by :meth:`save` (no pickle: a safetensors header and raw tensor bytes).

        Raises FileNotFoundError for a missing file and ValueError naming the file for a damaged,
        foreign or crafted one: the header and the sizes it declares are checked against the file's
        size and the metadata before anything is allocated, and the sha256 checksum (format versions
        2 and 3) is verified over every byte of the file. Files of format versions 1 and 2 (gdc_ext
        before the compact layout; version 1 also before the checksum, read with a warning that
        damage to it cannot be detected) are converted to the current layout (see
        gdc_ext._state_legacy). Each tensor of a current file is read once, into the memory the
        state keeps.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CartoState.load: no state file at {path!r}")
        meta, tensors = read_state_file(path)
        eps = meta["eps"][0] if meta["eps_scalar"] else meta["eps"]
        # built on the meta device (no memory), then given the tensors just read
        state = cls(meta["num_samples"], meta["burn_in"], eps, device="meta", extras=meta["extras"],
                    cartography=meta.get("cartography", False))
        try:
            if meta["version"] in LEGACY_VERSIONS:
                tensors = convert_legacy(meta, tensors, "a version 1/2 state")
            state._adopt(tensors, torch.device(device), copy=False)
        except ValueError as e:
            raise ValueError(f"CartoState.load: {path!r}: {e}") from None
        return state


def recording_lock(state: Optional["CartoState"], recording: bool):
    """The context a fused kernel call that may add into ``state.acc`` runs in: the state's lock when
    it records (see :attr:`CartoState.lock`), else nothing. The forward op alone runs in it; the
    backward pass, which does not touch the state, never does."""
    return state._kernel_lock() if recording and state is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ fingerprint
_FP_MAGIC = 0x6764635F65703031  # "gdc_ep01": marks end_epoch's all-gather
_FP_EPS_SHOWN = 4  # eps values carried for the error message (all of them are compared through the hash)
_FP_NAMES = ("magic", "num_samples", "burn_in", "extras", "cartography", "num_eps", "epochs_done", "eps_hash",
             "layout_hash")
_FP_INDEX = {name: i for i, name in enumerate(_FP_NAMES)}
# (name in the message, fingerprint column); "eps" compares (K, hash of all values)
_FP_CHECKS = (("num_samples (N)", "num_samples"), ("eps", "eps"), ("burn_in", "burn_in"), ("extras", "extras"),
              ("cartography", "cartography"), ("epochs_done", "epochs_done"),
              ("tensor layout (shapes/dtypes)", "layout_hash"))


def _hash64(data: bytes) -> int:
    return struct.unpack("<q", hashlib.sha256(data).digest()[:8])[0]


def _fp_repr(col: str, v: int) -> str:
    if col in ("extras", "cartography"):
        return str(bool(v))
    if col == "layout_hash":
        return f"{v & 0xFFFFFFFFFFFFFFFF:016x}"
    return str(v)


def _fp_eps_repr(row: list) -> str:
    k = row[_FP_INDEX["num_eps"]]
    start = len(_FP_NAMES)
    vals = [struct.unpack("<d", struct.pack("<q", x))[0] for x in row[start:start + min(k, _FP_EPS_SHOWN)]]
    return "[" + ", ".join(repr(v) for v in vals) + (", ...]" if k > _FP_EPS_SHOWN else "]") + f" (K = {k})"


def _group_ranks(key: list, shown: list) -> list:
    """[(shown value, [ranks])] in the order of first appearance."""
    out: dict = {}
    for rank, (k, s) in enumerate(zip(key, shown)):
        out.setdefault(k, (s, []))[1].append(rank)
    return list(out.values())


def _sum_bound(acc: torch.Tensor, ids: torch.Tensor, used: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
    """A device scalar bounding |acc[i, loss sum] + this batch's sum for i| over the batch's ids:
    the largest |loss sum| of a used id plus the batch's sum of |loss * count| (finite iff no
    sample's accumulated loss can overflow to inf in this record call). Ids of unused rows are
    not read (they may be out of range)."""
    zero = torch.zeros((), dtype=torch.float64, device=acc.device)
    held = torch.where(used, acc[torch.where(used, ids, torch.zeros_like(ids)), ACC_LOSS_SUM].abs(), zero)
    return (held.max() if held.numel() else zero) + prod.abs().sum()


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


def _check_consistent(t: dict, groups: int = layout.CORE) -> None:
    """Cheap invariants that a damaged or hand-edited state breaks (counters in the core columns,
    which every layout has at the same place, and those of the cartography group when kept)."""
    ist, fg = t["istats"], t["forgets"]
    epochs = int(t["epoch"].reshape(-1)[0])
    if epochs < 0 or epochs > MAX_EPOCHS:
        raise ValueError(f"state_dict: epoch counter {epochs} outside [0, {MAX_EPOCHS}]: the state is corrupted")
    # in chunks of rows: the comparisons' temporaries (~10 B per sample at once) would otherwise
    # raise load's peak memory above the state it reads
    for lo in range(0, ist.shape[0], _CHECK_CHUNK):
        _check_consistent_rows({"istats": ist[lo:lo + _CHECK_CHUNK], "forgets": fg[lo:lo + _CHECK_CHUNK]}, epochs,
                               groups)


_CHECK_CHUNK = 1 << 18


def _check_consistent_rows(t: dict, epochs: int, groups: int) -> None:
    ist, fg = t["istats"], t["forgets"]
    if bool((ist < 0).any()) or bool((fg < 0).any()):
        raise ValueError("state_dict: negative counters: the state is corrupted")
    observed, burn = ist[:, layout.I_OBSERVED], ist[:, layout.I_DIFF_COUNT]
    transitions = (observed.to(torch.int32) - 1).clamp(min=0)
    if bool((observed > epochs).any()) or bool((burn > observed).any()) or bool((fg > transitions[:, None]).any()):
        raise ValueError("state_dict: counters out of order (observed epochs > epochs folded, burn-in epochs > "
                         "observed, or forgets > transitions)")
    if groups & layout.CARTOGRAPHY:
        learnt, forgot, first = (ist[:, layout.column(n, groups)] for n in ("learnt", "forgot", "first_learnt"))
        if bool((learnt > observed).any()) or bool((forgot > transitions).any()) or bool((first > epochs).any()) \
                or bool(((learnt > 0) != (first > 0)).any()):
            raise ValueError("state_dict: cartography counters out of order (learnt epochs > observed, forgetting "
                             "events > transitions, first learnt epoch > epochs folded, or learnt without a first "
                             "learnt epoch)")


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
