"""Seeing the map: difficulty vs a memorization score (the paper's m_i, or the learning gain,
the excess over a reference, ...) coloured by quadrant (the analogue of allenai/cartography's
data map), and histograms (log counts: m_i has many ties at 0).

matplotlib is imported inside the functions, so ``import gdc_ext`` does not load it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from gdc_ext.cartography import QUADRANT_NAMES, SCORE_LABELS, Quadrants, resolve_eps, score_values

__all__ = ["QUADRANT_COLORS", "data_map"]

QUADRANT_COLORS = {0: "#4c9be8", 1: "#f2a541", 2: "#d62728", 3: "#7f4fbf", -1: "#9e9e9e"}


def data_map(scores, quadrants: Optional[Quadrants] = None, alpha_d: float = 0.75, alpha_m: float = 0.75,
             eps_index: Optional[int] = None, jitter: float = 0.01, highlight=None,
             highlight_label: str = "highlighted", title: Optional[str] = None, path=None, seed: int = 0,
             max_points: Optional[int] = None, *, eps: Optional[float] = None, by: str = "memorization",
             reference=None):
    """Draws the data map of ``scores`` (a :class:`~gdc_ext.Scores`) and returns the figure.

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
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
