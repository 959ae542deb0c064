"""Seeing the map: difficulty vs a memorization score (the paper's m_i, or the learning gain,
the excess over a reference, ...) coloured by quadrant, and histograms (log counts: m_i has many
ties at 0); or, for a state with the cartography group, Swayamdipta et al.'s data map itself
(``kind="cartography"``): confidence vs variability coloured by correctness, with their three
regions.

matplotlib is imported inside the functions, so ``import gdc_ext`` does not load it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from gdc_ext.cartography import (QUADRANT_NAMES, REGION_FRACTION, SCORE_LABELS, Quadrants,
                                 cartography_regions, resolve_eps, score_values)

__all__ = ["QUADRANT_COLORS", "REGION_COLORS", "KINDS", "data_map", "cartography_map"]

QUADRANT_COLORS = {0: "#4c9be8", 1: "#f2a541", 2: "#d62728", 3: "#7f4fbf", -1: "#9e9e9e"}
REGION_COLORS = {"easy-to-learn": "#2a7f3f", "ambiguous": "#b8860b", "hard-to-learn": "#b22222"}
KINDS = ("quadrants", "cartography")  # data_map's kind=


def data_map(scores, quadrants: Optional[Quadrants] = None, alpha_d: float = 0.75, alpha_m: float = 0.75,
             eps_index: Optional[int] = None, jitter: float = 0.01, highlight=None,
             highlight_label: str = "highlighted", title: Optional[str] = None, path=None, seed: int = 0,
             max_points: Optional[int] = None, *, eps: Optional[float] = None, by: str = "memorization",
             reference=None, kind: str = "quadrants", fraction: float = REGION_FRACTION):
    """Draws the data map of ``scores`` (a :class:`~gdc_ext.Scores`) and returns the figure.

    kind: "quadrants" (default, the paper's map, below) or "cartography": Swayamdipta et al.'s
        data map of a state built with ``cartography=True`` (:func:`cartography_map`; it takes
        ``highlight``, ``highlight_label``, ``title``, ``path``, ``seed``, ``max_points`` and
        ``fraction``, the size of each region; the other arguments are for the quadrant map).

    Left panel: difficulty d_i (x) vs the score ``by`` (y), one dot per scored sample coloured by
    quadrant, dashed lines at tau_d and tau_m, legend with the count per quadrant. Right panels:
    histograms of the score (log count: most samples tie at m = 0) and of d, with the thresholds.

    Args:
        quadrants: the labels to colour by (default: computed from ``scores`` with alpha_d, alpha_m
            and the same ``by``).
        by: the score on the y axis, one of :data:`gdc_ext.cartography.SCORES` (default
            "memorization", the paper's m_i); the axis labels name it. ``reference`` [N] (nats
            per token) is needed by "excess"; "random" is seeded by ``seed``.
        eps, eps_index: the threshold of m_i (a tracked value / its position in ``scores.eps``;
            default the first).
        jitter: standard deviation of the vertical jitter, as a fraction of the score's range (0: none),
            so the many ties at m = 0 (and at other multiples of 1/transitions) spread out; the
            histograms show the exact values.
        highlight: optional ids [k] (e.g. known canaries) drawn as black-edged markers on top.
        path: if given, the figure is saved there (PNG, 150 dpi) as well.
        max_points: draw at most this many (seeded random) non-highlighted points.
        seed: seeds the jitter, the point subsample and the "random" score.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if kind == "cartography":
        return cartography_map(scores, fraction=fraction, highlight=highlight, highlight_label=highlight_label,
                               title=title, path=path, seed=seed, max_points=max_points)
    plt = _pyplot(path)

    eps = resolve_eps(scores, eps=eps, eps_index=eps_index)
    d = scores.difficulty.detach().cpu().double().numpy()
    m = score_values(scores, by, seed=seed, eps=eps, reference=reference).numpy()
    eps = scores.eps[0] if eps is None else eps
    q = quadrants if quadrants is not None else scores.quadrants(alpha_d, alpha_m, eps=eps, by=by,
                                                                 reference=reference, seed=seed)
    codes = q.codes.numpy().astype(np.int64)
    if codes.shape != d.shape:
        raise ValueError(f"quadrants: {codes.shape[0]} codes for {d.shape[0]} samples")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    scored = ~np.isnan(d)
    rng = np.random.default_rng(seed)
    m_range = max(float(np.ptp(m[scored])) if scored.any() else 0.0, 1e-3)
    mj = m + rng.normal(0.0, jitter * m_range, size=m.shape) if jitter else m

    fig = plt.figure(figsize=(12, 5.2), constrained_layout=True)
    gs = fig.add_gridspec(2, 2, width_ratios=[1.7, 1])
    ax = fig.add_subplot(gs[:, 0])
    ax_m = fig.add_subplot(gs[0, 1])
    ax_d = fig.add_subplot(gs[1, 1])

    draw = scored.copy()
    if max_points is not None and draw.sum() > max_points:
        keep = rng.choice(np.flatnonzero(draw), size=max_points, replace=False)
        draw[:] = False
        draw[keep] = True
    for code in (0, 1, 2, 3):
        sel = codes == code
        ax.scatter(d[sel & draw], mj[sel & draw], s=10, alpha=0.6, color=QUADRANT_COLORS[code], linewidths=0,
                   label=f"{code} {QUADRANT_NAMES[code]} (n={int(sel.sum())})")
    if highlight is not None:
        h = torch.as_tensor(highlight).reshape(-1).long().numpy()
        if h.size and (h.min() < 0 or h.max() >= len(d)):
            raise ValueError(f"highlight: ids must be in [0, {len(d)})")
        h = h[scored[h]]
        ax.scatter(d[h], mj[h], s=36, facecolors="none", edgecolors="black", linewidths=1.0,
                   label=f"{highlight_label} (n={len(h)})")
    if np.isfinite(q.tau_d):
        for a in (ax, ax_d):
            a.axvline(q.tau_d, color="black", ls="--", lw=1)
        ax.axhline(q.tau_m, color="black", ls="--", lw=1)
        ax_m.axvline(q.tau_m, color="black", ls="--", lw=1)
    ax.set_xlabel(f"difficulty d (mean loss over burn-in epochs 1..{scores.burn_in}, nats)")
    label = f"memorization m (forget rate, eps = {eps:g} nats)" if by == "memorization" else SCORE_LABELS[by]
    ax.set_ylabel(label + (", jittered" if jitter else ""))
    unscored = int((~scored).sum())
    ax.set_title(title or (f"Data map: {int(scored.sum())} scored samples after {scores.epoch} epochs"
                           + (f" ({unscored} unscored)" if unscored else "")
                           + f"\ntau_d = {q.tau_d:.3f}, tau_m = {q.tau_m:.3f}"))
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    ax.grid(alpha=0.25)

    bins_m = min(50, max(5, len(np.unique(m[scored])) * 2)) if scored.any() else 10
    ax_m.hist([m[scored & (codes == c)] for c in (0, 1, 2, 3)], bins=bins_m, stacked=True, log=True,
              color=[QUADRANT_COLORS[c] for c in (0, 1, 2, 3)])
    ax_m.set_xlabel(f"{label} (exact values)")
    ax_m.set_ylabel("samples (log)")
    if by == "memorization":
        ax_m.set_title(f"m = 0 for {int(((m == 0) & scored).sum())} of {int(scored.sum())} samples", fontsize=10)
    else:
        ax_m.set_title(f"{by}: median {np.median(m[scored]):.3f} over {int(scored.sum())} samples"
                       if scored.any() else f"{by}: no scored samples", fontsize=10)
    ax_d.hist([d[scored & (codes == c)] for c in (0, 1, 2, 3)], bins=40, stacked=True,
              color=[QUADRANT_COLORS[c] for c in (0, 1, 2, 3)])
    ax_d.set_xlabel("difficulty d")
    ax_d.set_ylabel("samples")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _pyplot(path):
    """matplotlib.pyplot, on the Agg backend when a file is to be written from an interactive one."""
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _ids(highlight, n: int) -> np.ndarray:
    h = torch.as_tensor(highlight).reshape(-1).long().numpy()
    if h.size and (h.min() < 0 or h.max() >= n):
        raise ValueError(f"highlight: ids must be in [0, {n})")
    return h


def cartography_map(scores, fraction: float = REGION_FRACTION, highlight=None, highlight_label: str = "highlighted",
                    title: Optional[str] = None, path=None, seed: int = 0, max_points: Optional[int] = None):
    """Swayamdipta et al.'s data map of ``scores`` (a state built with ``cartography=True``) and
    returns the figure.

    Left panel: variability (x) vs confidence (y), one dot per observed sample coloured by
    correctness (the epochs in which it was learnt), with the three regions of
    :func:`gdc_ext.cartography.cartography_regions` (each the top ``fraction`` of the samples:
    easy-to-learn the highest confidence, ambiguous the highest variability, hard-to-learn the
    lowest confidence) bounded by dashed lines and named with their counts. Right panels:
    histograms of confidence, variability and correctness, as theirs.

    highlight: optional ids [k] (e.g. the flipped labels of a noisy-label run) drawn as black
    rings on top. max_points: draw at most this many (seeded random) other points.
    Raises ValueError for a state without the cartography group (saying how to enable it).
    """
    conf = scores.confidence.detach().cpu().double().numpy()
    var = scores.variability.detach().cpu().double().numpy()
    corr = scores.correctness.detach().cpu().numpy().astype(np.int64)
    regions = cartography_regions(scores, fraction)
    plt = _pyplot(path)
    seen = ~np.isnan(conf)
    n_seen = int(seen.sum())
    epochs = max(int(scores.epoch), 1)
    fig = plt.figure(figsize=(12, 5.6), constrained_layout=True)
    gs = fig.add_gridspec(3, 2, width_ratios=[1.6, 1])
    ax = fig.add_subplot(gs[:, 0])
    draw = seen.copy()
    rng = np.random.default_rng(seed)
    if max_points is not None and draw.sum() > max_points:
        keep = rng.choice(np.flatnonzero(draw), size=max_points, replace=False)
        draw[:] = False
        draw[keep] = True
    order = np.flatnonzero(draw)
    order = order[np.argsort(corr[order], kind="stable")]  # the most learnt on top
    cmap = plt.get_cmap("RdYlBu", epochs + 1)  # red: never learnt; blue: learnt every epoch
    sc = ax.scatter(var[order], conf[order], c=corr[order], cmap=cmap, vmin=-0.5, vmax=epochs + 0.5, s=10,
                    alpha=0.75, linewidths=0)
    bar = fig.colorbar(sc, ax=ax, pad=0.01, fraction=0.05)
    bar.set_label(f"correctness (epochs learnt, of {scores.epoch})")
    if highlight is not None:
        h = _ids(highlight, len(conf))
        h = h[seen[h]]
        ax.scatter(var[h], conf[h], s=34, facecolors="none", edgecolors="black", linewidths=0.9,
                   label=f"{highlight_label} (n={len(h)})")
    # region bounds: the k-th value of the metric that selects each region, named in the legend
    for name in ("easy-to-learn", "ambiguous", "hard-to-learn"):
        ids = regions[name].numpy()
        if not len(ids):
            continue
        if name == "ambiguous":
            b = float(var[ids].min())
            ax.axvline(b, color=REGION_COLORS[name], ls="--", lw=1.2,
                       label=f"{name}: variability >= {b:.3f} (n={len(ids)})")
        else:
            b = float(conf[ids].min() if name == "easy-to-learn" else conf[ids].max())
            ax.axhline(b, color=REGION_COLORS[name], ls="--", lw=1.2,
                       label=f"{name}: confidence {'>=' if name == 'easy-to-learn' else '<='} {b:.3f} (n={len(ids)})")
    x_hi = float(np.nanmax(var)) if n_seen else 1.0
    ax.set_xlim(-0.01, max(x_hi * 1.05, 0.05))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("variability (std of p(y) over epochs)")
    ax.set_ylabel("confidence (mean p(y) over epochs)")
    ax.set_title(title or (f"Data map: {n_seen} samples after {scores.epoch} epochs; regions: top "
                           f"{fraction:.0%} each"), fontsize=11)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
    ax.grid(alpha=0.25)
    for row, (values, label) in enumerate(((conf, "confidence"), (var, "variability"), (corr, "correctness"))):
        a = fig.add_subplot(gs[row, 1])
        v = values[seen]
        if label == "correctness":
            a.hist(v, bins=np.arange(-0.5, epochs + 1.5, 1.0), color="#5b6fa8")
        else:
            a.hist(v, bins=30, color="#5b6fa8")
        a.set_xlabel(label, fontsize=9)
        a.set_ylabel("samples", fontsize=8)
        a.tick_params(labelsize=8)
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
