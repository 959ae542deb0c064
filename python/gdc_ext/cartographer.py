"""Cartographer: the paper's Algorithm 1 around a user's training loop.

    carto = gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=1.0, alpha_d=0.75, alpha_m=0.75,
                                 gamma=2.0, alpha=0.5, keep_outliers=False, seed=0)
    loss_fn = carto.loss                      # a CartoLoss recording into carto.state
    sampler = None                            # the user's own order during burn-in
    for epoch in range(T):
        for batch in loader(sampler):         # yields sample ids with each batch
            loss_fn(logits, targets, ids).backward(); ...
        if carto.end_epoch():                 # True once, when burn-in ends: labels are fixed
            sampler = carto.sampler()         # up-sampling / removal for the remaining epochs

Burn-in epochs 1..T_e only record. At the end of epoch ``label_after`` (default T_e) the scores
are turned into quadrants *once*; the labels then stay fixed for the remaining epochs, as in
Algorithm 1 (recording goes on, so ``state.scores()`` keeps evolving, but the interventions do
not chase it). The labels give the per-sample loss weights (``alpha`` on hotspots, set on
:attr:`loss`) and the :class:`~gdc_ext.CartoSampler` (``gamma`` on ambiguous-hard samples,
noisy-outliers removed unless ``keep_outliers``). Memorization at labelling time counts forget
events over the epochs recorded so far, so ``label_after`` must be at least 2.

The memorized axis of the quadrants (and :meth:`Cartographer.prune`) uses the score named by
``memorization``, one of :data:`gdc_ext.cartography.SCORES`; the default is
:data:`gdc_ext.cartography.DEFAULT_SCORE`, the score the reproduction found to detect memorized
samples ("memorization" is the paper's m_i). With "gain", rote-learnt samples (hard during
burn-in, easy at the end) have a high difficulty and a high gain, so they fall in quadrant 3
(removed from the sampler unless ``keep_outliers``).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

from gdc_ext._seed import check_seed
from gdc_ext.cartography import (DEFAULT_REFERENCE_SCORE, DEFAULT_SCORE, NEEDS_GROUP, NEEDS_REFERENCE, PRUNE_BY,
                                 QUADRANT_NAMES, Quadrants, loss_weights, multiplicities, prune)
from gdc_ext.cartography import stalled as cartography_stalled
from gdc_ext import layout
from gdc_ext.layout import ACC_COUNT
from gdc_ext.loss import CartoLoss
from gdc_ext.sampler import CartoSampler
from gdc_ext.state import CartoState, check_reference

__all__ = ["Cartographer", "REFERENCE_MODES", "LOG_QUANTILES", "epoch_metrics"]

# reference= values that name how the reference is obtained rather than give it
REFERENCE_MODES = ("initial", "later")

_CONFIG = ("num_samples", "burn_in", "eps", "alpha_d", "alpha_m", "gamma", "alpha", "keep_outliers", "seed",
           "label_after", "eps_index", "memorization", "stalled")
# stalled=: what the sampler does with an ambiguous-hard sample whose loss did not fall over the
# burn-in (gdc_ext.cartography.stalled): its multiplicity (None: gamma, the paper's Algorithm 1)
STALLED = {"keep": 1.0, "remove": 0.0, "upsample": None}


class Cartographer:
    """Runs Algorithm 1: record for ``burn_in`` epochs, label, then intervene.

    Args:
        num_samples: N (sample ids 0..N-1).
        burn_in: T_e, epochs whose losses define difficulty.
        eps: forget threshold in nats (or a sequence; ``eps_index`` picks the one used to label).
        alpha_d, alpha_m: percentile rates of the difficulty / memorization thresholds, in [0, 1].
        gamma: up-sampling factor of ambiguous-hard samples (> 1) whose loss falls.
        stalled: what the sampler does with an ambiguous-hard sample whose loss did not fall
            over the burn-in (gain = d - last <= 0 at labelling, :func:`gdc_ext.cartography.stalled`):
            the signature of a wrong label, which up-sampling only helps the model memorize.
            "remove" (default): multiplicity 0, as the noisy-outlier quadrant is removed;
            "keep": 1; "upsample": gamma, the paper's Algorithm 1 (gdc_ext's behaviour before
            this option). On a classifier with 10% flipped labels (docs/RESULTS.md, "Noisy
            labels"), "upsample" made the model fit every flipped label and "keep" still fitted
            more of them than no intervention; "remove" fits fewer and raises held-out accuracy.
        alpha: loss weight of hotspot-memorized samples, in [0, 1).
        keep_outliers: keep noisy-outliers instead of removing them from the sampler.
        seed: the sampler's seed, an int in [0, 2**63) (epoch e draws with ``seed + e``).
        label_after: epoch at whose end the labels are computed (default ``burn_in``; >= burn_in, >= 2).
        eps_index: which eps labels, when several are tracked (used by "memorization").
        memorization: the score on the memorized axis and for :meth:`prune`, one of
            :data:`gdc_ext.cartography.SCORES`. None (default): with a reference,
            :data:`~gdc_ext.cartography.DEFAULT_REFERENCE_SCORE`; without,
            :data:`~gdc_ext.cartography.DEFAULT_SCORE`.
        reference: per-sample reference losses, the loss of a model that did not train on the
            sample (docs/method.md, "Counterfactual references"); required by the calibrated
            scores ("excess", "relative_excess"); saved in :meth:`state_dict`. One of
            - [N] losses in nats per token (tensor or array, finite): a cross-fit half's or any
              other model's (:func:`gdc_ext.reference_losses`, :func:`gdc_ext.crossfit_split`);
            - ``"initial"``: the loss of the model before the first step of a fine-tuning run,
              measured by :meth:`score_reference` (the integrations call it for you) before any
              recording;
            - ``"later"``: given by :meth:`set_reference` before labelling (a cross-fit model
              trained elsewhere while this run records).
            A calibrated score with no reference at labelling time raises RuntimeError.
        device, extras, cartography: passed to :class:`~gdc_ext.CartoState` (extras: opt-in min
            loss, loss mean/std and gradient energy, +24 bytes per sample; cartography: opt-in
            confidence, variability, correctness, forgetting events and exact memorization, +34
            bytes per sample; both off by default, 30 bytes per sample with one eps).
        **loss_kwargs: passed to :class:`~gdc_ext.CartoLoss` (``ignore_index``, ``reduction``, ...).
    """

    def __init__(self, num_samples: int, burn_in: int, eps: Union[float, Sequence[float]], alpha_d: float = 0.75,
                 alpha_m: float = 0.75, gamma: float = 2.0, alpha: float = 0.5, keep_outliers: bool = False,
                 seed: int = 0, label_after: Optional[int] = None, eps_index: int = 0,
                 device: Union[str, torch.device] = "cpu", extras: bool = False, *,
                 memorization: Optional[str] = None, reference=None, cartography: bool = False,
                 stalled: str = "remove", **loss_kwargs):
        self.state = CartoState(num_samples, burn_in=burn_in, eps=eps, device=device, extras=extras,
                                cartography=cartography)
        for name, a in (("alpha_d", alpha_d), ("alpha_m", alpha_m)):
            if not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {a}")
        if not float(gamma) > 1.0:
            raise ValueError(f"gamma must be > 1 (up-sampling of ambiguous-hard samples), got {gamma}")
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"alpha must be in [0, 1) (down-weighting of hotspots), got {alpha}")
        if not isinstance(stalled, str) or stalled not in STALLED:
            raise ValueError(f"stalled must be one of {', '.join(map(repr, STALLED))}, got {stalled!r}")
        label_after = burn_in if label_after is None else label_after
        if isinstance(label_after, bool) or not isinstance(label_after, int) or label_after < max(burn_in, 2):
            raise ValueError(f"label_after must be an int >= max(burn_in, 2) (memorization needs two recorded "
                             f"epochs), got {label_after!r} with burn_in={burn_in}")
        if not isinstance(eps_index, int) or not 0 <= eps_index < self.state.num_eps:
            raise ValueError(f"eps_index must be in [0, {self.state.num_eps}), got {eps_index!r}")
        seed = check_seed(seed)  # a Python int: the config is saved as JSON
        if isinstance(reference, str):
            if reference not in REFERENCE_MODES:
                raise ValueError(f"reference must be [N] per-sample losses, one of {REFERENCE_MODES} or None, "
                                 f"got {reference!r}")
            self.reference_mode = reference
            self.reference: Optional[torch.Tensor] = None  # [N] float64 on the CPU once measured / given
        else:
            self.reference_mode = None if reference is None else "given"
            # [N] float64 on the CPU (scores are read on the CPU), or None
            self.reference = None if reference is None else check_reference(reference, self.state.num_samples)
        if memorization is None:
            memorization = DEFAULT_SCORE if self.reference_mode is None else DEFAULT_REFERENCE_SCORE
        if not isinstance(memorization, str) or memorization not in PRUNE_BY:
            raise ValueError(f"memorization must be one of {', '.join(repr(k) for k in PRUNE_BY)}, "
                             f"got {memorization!r}")
        if memorization in NEEDS_GROUP and not self.state.groups & layout.GROUPS[NEEDS_GROUP[memorization]]:
            g = NEEDS_GROUP[memorization]
            raise ValueError(f"memorization={memorization!r} needs the {g} statistics: Cartographer(..., {g}=True)")
        if memorization in NEEDS_REFERENCE and self.reference_mode is None:
            raise ValueError(f"memorization={memorization!r} needs reference=: a 1-D [N] array of per-sample reference "
                             f"losses in nats per token, or one of {REFERENCE_MODES}")
        if self.reference is not None and memorization == "relative_excess":
            check_reference(self.reference, self.state.num_samples, nonnegative=True)
        self.memorization = memorization
        self.alpha_d, self.alpha_m = float(alpha_d), float(alpha_m)
        self.gamma, self.alpha = float(gamma), float(alpha)
        self.keep_outliers, self.seed = bool(keep_outliers), seed
        self.stalled = stalled
        self.stalled_mask: Optional[torch.Tensor] = None  # [N] bool, fixed with the labels
        self.label_after, self.eps_index = label_after, eps_index
        self.loss = CartoLoss(state=self.state, **loss_kwargs)
        self.quadrants: Optional[Quadrants] = None  # fixed once labelled
        self._sampler: Optional[CartoSampler] = None

    # ------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.state.num_samples

    @property
    def intervening(self) -> bool:
        """Whether the labels are fixed and the interventions apply (epochs after ``label_after``)."""
        return self.quadrants is not None

    def config(self) -> dict:
        return {"num_samples": self.num_samples, "burn_in": self.state.burn_in, "eps": self.state.eps.tolist(),
                "alpha_d": self.alpha_d, "alpha_m": self.alpha_m, "gamma": self.gamma, "alpha": self.alpha,
                "keep_outliers": self.keep_outliers, "seed": self.seed, "label_after": self.label_after,
                "eps_index": self.eps_index, "memorization": self.memorization, "stalled": self.stalled}

    def end_epoch(self) -> bool:
        """Folds the epoch into the scores (all-reduced across ranks when distributed). Returns True
        exactly once: at the end of epoch ``label_after``, when the labels are computed and the
        loss weights set; use :attr:`intervening` to ask about later epochs. Also advances the
        sampler's epoch, so the next epoch draws anew. Raises RuntimeError, before folding
        anything, when this epoch labels with a calibrated score and no reference is there yet."""
        if self.quadrants is None and self.state.epochs_done + 1 >= self.label_after:
            self._check_reference_ready()
        self.state.end_epoch()
        started = False
        if self.quadrants is None and self.state.epochs_done >= self.label_after:
            self._label()
            started = True
        if self._sampler is not None:
            self._sampler.set_epoch(self.state.epochs_done)
        return started

    def set_reference(self, reference) -> None:
        """Sets the per-sample reference losses [N] (nats per token; finite, and > 0 for
        "relative_excess") used by the calibrated scores. Allowed until the labels are fixed
        (they are computed once, at the end of epoch ``label_after``)."""
        if self.quadrants is not None:
            raise RuntimeError("Cartographer.set_reference: the labels are already fixed (end of epoch "
                               f"{self.label_after}); a reference must be set before labelling")
        ref = check_reference(reference, self.num_samples, nonnegative=self.memorization == "relative_excess")
        self.reference = ref
        if self.reference_mode is None:
            self.reference_mode = "given"

    def score_reference(self, model: torch.nn.Module, batches, *, forward=None, linear_head=None,
                        progress: bool = True) -> torch.Tensor:
        """Measures the reference as ``model``'s loss on every sample, before training on them
        (``reference="initial"``: the base model of a fine-tuning run), with
        :func:`gdc_ext.reference_losses` (same arguments), and sets it. Refused once anything
        was recorded, since the model has then trained on the samples. Returns the [N] reference."""
        if self.state.epochs_done > 0 or bool((self.state.acc[:, ACC_COUNT] > 0).any()):
            raise RuntimeError("Cartographer.score_reference: the state has already recorded training losses, so the "
                               "model has trained on these samples; score the reference before the first step")
        from gdc_ext.counterfactual import reference_losses

        ref = reference_losses(model, batches, self.num_samples, ignore_index=self.loss.ignore_index,
                               forward=forward, linear_head=linear_head, progress=progress)
        self.set_reference(ref)
        return self.reference

    @property
    def needs_reference(self) -> bool:
        """Whether a reference must still be measured or set before labelling."""
        return self.reference_mode is not None and self.reference is None

    def _check_reference_ready(self) -> None:
        if self.memorization in NEEDS_REFERENCE and self.reference is None:
            how = ("measured (call score_reference(model, batches) before training)" if self.reference_mode == "initial"
                   else "set (call set_reference(values) before labelling)")
            raise RuntimeError(f"Cartographer: memorization={self.memorization!r} with reference={self.reference_mode!r}, "
                               f"but no reference was {how}")

    def _label(self) -> None:
        scores = self.state.scores()
        self.quadrants = scores.quadrants(self.alpha_d, self.alpha_m, eps_index=self.eps_index, by=self.memorization,
                                          reference=self.reference, seed=self.seed)
        self.stalled_mask = cartography_stalled(scores)
        self._apply_weights()

    def prune(self, fraction: float) -> torch.Tensor:
        """Ids kept [N - round(fraction * N)] int64 after removing the top ``fraction`` of samples by
        this Cartographer's ``memorization`` score on the current scores (see
        :func:`gdc_ext.prune`; "random" is seeded by ``seed``)."""
        return prune(self.state.scores(), fraction, by=self.memorization, seed=self.seed,
                     eps_index=self.eps_index, reference=self.reference)

    def _apply_weights(self) -> None:
        self.loss.set_sample_weights(loss_weights(self.quadrants, self.alpha).to(self.state.device))

    def _need_labels(self, what: str) -> Quadrants:
        if self.quadrants is None:
            raise RuntimeError(f"Cartographer.{what}: no labels yet; they are computed by end_epoch() at the end "
                               f"of epoch {self.label_after} (done: {self.state.epochs_done})")
        return self.quadrants

    def multiplicities(self) -> torch.Tensor:
        """[N] float64 per-epoch multiplicities from the fixed labels."""
        q = self._need_labels("multiplicities")
        how = STALLED[self.stalled]
        return multiplicities(q, gamma=self.gamma, keep_outliers=self.keep_outliers,
                              stalled=None if how is None else self.stalled_mask,
                              stalled_multiplicity=1.0 if how is None else how)

    def loss_weights(self) -> torch.Tensor:
        """[N] float32 loss weights from the fixed labels (also set on :attr:`loss`)."""
        return loss_weights(self._need_labels("loss_weights"), self.alpha)

    def sampler(self, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> CartoSampler:
        """The :class:`~gdc_ext.CartoSampler` for the intervention epochs (one instance, created on
        first call; its epoch follows the number of folded epochs)."""
        if self._sampler is None:
            self._sampler = CartoSampler(self.multiplicities(), seed=self.seed, num_replicas=num_replicas, rank=rank)
            self._sampler.set_epoch(self.state.epochs_done)
        return self._sampler

    def counts(self) -> dict:
        """Samples per quadrant name (empty before labelling)."""
        return {} if self.quadrants is None else self.quadrants.counts()

    def __repr__(self) -> str:
        phase = f"intervening, {self.counts()}" if self.intervening else "burn-in"
        return f"Cartographer({self.config()}, epochs_done={self.state.epochs_done}, {phase})"

    @property
    def reference_name(self) -> Optional[str]:
        """The name its reference is stored under in a state file (:meth:`save_state`, the Hugging
        Face checkpoints): "initial" for ``reference="initial"`` (the base model's loss), "given"
        for one given or set by hand; None while there is no reference."""
        if self.reference is None:
            return None
        return "initial" if self.reference_mode == "initial" else "given"

    def stored_references(self) -> dict:
        """{:attr:`reference_name`: reference [N]} to save with the state ({} without one)."""
        return {} if self.reference is None else {self.reference_name: self.reference}

    def save_state(self, path) -> None:
        """Saves its CartoState to ``path`` (:meth:`CartoState.save`) with its reference, if any,
        stored in the same file under :attr:`reference_name`, so that ``gdc report PATH`` scores
        with it. (The labels and configuration are in :meth:`state_dict`.)"""
        self.state.save(path, references=self.stored_references())

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: the CartoState, the configuration (with the ``memorization``
        score), the ``reference`` [N] (or None) and the fixed labels."""
        q = self.quadrants
        return {"state": self.state.state_dict(), "config": self.config(),
                "reference": None if self.reference is None else self.reference.clone(),
                "codes": None if q is None else q.codes.clone(),
                "stalled": None if self.stalled_mask is None else self.stalled_mask.clone(),
                "tau_d": None if q is None else q.tau_d, "tau_m": None if q is None else q.tau_m}

    def load_state_dict(self, sd: dict) -> None:
        """Restores a :meth:`state_dict` of a Cartographer with the same configuration (and the same
        reference, if any). Everything (configuration, reference, labels, thresholds and the
        CartoState's tensors) is checked before anything is replaced: a rejected dict raises
        ValueError and leaves this Cartographer, its state and its loss weights unchanged."""
        if not isinstance(sd, dict) or not {"state", "config", "codes"} <= sd.keys() or not isinstance(sd["config"], dict):
            raise ValueError("state_dict: expected a dict from Cartographer.state_dict()")
        mine = self.config()
        # saved before the choices existed: the paper's m_i, and every ambiguous-hard sample up-sampled
        saved = {"memorization": "memorization", "stalled": "upsample", **sd["config"]}
        for key in _CONFIG:
            if saved.get(key) != mine[key]:
                raise ValueError(f"state_dict: mismatched Cartographer: {key} is {saved.get(key)!r} in the "
                                 f"saved one but {mine[key]!r} here")
        saved_ref = sd.get("reference")
        # a reference measured or set during the saved run (reference="initial" / "later") is adopted
        adopt = saved_ref is not None and self.reference is None and self.reference_mode in REFERENCE_MODES
        if adopt:
            saved_ref = check_reference(saved_ref, self.num_samples)
        try:
            ref_differs = not adopt and ((saved_ref is None) != (self.reference is None) or (
                saved_ref is not None and not torch.equal(torch.as_tensor(saved_ref, dtype=torch.float64),
                                                          self.reference)))
        except (TypeError, ValueError, RuntimeError) as e:  # not numbers, or another shape
            raise ValueError(f"state_dict: reference must be None or [{self.num_samples}] float64, got "
                             f"{type(saved_ref).__name__} ({e})") from None
        if ref_differs:
            raise ValueError("state_dict: mismatched Cartographer: reference differs between the saved one ("
                             f"{'none' if saved_ref is None else 'given'}) and this one "
                             f"({'none' if self.reference is None else 'given'})")
        quadrants = weights = mask = None
        codes = sd["codes"]
        if codes is not None:
            try:
                codes = torch.as_tensor(codes)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"state_dict: codes must be an int8 tensor [{self.num_samples}] or None, got "
                                 f"{type(codes).__name__}") from None
            if codes.shape != (self.num_samples,) or codes.dtype != torch.int8:
                raise ValueError(f"state_dict: codes must be int8 [{self.num_samples}], got "
                                 f"{tuple(codes.shape)} {codes.dtype}")
            if bool(((codes < -1) | (codes > 3)).any()):
                raise ValueError(f"state_dict: codes must be in {sorted(QUADRANT_NAMES)}")
            tau = []
            for name in ("tau_d", "tau_m"):
                v = sd.get(name)
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise ValueError(f"state_dict: {name} must be a float when codes are given, got {v!r}")
                tau.append(float(v))
            quadrants = Quadrants(codes.detach().cpu().clone(), tau[0], tau[1])
            weights = loss_weights(quadrants, self.alpha).to(self.state.device)
            mask = sd.get("stalled")
            if mask is not None or STALLED[self.stalled] is not None:
                try:  # a tensor, or the list of bools a JSON checkpoint holds (integrations.hf)
                    mask = None if mask is None else torch.as_tensor(mask)
                except (TypeError, ValueError, RuntimeError):
                    mask = None
                if mask is None or mask.dtype != torch.bool or mask.shape != codes.shape:
                    raise ValueError(f"state_dict: stalled must be a bool tensor [{self.num_samples}] with the labels "
                                     f"(stalled={self.stalled!r}), got {type(sd.get('stalled')).__name__}")
                mask = mask.detach().cpu().clone()
        new_state = self.state._checked_state_dict(sd["state"])
        # nothing raises from here on: replace everything
        for name, t in new_state.items():
            setattr(self.state, name, t)
        if adopt:
            self.reference = saved_ref
        self._sampler = None
        self.quadrants = quadrants
        self.stalled_mask = mask if quadrants is not None else None
        self.loss.set_sample_weights(weights)


# The quantiles of the score that the integrations log after every epoch.
LOG_QUANTILES = (0.5, 0.9, 0.99)


def epoch_metrics(target: Union[Cartographer, CartoState], quantiles: Sequence[float] = LOG_QUANTILES,
                  prefix: str = "carto/") -> dict:
    """What CartoTrainer and the Lightning CartoCallback log after each folded epoch, as plain
    Python numbers (keys start with ``prefix``):

    - ``epochs``: epochs folded; ``scored``: samples with a difficulty (seen in a burn-in epoch);
    - ``{by}_p50``, ``{by}_p90``, ``{by}_p99`` (``quantiles``): quantiles of the score ``by`` over
      the scored samples, ``by`` the Cartographer's ``memorization`` score (with its reference,
      ``eps_index`` and seed), or :data:`~gdc_ext.cartography.DEFAULT_SCORE` for a CartoState;
      left out while a calibrated score waits for its reference, or while nothing is scored;
    - ``flagged``: samples in the hotspot-memorized quadrant (code 2): of the Cartographer's fixed
      labels once it has labelled (the samples its loss weights act on), else of the quadrants the
      score gives now (the Cartographer's ``alpha_d`` / ``alpha_m``, or 0.75 / 0.75 for a CartoState):
      what labelling now would flag;
    - once a Cartographer has labelled: the count of every quadrant of its fixed labels,
      ``n_stable_easy``, ``n_ambiguous_hard``, ``n_hotspot_memorized``, ``n_noisy_outlier``,
      ``n_unscored``.
    """
    from gdc_ext.cartography import quantiles as _quantiles
    from gdc_ext.cartography import score_values

    from gdc_ext.sharded import refuse_sharded

    refuse_sharded(target, "epoch_metrics")
    if isinstance(target, Cartographer):
        carto, state = target, target.state
        by, reference, eps_index, seed = carto.memorization, carto.reference, carto.eps_index, carto.seed
        alpha_d, alpha_m = carto.alpha_d, carto.alpha_m
    elif isinstance(target, CartoState):
        carto, state = None, target
        by, reference, eps_index, seed, alpha_d, alpha_m = DEFAULT_SCORE, None, 0, 0, 0.75, 0.75
    else:
        raise ValueError(f"epoch_metrics: target must be a Cartographer or CartoState, got {type(target).__name__}")
    scores = state.scores()
    out = {f"{prefix}epochs": int(state.epochs_done), f"{prefix}scored": int(scores.scored.sum())}
    labelled = carto is not None and carto.quadrants is not None
    if by in NEEDS_REFERENCE and reference is None:
        score = None  # reference="initial" / "later" not measured yet
    else:
        score = score_values(scores, by, eps_index=eps_index, reference=reference, seed=seed)
        for q, v in _quantiles(score, quantiles).items():
            if v == v:  # NaN: nothing scored yet
                out[f"{prefix}{by}_p{100 * q:g}"] = v
    if labelled:
        counts = carto.quadrants.counts()
        out[f"{prefix}flagged"] = counts[QUADRANT_NAMES[2]]
        for name, n in counts.items():
            out[f"{prefix}n_{name.replace('-', '_')}"] = n
    elif score is not None:
        from gdc_ext.cartography import quadrants

        out[f"{prefix}flagged"] = int((quadrants(scores.difficulty, score, alpha_d, alpha_m).codes == 2).sum())
    return out
