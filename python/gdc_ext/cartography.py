"""From scores to actions: quadrants, per-sample multiplicities and loss weights, pruning.

Definitions: docs/method.md. Every function takes explicit parameters; nothing is hidden.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Union

import numpy as np
import torch

from gdc_ext._seed import check_seed
from gdc_ext.layout import optional_scores_columns

__all__ = ["QUADRANT_NAMES", "Quadrants", "quadrants", "multiplicities", "stalled", "loss_weights", "prune", "PRUNE_BY",
           "SCORES", "SCORE_LABELS", "DEFAULT_SCORE", "DEFAULT_REFERENCE_SCORE",
           "NEEDS_REFERENCE", "NEEDS_GROUP", "available_scores", "score_values", "selection_order", "top_k",
           "resolve_eps", "score_columns", "iter_score_columns", "quantiles", "flagged_ids", "REGIONS",
           "REGION_FRACTION", "cartography_regions"]

QUADRANT_NAMES = {0: "stable-easy", 1: "ambiguous-hard", 2: "hotspot-memorized", 3: "noisy-outlier",
                  -1: "unscored"}


class Quadrants(NamedTuple):
    """codes: [N] int8 (0..3, -1 unscored); tau_d, tau_m: the thresholds used."""

    codes: torch.Tensor
    tau_d: float
    tau_m: float

    def counts(self) -> dict:
        """Number of samples per quadrant name."""
        c = self.codes
        return {QUADRANT_NAMES[q]: int((c == q).sum()) for q in (0, 1, 2, 3, -1)}


def _as_f64(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
    return a


def quadrants(difficulty, memorization, alpha_d: float = 0.75, alpha_m: float = 0.75) -> Quadrants:
    """Quadrant codes by percentile thresholds over the scored samples (NumPy's linear
    interpolation): hard = d > tau_d, memorized = m > tau_m (strict: ties go low).

    difficulty, memorization: [N] (NaN difficulty = unscored). The memorized axis may be any
    score, higher = more memorized: the paper's m_i or one of :func:`score_values` (e.g. the
    learning gain). alpha_d, alpha_m in [0, 1].
    """
    for name, a in (("alpha_d", alpha_d), ("alpha_m", alpha_m)):
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {a}")
    d = _as_f64(difficulty, "difficulty")
    m = _as_f64(memorization, "memorization")
    if d.shape != m.shape:
        raise ValueError(f"difficulty {d.shape} and memorization {m.shape} must have the same shape")
    scored = ~np.isnan(d)
    codes = np.full(d.shape, -1, dtype=np.int8)
    if not scored.any():
        return Quadrants(torch.from_numpy(codes), float("nan"), float("nan"))
    tau_d = float(np.percentile(d[scored], 100 * alpha_d))
    tau_m = float(np.percentile(m[scored], 100 * alpha_m))
    codes[scored] = ((d[scored] > tau_d).astype(np.int8) + 2 * (m[scored] > tau_m).astype(np.int8))
    return Quadrants(torch.from_numpy(codes), tau_d, tau_m)


def _codes(q: Union[Quadrants, torch.Tensor]) -> torch.Tensor:
    codes = q.codes if isinstance(q, Quadrants) else torch.as_tensor(q)
    if codes.dim() != 1:
        raise ValueError(f"quadrant codes must be 1-D [N], got shape {tuple(codes.shape)}")
    if bool(((codes < -1) | (codes > 3)).any()):
        raise ValueError("quadrant codes must be in {-1, 0, 1, 2, 3}")
    return codes.to(torch.int64)


def multiplicities(q, gamma: float = 2.0, keep_outliers: bool = False, easy: float = 1.0,
                   unscored: float = 1.0, *, stalled=None, stalled_multiplicity: float = 1.0) -> torch.Tensor:
    """Per-epoch sampling multiplicity [N] float64: 0 -> easy, 1 -> gamma, 2 -> 1,
    3 -> 0 (1 with keep_outliers), unscored -> `unscored`.

    stalled: optional [N] bool (:func:`stalled`): ambiguous-hard samples (code 1) marked True get
    ``stalled_multiplicity`` (>= 0; default 1: not up-sampled) instead of gamma. None: every
    ambiguous-hard sample gets gamma (the paper's Algorithm 1)."""
    if not gamma > 1.0:
        raise ValueError(f"gamma must be > 1 (up-sampling of ambiguous-hard samples), got {gamma}")
    if easy < 0 or unscored < 0 or stalled_multiplicity < 0:
        raise ValueError("easy, unscored and stalled multiplicities must be >= 0")
    codes = _codes(q)
    table = torch.tensor([easy, gamma, 1.0, 1.0 if keep_outliers else 0.0, unscored], dtype=torch.float64)
    out = table[torch.where(codes < 0, torch.full_like(codes, 4), codes)]
    if stalled is not None:
        mask = torch.as_tensor(stalled)
        if mask.dtype != torch.bool or mask.shape != codes.shape:
            raise ValueError(f"stalled must be a bool mask of the codes' shape {tuple(codes.shape)}, got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        out[(codes == 1) & mask.cpu()] = float(stalled_multiplicity)
    return out


def stalled(scores) -> torch.Tensor:
    """[N] bool: scored samples whose loss did not fall over the burn-in, ``gain = d - last <= 0``
    (the loss at the last observation at or above the burn-in mean; docs/method.md,
    "Interventions"). While the model learns the rest, a hard sample whose loss does not fall
    contradicts what it learns: the signature of a wrong label (Swayamdipta et al. 2020's
    hard-to-learn region; Arpit et al. 2017: networks fit clean patterns before noise).
    Up-sampling it only speeds up memorizing it."""
    g = _as_f64(scores.gain, "gain")
    return torch.from_numpy(~np.isnan(g) & (np.nan_to_num(g, nan=1.0) <= 0.0))


def loss_weights(q, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample loss weight [N] float32: hotspot-memorized (2) -> alpha, everything else 1."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (down-weighting of memorized samples), got {alpha}")
    codes = _codes(q)
    w = torch.ones(codes.shape, dtype=torch.float32)
    w[codes == 2] = alpha
    return w


def resolve_eps(scores, eps: Optional[float] = None, eps_index: Optional[int] = None) -> Optional[float]:
    """The threshold that ``eps`` (a tracked value) or ``eps_index`` (its position in
    ``scores.eps``) names, for :meth:`Scores.memorization_at`; None (neither given) is the first.
    Raises ValueError for an index out of range or both given."""
    if eps_index is None:
        return eps
    if eps is not None:
        raise ValueError(f"give eps or eps_index, not both (got eps={eps!r}, eps_index={eps_index!r})")
    K = len(scores.eps)
    if isinstance(eps_index, bool) or not isinstance(eps_index, (int, np.integer)) or not 0 <= eps_index < K:
        raise ValueError(f"eps_index must be an int in [0, {K}) (eps = {list(scores.eps)}), got {eps_index!r}")
    return scores.eps[int(eps_index)]


def selection_order(score, tiebreak=None) -> torch.Tensor:
    """Sample ids [N] int64 in selection order: highest ``score`` first, ties by higher
    ``tiebreak`` (NaN lowest), then by lower id; unscored samples (NaN score) last, by id.

    score: [N] float (NaN = unscored); tiebreak: [N] float or None.
    """
    s = _as_f64(score, "score")
    ids = np.arange(len(s))
    unscored = np.isnan(s)
    t = np.zeros_like(s) if tiebreak is None else np.nan_to_num(_as_f64(tiebreak, "tiebreak"), nan=-np.inf)
    if t.shape != s.shape:
        raise ValueError(f"score {s.shape} and tiebreak {t.shape} must have the same shape")
    t = np.where(unscored, 0.0, t)  # the unscored go by id alone
    # np.lexsort sorts by its last key first: unscored flag, then -score, -tiebreak, id.
    order = np.lexsort((ids, -t, -np.where(unscored, 0.0, s), unscored))
    return torch.from_numpy(order).to(torch.int64)


def top_k(score, k: int, tiebreak=None, *, ordered: bool = True) -> torch.Tensor:
    """The first ``k`` ids of :func:`selection_order` (the same ties), by a partial sort.

    score: [N] float (NaN = unscored); tiebreak: [N] float or None; k: 0 <= k (capped at N).
    ordered: return them in selection order (False: sorted by id, which is all pruning needs).
    Cost: O(N) to find the k-th value (``np.partition``) plus a sort of the selected ids and of
    the samples tied at the boundary, instead of a full sort of N keys.
    Returns int64 ids [min(k, N)].
    """
    s = _as_f64(score, "score")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    k = min(int(k), len(s))
    t = np.zeros_like(s) if tiebreak is None else np.nan_to_num(_as_f64(tiebreak, "tiebreak"), nan=-np.inf)
    if t.shape != s.shape:
        raise ValueError(f"score {s.shape} and tiebreak {t.shape} must have the same shape")
    scored = np.flatnonzero(~np.isnan(s))
    if k >= len(scored):  # every scored sample, then the unscored by id
        chosen = np.concatenate([scored, np.flatnonzero(np.isnan(s))[:k - len(scored)]])
    elif k == 0:
        chosen = np.zeros(0, dtype=np.int64)
    else:
        vals = s[scored]
        kth = -np.partition(-vals, k - 1)[k - 1]  # the k-th highest score
        above = scored[vals > kth]
        tied = scored[vals == kth]
        # the boundary's ties go by higher tiebreak, then lower id (np.lexsort: last key first)
        tied = tied[np.lexsort((tied, -t[tied]))][:k - len(above)]
        chosen = np.concatenate([above, tied])
    if ordered:
        unscored = np.isnan(s[chosen])
        chosen = chosen[np.lexsort((chosen, -np.where(unscored, 0.0, t[chosen]), -np.where(unscored, 0.0, s[chosen]),
                                    unscored))]
    else:
        chosen = np.sort(chosen)
    return torch.from_numpy(chosen.astype(np.int64))


def _masked(values, scores) -> np.ndarray:
    """[N] float64 copy of ``values`` with NaN where the sample has no burn-in difficulty."""
    v = _as_f64(values, "score")
    return np.where(np.isnan(_as_f64(scores.difficulty, "difficulty")), np.nan, v)


def _by_memorization(scores, eps, seed, reference):
    return _masked(scores.memorization_at(eps), scores)


def _by_gain(scores, eps, seed, reference):
    return _as_f64(scores.gain, "gain")


def _by_excess(scores, eps, seed, reference):
    if reference is None:
        raise ValueError("by='excess' needs reference=: a 1-D [N] array of per-sample reference losses in nats "
                         "per token (e.g. gdc_ext.unigram_reference(samples))")
    return _masked(scores.excess(reference), scores)


def _by_relative_excess(scores, eps, seed, reference):
    if reference is None:
        raise ValueError("by='relative_excess' needs reference=: a 1-D [N] array of non-negative per-sample reference "
                         "losses in nats per token (e.g. gdc_ext.reference_losses(model_that_did_not_train_on_it, ...))")
    return _masked(scores.relative_excess(reference), scores)


def _by_last(scores, eps, seed, reference):
    # lowest last loss first: what the model fits best at the end of the run
    return _masked(-_as_f64(scores.last_loss, "last_loss"), scores)


def _by_loss(scores, eps, seed, reference):
    return _as_f64(scores.difficulty, "difficulty")


def _by_confidence(scores, eps, seed, reference):
    return _masked(scores.confidence, scores)


def _by_hard_to_learn(scores, eps, seed, reference):
    # lowest confidence first: Swayamdipta et al.'s hard-to-learn order (flipped labels)
    return _masked(-_as_f64(scores.confidence, "confidence"), scores)


def _by_variability(scores, eps, seed, reference):
    return _masked(scores.variability, scores)


def _by_forgetting(scores, eps, seed, reference):
    # never-learnt samples first, as Toneva et al. (infinitely many events) and Swayamdipta et al. rank them
    f = _as_f64(scores.forgetting, "forgetting")
    return _masked(np.where(scores.never_learnt.numpy(), np.inf, f), scores)


def _by_accuracy_last(scores, eps, seed, reference):
    return _masked(scores.accuracy_last, scores)


def _by_random(scores, eps, seed, reference):
    # A seeded permutation of the scored ids, written as descending scores so that
    # selection_order gives exactly that permutation.
    d = _as_f64(scores.difficulty, "difficulty")
    scored = np.flatnonzero(~np.isnan(d))
    perm = np.random.default_rng(seed).permutation(scored)
    out = np.full(len(d), np.nan)
    out[perm] = np.arange(len(perm), 0, -1, dtype=np.float64)
    return out


# The selection scores: name -> fn(scores, eps, seed, reference) giving [N] float64, higher =
# more memorized / selected first, NaN = unscored (selected last). A new score is one entry here
# (and one line in SCORE_LABELS).
PRUNE_BY: Dict[str, Callable] = {"memorization": _by_memorization, "gain": _by_gain, "excess": _by_excess,
                                 "relative_excess": _by_relative_excess, "last": _by_last, "loss": _by_loss,
                                 "random": _by_random, "confidence": _by_confidence,
                                 "hard_to_learn": _by_hard_to_learn, "variability": _by_variability,
                                 "forgetting": _by_forgetting, "accuracy_last": _by_accuracy_last}
# The scores that need a per-sample reference (reference=).
NEEDS_REFERENCE = ("excess", "relative_excess")
# The scores that need a statistic group beyond core: {score: group} (a state built with
# cartography=True; reading them on another raises a ValueError saying so).
NEEDS_GROUP: Dict[str, str] = {"confidence": "cartography", "hard_to_learn": "cartography",
                               "variability": "cartography", "forgetting": "cartography",
                               "accuracy_last": "cartography"}
SCORES = tuple(PRUNE_BY)  # the `by=` vocabulary, in the order the CLI lists it

# What each score is, for axis labels and reports.
SCORE_LABELS: Dict[str, str] = {
    "memorization": "memorization m (forget rate)",
    "gain": "learning gain d - last loss (nats)",
    "excess": "excess: reference - last loss (nats)",
    "relative_excess": "relative excess: 1 - last loss / reference",
    "last": "-last loss (nats; lowest last loss first)",
    "loss": "difficulty d (mean burn-in loss, nats)",
    "random": "random order (seeded)",
    "confidence": "confidence: mean p(y) over epochs (easy-to-learn first)",
    "hard_to_learn": "-confidence (lowest mean p(y) first: hard-to-learn, flipped labels)",
    "variability": "variability: std of p(y) over epochs (ambiguous first)",
    "forgetting": "forgetting events (never learnt first)",
    "accuracy_last": "token accuracy at the last epoch (exact memorization)",
}

# The scores that the entry points (Cartographer, the `gdc` CLI, the demo) use unless told
# otherwise, each chosen by its WORST case over the reproduction's settings with fair labels
# (docs/RESULTS.md, "Counterfactual references", `make reproduce`, 5 seeds, AUROC mean +- 95%
# interval; settings: the demo corpus, planted canaries, a noisy-label classifier, natural text
# with secrets / easy distractors / injected copies, and its fine-tuning variant):
# - without a reference, "gain" (worst 0.41 +- 0.06, above chance on 8 of 9 labels) over "last"
#   (worst 0.00: a score read at the last epoch ranks easy, generalizable samples first; it was
#   the default before and ranked every memorized sample of the demo corpus last), "loss" (0.41,
#   5 of 9) and the paper's m_i (0.37, 0 of 9). No in-run score is robust: check on your data
#   (gdc_ext.audit) or give a reference;
# - with a counterfactual reference (a model that did not train on the sample), "excess"
#   (worst 0.95 +- 0.02 with cross-fit halves, 0.88 with an independent model, 0.90 with the
#   initial model of a fine-tuning run) over "relative_excess" (0.80 / 0.78 / 0.89), which loses
#   where the model fits everything to a loss near 0 (the noisy-label classifier).
# The library functions of the paper's method (prune, score_values, Scores.quadrants,
# plot.data_map) keep the paper's m_i as their own default, so the paper stays reproducible.
DEFAULT_SCORE = "gain"
DEFAULT_REFERENCE_SCORE = "excess"


def _check_by(by) -> str:
    if not isinstance(by, str) or by not in PRUNE_BY:
        raise ValueError(f"by must be one of {', '.join(repr(k) for k in PRUNE_BY)}, got {by!r}")
    return by


def available_scores(scores, reference=None) -> tuple:
    """The names of :data:`SCORES` that ``scores`` can give: those needing a reference only with
    ``reference``, those needing a statistic group (:data:`NEEDS_GROUP`) only when the state kept it."""
    has = getattr(scores, "has", None)
    return tuple(by for by in SCORES if not (by in NEEDS_REFERENCE and reference is None)
                 and not (by in NEEDS_GROUP and not (has is not None and has("confidence"))))


def score_values(scores, by: str = "memorization", *, seed: int = 0, eps: Optional[float] = None,
                 eps_index: Optional[int] = None, reference=None) -> torch.Tensor:
    """The selection score [N] float64 named by ``by`` (one of :data:`SCORES`): higher is more
    memorized and selected (pruned) first, NaN marks unscored samples.

    by: "memorization": the paper's m_i at the threshold ``eps`` / ``eps_index`` (default the
            first); NaN where there is no burn-in difficulty.
        "gain": :attr:`Scores.gain`, difficulty - last loss; NaN where there is no difficulty.
        "excess": :meth:`Scores.excess`, reference - last loss; needs ``reference`` [N] (nats
            per token, finite); NaN where there is no difficulty.
        "relative_excess": :meth:`Scores.relative_excess`, 1 - last loss / reference; needs
            ``reference`` [N] (nats per token, finite, > 0); NaN where there is no difficulty.
        "last": -last loss, lowest last loss first; NaN where there is no difficulty.
    Every score marks the same samples unscored (no burn-in epoch observed, as the quadrants do),
    so every ``by`` selects them last and prunes the same budget.
        "loss": the difficulty d (mean burn-in loss), highest first: the paper's loss baseline
            (hard samples first, not the lowest loss).
        "random": a uniform order of the scored samples, seeded by ``seed``.
        With the cartography group (``CartoState(..., cartography=True)``; docs/method.md, "Data
        cartography"): "confidence" (highest mean p(y) first, easy-to-learn), "hard_to_learn"
        (lowest first: Swayamdipta et al.'s hard-to-learn region, where flipped labels are),
        "variability" (highest std of p(y) first, ambiguous), "forgetting" (Toneva et al.'s
        forgetting events, never-learnt samples first as +inf), "accuracy_last" (the last epoch's
        token accuracy, exact memorization). Without the group they raise ValueError saying how
        to enable it. NaN where there is no difficulty, as for every score.
    reference: checked whenever given (a ValueError for a wrong length or a NaN), used by "excess" and
        "relative_excess".
    """
    _check_by(by)
    seed = check_seed(seed)  # whatever ``by`` is: a bad seed is an error before it matters
    if reference is not None:
        from gdc_ext.state import check_reference

        check_reference(reference, len(_as_f64(scores.difficulty, "difficulty")))
    values = PRUNE_BY[by](scores, resolve_eps(scores, eps, eps_index), seed, reference)
    return torch.from_numpy(np.array(values, dtype=np.float64))  # a copy: never a view of the scores


def prune(scores, fraction: float, by: str = "memorization", seed: int = 0, eps: Optional[float] = None, *,
          eps_index: Optional[int] = None, reference=None) -> torch.Tensor:
    """Ids kept after removing the top ``fraction`` of the N samples by the score ``by``.

    Exactly ``round(fraction * N)`` samples are removed (Python's round): the highest scores
    first (see :func:`score_values` for each ``by``), ties broken by higher difficulty, then by
    lower id (for "memorization" this is the paper's rule: highest m_i, ties by d_i), unscored
    samples (NaN score) last, by id. Every score, and the baselines, use the same budget.
    by: one of :data:`SCORES` (default "memorization", the paper's; the measured default of the
        entry points is :data:`DEFAULT_SCORE`). reference: [N] per-sample reference losses (nats
        per token), needed by "excess". seed: the "random" order.
    eps / eps_index: the threshold of m_i (a tracked value / its position; default the first).
    Returns sorted int64 ids [N - round(fraction * N)].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    score = score_values(scores, by, seed=seed, eps=eps, eps_index=eps_index, reference=reference)
    k = int(round(float(fraction) * len(score)))
    keep = np.ones(len(score), dtype=bool)
    keep[top_k(score, k, scores.difficulty, ordered=False).numpy()] = False
    return torch.from_numpy(np.flatnonzero(keep)).to(torch.int64)


def _eps_name(e: float) -> str:
    return repr(float(e))  # distinct tracked thresholds get distinct column names


def score_columns(scores, reference=None, *, seed: int = 0, quadrants=None) -> Dict[str, np.ndarray]:
    """Every per-sample column of ``scores`` as [N] NumPy arrays (copies), in this order:

    ``difficulty``, ``last_loss``, ``gain``, ``memorization`` and ``forgets`` (at the first tracked
    eps; with several, ``memorization@EPS`` / ``forgets@EPS`` for each other one), ``transitions``,
    ``observed``, the extras kept by the state (``min_loss``, ``loss_mean``, ``loss_std``,
    ``grad_energy``), the cartography columns kept by the state (``confidence``, ``variability``,
    ``accuracy_last``, ``correctness``, ``forgetting``, ``first_learned``), ``geometric_confidence``
    (extras) and ``never_learnt`` (cartography), ``reference`` when given, then ``score_BY`` for every ``by`` of
    :data:`SCORES` that can be computed (:func:`score_values`: higher = more memorized, NaN =
    unscored; "excess" and "relative_excess" only with a ``reference``, "random" seeded by
    ``seed``), and ``quadrant`` (int8 codes) when ``quadrants`` (a :class:`Quadrants` or [N]
    codes) is given. :func:`iter_score_columns` yields them one at a time.
    """
    return dict(iter_score_columns(scores, reference, seed=seed, quadrants=quadrants))


def iter_score_columns(scores, reference=None, *, seed: int = 0, quadrants=None):
    """(name, [N] array) for every column of :func:`score_columns`, one at a time (so that a
    caller reducing each, as :meth:`Scores.summary` does, holds one column of N at a time).
    ``reference`` and ``quadrants`` are checked before the first column."""
    from gdc_ext.state import check_reference

    def f64(t):
        return t.detach().cpu().double().numpy().copy()

    N = scores.difficulty.shape[0]
    # with a reference every calibrated score is computed, relative_excess too: it must be >= 0
    ref = None if reference is None else check_reference(reference, N, nonnegative=True)
    codes = None
    if quadrants is not None:
        codes = _codes(quadrants)
        if codes.shape[0] != N:
            raise ValueError(f"quadrants: {codes.shape[0]} codes for {N} samples")
    seed = check_seed(seed)
    yield "difficulty", f64(scores.difficulty)
    yield "last_loss", f64(scores.last_loss)
    yield "gain", f64(scores.gain)
    for k, e in enumerate(scores.eps):
        suffix = "" if k == 0 else f"@{_eps_name(e)}"
        yield "memorization" + suffix, f64(scores.memorization_by_eps[:, k])
        yield "forgets" + suffix, scores.forgets_by_eps[:, k].cpu().numpy().astype(np.int64)
    yield "transitions", scores.transitions.cpu().numpy().astype(np.int64)
    yield "observed", scores.observed.cpu().numpy().astype(np.int64)
    # the columns of the groups beyond core (csrc/state_stats.def) that the state kept, and those
    # derived from them
    for name in (*optional_scores_columns(), "geometric_confidence", "never_learnt"):
        if not scores.has(name):
            continue
        t = getattr(scores, name)
        yield name, (t.cpu().numpy().copy() if t.dtype == torch.bool
                     else t.cpu().numpy().astype(np.int64) if not t.dtype.is_floating_point else f64(t))
    if ref is not None:
        yield "reference", ref.numpy()
    for by in available_scores(scores, ref):
        yield f"score_{by}", score_values(scores, by, seed=seed, reference=ref).numpy()
    if codes is not None:
        yield "quadrant", codes.numpy().astype(np.int8)


def quantiles(values, qs=(0.5, 0.9, 0.99)) -> Dict[float, float]:
    """The quantiles ``qs`` (each in [0, 1]; NumPy's linear interpolation) of the finite entries
    of ``values`` (NaN / inf: unscored, left out); NaN for each when there is none."""
    a = _as_f64(values, "values")
    qs = tuple(float(q) for q in qs)
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must be in [0, 1], got {qs}")
    a = a[np.isfinite(a)]
    if not a.size:
        return {q: float("nan") for q in qs}
    return dict(zip(qs, (float(v) for v in np.quantile(a, qs))))


def flagged_ids(scores, by: str = DEFAULT_SCORE, *, fraction: Optional[float] = None, quadrant: Optional[int] = None,
                reference=None, alpha_d: float = 0.75, alpha_m: float = 0.75, seed: int = 0,
                eps: Optional[float] = None, eps_index: Optional[int] = None) -> torch.Tensor:
    """Sorted int64 ids of the samples flagged by the score ``by`` (default :data:`DEFAULT_SCORE`):
    exactly one of ``fraction`` (the ``round(fraction * N)`` samples :func:`prune` removes: the
    highest scores, same ties) or ``quadrant`` (the samples with that code in
    ``scores.quadrants(alpha_d, alpha_m, by=by, ...)``, e.g. 2 hotspot-memorized)."""
    if (fraction is None) == (quadrant is None):
        raise ValueError(f"give exactly one of fraction= or quadrant=, got fraction={fraction!r}, quadrant={quadrant!r}")
    if fraction is not None:
        kept = prune(scores, fraction, by=by, seed=seed, eps=eps, eps_index=eps_index, reference=reference).numpy()
        keep = np.zeros(scores.difficulty.shape[0], dtype=bool)
        keep[kept] = True
        return torch.from_numpy(np.flatnonzero(~keep)).to(torch.int64)
    if isinstance(quadrant, bool) or not isinstance(quadrant, (int, np.integer)) or quadrant not in QUADRANT_NAMES:
        raise ValueError(f"quadrant must be one of {sorted(QUADRANT_NAMES)}, got {quadrant!r}")
    q = scores.quadrants(alpha_d, alpha_m, eps=eps, eps_index=eps_index, by=by, reference=reference, seed=seed)
    return torch.from_numpy(np.flatnonzero(q.codes.numpy() == int(quadrant))).to(torch.int64)


# Swayamdipta et al.'s regions of the data map, in the order they are drawn and listed.
REGIONS = ("easy-to-learn", "ambiguous", "hard-to-learn")
# The size of each region: their filtering keeps the top 33% by a metric.
REGION_FRACTION = 0.33


def cartography_regions(scores, fraction: float = REGION_FRACTION) -> Dict[str, torch.Tensor]:
    """Swayamdipta et al.'s three regions of a state with the cartography group, each the
    ``round(fraction * n)`` of the n samples with a confidence (observed at least once) selected
    by one metric, as their filtering script selects: "easy-to-learn" the highest confidence,
    "ambiguous" the highest variability, "hard-to-learn" the lowest confidence; ties by lower id
    (docs/method.md, "Data cartography"). A sample may be in two regions or in none.

    Returns {region: sorted int64 ids}. Raises ValueError for a state without the group (saying
    how to enable it) or a fraction outside [0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    conf = _as_f64(scores.confidence, "confidence")
    var = _as_f64(scores.variability, "variability")
    k = int(round(float(fraction) * int((~np.isnan(conf)).sum())))
    by = {"easy-to-learn": conf, "ambiguous": var, "hard-to-learn": -conf}
    return {name: top_k(by[name], k, ordered=False) for name in REGIONS}
