"""Figures and RESULTS.md from a results folder written by run.py.

Figures: fig_extraction.png (extraction / leakage vs fraction of pruned weight, the paper's
Figure 1), fig_perplexity.png (perplexity increase vs fraction pruned, Figure 2),
fig_mia_roc.png (membership-inference ROC), fig_theorem42.png (m_i vs accumulated logit-gradient
energy). Every number is a mean over seeds with a 95% t-interval.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, List, Optional

import numpy as np

from gdc_ext.experiments.metrics import mean_ci, roc_curve, spearman

__all__ = ["make_report", "load_rows"]

METHOD_LABEL = {"memorization": "prune top-p by m (paper)", "downweight": "down-weight top-p by m (x0.5)",
                "random": "prune p at random", "loss": "prune top-p by loss", "none": "no intervention",
                "paper": "paper quadrant down-weight"}
COLORS = {"memorization": "C3", "downweight": "C1", "random": "C0", "loss": "C2", "paper": "k", "none": "k"}


def load_rows(out_dir: str) -> List[dict]:
    with open(os.path.join(out_dir, "rows.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _by(rows, **kv):
    return [r for r in rows if all(r.get(k) == v for k, v in kv.items())]


def _seeds(rows, exp):
    return sorted({r["seed"] for r in rows if r["experiment"] == exp})


def _curve(rows, exp, method, metric, fractions, x="fraction"):
    """x, mean, ci for one method, the no-intervention row standing at p = 0."""
    xs, ms, cs = [], [], []
    for p in fractions:
        sel = _by(rows, experiment=exp, method="none") if p == 0 else _by(rows, experiment=exp, method=method, fraction=p)
        if not sel:
            continue
        m, c = mean_ci([r[metric] for r in sel])
        xs.append(float(np.mean([r[x] for r in sel])))
        ms.append(m)
        cs.append(c)
    return np.array(xs), np.array(ms), np.nan_to_num(np.array(cs))


def _paired(rows, exp, method, p, metric, relative=True):
    """Per-seed change of metric vs no intervention (relative: (x - x0) / x0), mean and CI."""
    vals = []
    for s in _seeds(rows, exp):
        base = _by(rows, experiment=exp, method="none", seed=s)
        sel = _by(rows, experiment=exp, method=method, seed=s) if method == "paper" else \
            _by(rows, experiment=exp, method=method, fraction=p, seed=s)
        if not base or not sel:
            continue
        x0, x1 = base[0][metric], sel[0][metric]
        if relative:
            vals.append((x1 - x0) / x0 if x0 else float("nan"))
        else:
            vals.append(x1 - x0)
    return mean_ci(vals)


def _fmt(m, c, pct=False, digits=3):
    if m is None or not np.isfinite(m):
        return "n/a"
    if pct:
        return f"{100 * m:+.1f}%" + (f" ± {100 * c:.1f}" if np.isfinite(c) else "")
    return f"{m:.{digits}f}" + (f" ± {c:.{digits}f}" if np.isfinite(c) else "")


# ------------------------------------------------------------------------------------- figures
def _fig_curves(rows, cfg, out_dir, metrics, fname, x, xlabel, ylabel_fn, relative_ppl=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, (exp, metric, title) in zip(axes[0], metrics):
        for method in cfg["methods"]:
            if relative_ppl:
                xs, ms, cs = [], [], []
                for p in cfg["fractions"]:
                    if p == 0:
                        xs.append(0.0); ms.append(0.0); cs.append(0.0)
                        continue
                    m, c = _paired(rows, exp, method, p, metric)
                    sel = _by(rows, experiment=exp, method=method, fraction=p)
                    if sel:
                        xs.append(float(np.mean([r[x] for r in sel]))); ms.append(100 * m); cs.append(100 * np.nan_to_num(c))
                xs, ms, cs = map(np.array, (xs, ms, cs))
            else:
                xs, ms, cs = _curve(rows, exp, method, metric, cfg["fractions"], x=x)
            if len(xs):
                ax.errorbar(xs, ms, yerr=cs, marker="o", ms=4, capsize=3, color=COLORS[method], label=METHOD_LABEL[method])
        sel = _by(rows, experiment=exp, method="paper")
        if sel:
            if relative_ppl:
                m, c = _paired(rows, exp, "paper", None, metric)
                m, c = 100 * m, 100 * np.nan_to_num(c)
            else:
                m, c = mean_ci([r[metric] for r in sel])
            ax.errorbar([np.mean([r[x] for r in sel])], [m], yerr=[np.nan_to_num(c)], marker="*", ms=11, color="k",
                        ls="none", capsize=3, label=METHOD_LABEL["paper"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel_fn(metric))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fname), dpi=110)
    plt.close(fig)


def _fig_roc(out_dir, exp="leak", fraction=0.1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(glob.glob(os.path.join(out_dir, f"roc_{exp}_seed*.npz")))
    if not files:
        return False
    data = [np.load(f) for f in files]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = {"loss": "loss attack", "zlib": "zlib-ratio attack", "mink": "min-20% prob attack"}
    for ax, att in zip(axes, ("loss", "zlib", "mink")):
        for key, label, color in ((f"none_0", "no intervention", "k"), (f"memorization_{fraction:g}", f"prune {fraction:.0%} by m", "C3"),
                                  (f"downweight_{fraction:g}", f"down-weight {fraction:.0%} by m", "C1"),
                                  (f"random_{fraction:g}", f"prune {fraction:.0%} random", "C0")):
            km, kn = f"{key}_{att}_members", f"{key}_{att}_nonmembers"
            if km not in data[0].files:
                continue
            mem = np.concatenate([d[km] for d in data])  # pooled over seeds
            non = np.concatenate([d[kn] for d in data])
            fpr, tpr = roc_curve(mem, non)
            from gdc_ext.experiments.metrics import auc
            ax.plot(np.maximum(fpr, 1e-4), tpr, color=color, label=f"{label} (AUC {auc(mem, non):.3f})")
        ax.plot([1e-4, 1], [1e-4, 1], ls=":", color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{names[att]} ({exp}, seeds pooled)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig_mia_roc.png"), dpi=110)
    plt.close(fig)
    return True


def _fig_theorem(out_dir, exps) -> Dict[str, tuple]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gdc_ext.experiments.data import GROUPS

    rhos = {}
    fig, axes = plt.subplots(1, len(exps), figsize=(5.2 * len(exps), 4), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        files = sorted(glob.glob(os.path.join(out_dir, f"scores_{exp}_seed*.npz")))
        vals = []
        for i, f in enumerate(files):
            d = np.load(f)
            rho = spearman(d["memorization"], d["grad_energy"])
            vals.append(rho)
            if i == 0:
                rng = np.random.default_rng(0)
                jitter = rng.uniform(-0.004, 0.004, len(d["memorization"]))
                for g, name in GROUPS.items():
                    sel = d["group"] == g
                    if sel.any():
                        ax.scatter(d["grad_energy"][sel], d["memorization"][sel] + jitter[sel], s=6, alpha=0.5,
                                   label=name)
                eps = float(d["eps_grid"][int(d["eps_index"])])
        rhos[exp] = mean_ci(vals)
        ax.set_xscale("log")
        ax.set_xlabel("accumulated logit-gradient energy  sum ||softmax - onehot||^2")
        ax.set_ylabel(f"memorization m_i (eps = {eps:g} nats; jittered)")
        ax.set_title(f"{exp}: Spearman rho = {_fmt(*rhos[exp])} over seeds", fontsize=10)
        ax.legend(fontsize=7, markerscale=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig_theorem42.png"), dpi=110)
    plt.close(fig)
    return rhos


# ------------------------------------------------------------------------------------- RESULTS.md
def _verdict_reduction(m, c, claim, baseline=None, floor=None):
    """m: our mean relative change (negative = reduction); claim: the paper's reduction (0.4 = 40%).
    baseline below floor: nothing to reduce at this scale, so the claim is not tested."""
    if baseline is not None and floor is not None and not baseline > floor:
        return f"**not tested**: the baseline ({baseline:.3f}) is at chance level, nothing to reduce"
    if not np.isfinite(m):
        return "not measurable"
    red = -m
    sig = np.isfinite(c) and (m + c) < 0
    if red >= claim and sig:
        return "**agrees**"
    if sig:
        return "**partly**: a smaller reduction"
    return "**disagrees**: no significant reduction"


def _verdict_bound(m, c, bound):
    if not np.isfinite(m):
        return "not measurable"
    return "**agrees**" if m < bound else "**disagrees**: larger increase"


def make_report(out_dir: str, docs_dir: Optional[str] = None, notes: Optional[str] = None) -> str:
    rows = load_rows(out_dir)
    with open(os.path.join(out_dir, "config.json")) as fh:
        cfg = json.load(fh)
    timing = {}
    if os.path.exists(os.path.join(out_dir, "timing.json")):
        with open(os.path.join(out_dir, "timing.json")) as fh:
            timing = json.load(fh)
    exps = [e["name"] for e in cfg["experiments"] if _by(rows, experiment=e["name"])]
    has = {e: e in exps for e in ("canary", "leak")}
    curves = []
    if has["canary"]:
        curves.append(("canary", "extraction", "LSTM, synthetic corpus: canary extraction"))
    if has["leak"]:
        curves.append(("leak", "leakage", "GPT-2-style, real text: leakage (verbatim recall)"))
    _fig_curves(rows, cfg, out_dir, curves, "fig_extraction.png", "pruned_weight", "fraction of pruned weight",
                lambda m: {"extraction": "canary extraction success", "leakage": "leaked fraction"}[m])
    _fig_curves(rows, cfg, out_dir, [(e, "perplexity", f"{e}: validation perplexity") for e in exps],
                "fig_perplexity.png", "fraction", "fraction pruned (p)", lambda m: "perplexity increase (%)",
                relative_ppl=True)
    roc = _fig_roc(out_dir, "leak" if has["leak"] else exps[0], cfg["roc_fraction"])
    rhos = _fig_theorem(out_dir, exps)

    L = []
    add = L.append
    add("# Reproducing the GenDataCarto experiments with gdc_ext\n")
    add(f"Configuration `{cfg['name']}`; seeds {cfg['seeds']}; every number is the mean over seeds ± the half-width "
        f"of its 95% t-interval (n = {len(cfg['seeds'])} seeds).")
    if timing:
        add(f"Wall time of the run: {timing['wall_seconds'] / 60:.1f} min with {timing['workers']} worker process(es).")
    add("")
    # --- headline
    add("## Headline: the paper's claims beside our measurements\n")
    add("| claim (paper) | paper | ours | verdict |")
    add("|---|---|---|---|")
    if has["canary"]:
        base = mean_ci([r["extraction"] for r in _by(rows, experiment="canary", method="none")])
        for p, claim in ((0.05, 0.6), (0.10, 0.4)):
            sel = _by(rows, experiment="canary", method="memorization", fraction=p)
            if not sel:
                continue
            now = mean_ci([r["extraction"] for r in sel])
            rel = _paired(rows, "canary", "memorization", p, "extraction")
            paper = "100% -> 40% (-60%)" if p == 0.05 else "> 40% reduction"
            add(f"| LSTM canary extraction, prune top {p:.0%} by m | {paper} | {_fmt(*base, digits=2)} -> "
                f"{_fmt(*now, digits=2)} ({_fmt(*rel, pct=True)}) | {_verdict_reduction(rel[0], rel[1], claim)} |")
            ppl = _paired(rows, "canary", "memorization", p, "perplexity")
            add(f"| LSTM perplexity increase at {p:.0%} pruning | < 0.5% | {_fmt(*ppl, pct=True)} | "
                f"{_verdict_bound(ppl[0], ppl[1], 0.005)} |")
    if has["leak"]:
        for method, p, lab in (("paper", None, "paper quadrant down-weight (x0.5, tau_m at 25%)"),
                               ("downweight", 0.10, "down-weight top 10% by m (x0.5)")):
            if not _by(rows, experiment="leak", method=method):
                continue
            lk = _paired(rows, "leak", method, p, "leakage")
            lk0 = mean_ci([r["leakage"] for r in _by(rows, experiment="leak", method="none")])[0]
            add(f"| GPT-2 leakage (verbatim recall of injected validation sequences), {lab} | -30% | "
                f"{lk0:.3f} -> {_fmt(*lk, pct=True)} | {_verdict_reduction(lk[0], lk[1], 0.30, lk0, 0.05)} |")
            au = _paired(rows, "leak", method, p, "mia_loss_auc")
            au0 = mean_ci([r["mia_loss_auc"] for r in _by(rows, experiment="leak", method="none")])[0]
            add(f"| GPT-2 membership-inference AUC (loss attack), {lab} | -15% | {au0:.3f} -> {_fmt(*au, pct=True)} | "
                f"{_verdict_reduction(au[0], au[1], 0.15, au0, 0.55)} |")
            pp = _paired(rows, "leak", method, p, "perplexity")
            add(f"| GPT-2 perplexity increase, {lab} | < 1% | {_fmt(*pp, pct=True)} | {_verdict_bound(pp[0], pp[1], 0.01)} |")
    for e, (m, c) in rhos.items():
        add(f"| Theorem 4.2: m_i tracks the gradient (influence) term, {e} | (a bound, no number) | Spearman "
            f"rho(m_i, gradient energy) = {_fmt(m, c)} | see the figure |")
    add("")
    add("A relative change is computed per seed against the same seed's no-intervention run, then averaged. "
        "*agrees*: the reduction is at least the paper's and its interval excludes 0; *partly*: significant but "
        "smaller; *disagrees*: no significant reduction (or, for perplexity, an increase above the paper's bound).\n")
    # --- equal-budget comparison
    add("## Equal-budget comparison against baselines\n")
    for e in exps:
        metrics = (["extraction", "exposure"] if e == "canary" else []) + ["leakage", "leakage_token_recall",
                                                                          "mia_loss_auc", "mia_zlib_auc",
                                                                          "mia_mink_auc", "mia_loss_tpr@1%",
                                                                          "mia_loss_tpr@0.1%", "perplexity"]
        if e == "leak":
            metrics = ["extraction"] + metrics
        desc = _by(rows, experiment=e)[0]["corpus"]
        eps = sorted({r["eps"] for r in _by(rows, experiment=e)})
        add(f"### {e}: {desc}\n")
        add(f"Scoring threshold eps = {', '.join(f'{x:g}' for x in eps)} nats (the tracked threshold with the most "
            f"forget events, per seed).\n")
        add("| method | p | pruned weight | canaries hit | " + " | ".join(metrics) + " |")
        add("|---|---|---|---|" + "---|" * len(metrics))
        conds = [("none", 0.0)] + [(mth, p) for mth in cfg["methods"] for p in cfg["fractions"] if p > 0] + [("paper", None)]
        for mth, p in conds:
            sel = _by(rows, experiment=e, method=mth) if mth in ("none", "paper") else _by(rows, experiment=e, method=mth, fraction=p)
            if not sel:
                continue
            pw = mean_ci([r["pruned_weight"] for r in sel])[0]
            hit = mean_ci([r["canaries_hit"] for r in sel])[0]
            pp = mean_ci([r["fraction"] for r in sel])[0]
            cells = [_fmt(*mean_ci([r.get(k, float("nan")) for r in sel]), digits=2 if k == "perplexity" else 3)
                     for k in metrics]
            add(f"| {METHOD_LABEL[mth]} | {pp:.0%} | {pw:.3f} | {hit:.0%} | " + " | ".join(cells) + " |")
        add("")
        first = _by(rows, experiment=e)[0]
        reps = sorted({int(k.split("_r")[1]) for k in first if k.startswith("extraction_r")}) if e == "canary" else []
        if reps:
            add("Extraction by number of insertions r (no intervention -> prune 10% by m -> prune 10% at random):\n")
            add("| r | none | m, 10% | random, 10% |")
            add("|---|---|---|---|")
            for r_ in reps:
                k = f"extraction_r{r_}"
                cells = [_fmt(*mean_ci([r[k] for r in sel]), digits=2) for sel in (
                    _by(rows, experiment=e, method="none"), _by(rows, experiment=e, method="memorization", fraction=0.1),
                    _by(rows, experiment=e, method="random", fraction=0.1))]
                add(f"| {r_} | " + " | ".join(cells) + " |")
            add("")
    add("## Figures\n")
    add("- `fig_extraction.png`: extraction success (LSTM) and leakage (GPT-2-style) vs fraction of pruned weight "
        "(the paper's Figure 1; down-weighting by 0.5 counts half a sample's weight).")
    add("- `fig_perplexity.png`: validation perplexity increase vs fraction pruned (the paper's Figure 2).")
    if roc:
        add("- `fig_mia_roc.png`: membership-inference ROC curves (log FPR), seeds pooled.")
    add("- `fig_theorem42.png`: m_i against the accumulated logit-gradient energy, with Spearman's rho.\n")
    add("![extraction](fig_extraction.png)\n\n![perplexity](fig_perplexity.png)\n")
    if roc:
        add("![roc](fig_mia_roc.png)\n")
    add("![theorem](fig_theorem42.png)\n")
    notes_path = notes or (os.path.join(docs_dir, "results_notes.md") if docs_dir else None)
    if notes_path and os.path.exists(notes_path):
        with open(notes_path) as fh:
            add(fh.read())
    text = "\n".join(L) + "\n"
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as fh:
        fh.write(text)
    if docs_dir:
        os.makedirs(docs_dir, exist_ok=True)
        shutil.copy(os.path.join(out_dir, "RESULTS.md"), os.path.join(docs_dir, "RESULTS.md"))
        for f in glob.glob(os.path.join(out_dir, "fig_*.png")):
            shutil.copy(f, docs_dir)
    return text


if __name__ == "__main__":
    import sys

    make_report(sys.argv[1], docs_dir=sys.argv[2] if len(sys.argv) > 2 else None)
