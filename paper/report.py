"""Figures and RESULTS.md from a results folder written by run.py.

Figures: fig_extraction.png (extraction / leakage vs fraction of pruned weight, the paper's
Figure 1), fig_perplexity.png (perplexity increase vs fraction pruned, Figure 2),
fig_mia_roc.png (membership-inference ROC), fig_theorem42.png (m_i vs accumulated logit-gradient
energy), fig_detection_roc.png (detection ROC of every score; report_detection.py),
fig_eps_sensitivity.png. Every number is a mean over seeds with a 95% t-interval, and every
sentence that states one is generated here from the rows; the paper's figures come from
PAPER_CLAIMS. docs/results_notes.md adds number-free prose only.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, List, Optional

import numpy as np

from paper.metrics import mean_ci, roc_curve, spearman
from paper.report_detection import detection_section, detection_verdict, intervention_section, intervention_verdict

__all__ = ["make_report", "load_rows", "PAPER_CLAIMS", "detection_verdict", "intervention_verdict"]

# The paper's reported figures (Patel & Shanbhag 2025; docs/method.md), in one place: every
# citation of the paper in RESULTS.md reads from here.
PAPER_CLAIMS = {
    "lstm_extraction": {0.05: {"text": "100% -> 40% (-60%)", "reduction": 0.60},
                        0.10: {"text": "> 40% reduction", "reduction": 0.40}},
    "lstm_perplexity": {"text": "< 0.5%", "bound": 0.005},
    "gpt2_leakage": {"text": "-30%", "reduction": 0.30},
    "gpt2_mia_auc": {"text": "-15%", "reduction": 0.15},
    "gpt2_perplexity": {"text": "< 1%", "bound": 0.01},
    "gpt2_setting": {"eps": 4.7055, "tau_m": 0.25, "alpha": 0.5, "epochs": 3},
}

METHOD_LABEL = {"memorization": "prune top-p by m (paper)", "downweight": "down-weight top-p by m (x0.5)",
                "random": "prune p at random", "loss": "prune top-p by burn-in loss d", "none": "no intervention",
                "paper": "paper quadrant down-weight", "gain": "prune top-p by gain d - last",
                "excess": "prune top-p by excess (unigram ref - last)", "excess_zlib": "prune top-p by excess (zlib)",
                "last": "prune top-p by lowest last loss", "duplicates": "prune top-p by duplicate count",
                "goldfish_all": "goldfish loss on all samples", "goldfish_flagged": "goldfish loss on the flagged top-p"}
COLORS = {"memorization": "C3", "downweight": "C1", "random": "C0", "loss": "C2", "paper": "k", "none": "k",
          "gain": "C4", "excess": "C5", "excess_zlib": "C8", "last": "C6", "duplicates": "C7", "goldfish_all": "C9",
          "goldfish_flagged": "C1"}
SCORE_LABEL = {"m": "m_i (fixed-rule eps; the paper)", "d": "difficulty d_i", "gain": "gain d_i - last_i",
               "-last": "-last_i (loss attack)", "excess_unigram": "excess, unigram reference",
               "excess_zlib": "excess, zlib reference", "ref_unigram": "unigram reference alone (data only)",
               "duplicates": "duplicate count (data only)", "random": "random"}
DATA_ONLY = ("ref_unigram", "duplicates")


def load_rows(out_dir: str) -> List[dict]:
    with open(os.path.join(out_dir, "rows.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _main_rows(rows: List[dict]) -> List[dict]:
    """Intervention rows of the whole-run protocol (the paper's Algorithm 1): the sections that
    predate the single-job protocol read these."""
    return [r for r in rows if r["method"] != "detect" and r.get("protocol", "whole-run") == "whole-run"]


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
                        xs.append(0.0)
                        ms.append(0.0)
                        cs.append(0.0)
                        continue
                    m, c = _paired(rows, exp, method, p, metric)
                    sel = _by(rows, experiment=exp, method=method, fraction=p)
                    if sel:
                        xs.append(float(np.mean([r[x] for r in sel])))
                        ms.append(100 * m)
                        cs.append(100 * np.nan_to_num(c))
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
        for key, label, color in (("none_0", "no intervention", "k"), (f"memorization_{fraction:g}", f"prune {fraction:.0%} by m", "C3"),
                                  (f"downweight_{fraction:g}", f"down-weight {fraction:.0%} by m", "C1"),
                                  (f"gain_{fraction:g}", f"prune {fraction:.0%} by gain", "C4"),
                                  (f"random_{fraction:g}", f"prune {fraction:.0%} random", "C0")):
            km, kn = f"{key}_{att}_members", f"{key}_{att}_nonmembers"
            if km not in data[0].files:
                continue
            mem = np.concatenate([d[km] for d in data])  # pooled over seeds
            non = np.concatenate([d[kn] for d in data])
            fpr, tpr = roc_curve(mem, non)
            from paper.metrics import auc
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

    from paper.data import GROUPS

    rhos = {}
    fig, axes = plt.subplots(1, len(exps), figsize=(5.2 * len(exps), 4), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        files = sorted(f for f in glob.glob(os.path.join(out_dir, f"scores_{exp}_seed*.npz")) if "_single" not in f)
        if not files:
            continue
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


def _sweep_paired(rows, exp, p, eps, metric="extraction"):
    """Per-seed relative change of metric after pruning top p by m at eps vs the seed's no-intervention run."""
    vals = []
    for s in _seeds(rows, exp):
        base = _by(rows, experiment=exp, method="none", seed=s)
        sel = _by(rows, experiment=exp, method="eps_sweep", fraction=p, eps=eps, seed=s)
        if base and sel:
            x0, x1 = base[0][metric], sel[0][metric]
            vals.append((x1 - x0) / x0 if x0 else float("nan"))
    return mean_ci(vals)


def _fig_eps(rows, out_dir, exp, fractions, eps_grid) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lo, hi = min(eps_grid), max(eps_grid)
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    base = [r["extraction"] for r in _by(rows, experiment=exp, method="none")]
    if base:
        m, c = mean_ci(base)
        c = float(np.nan_to_num(c))
        ax.axhspan(m - c, m + c, color="grey", alpha=0.25, lw=0)
        ax.axhline(m, color="k", lw=1.2, label=f"no intervention ({m:.2f})")
    for i, p in enumerate(fractions):
        col = ("C1", "C3", "C4", "C2")[i % 4] if len(fractions) > 1 else "C3"
        rnd = [r["extraction"] for r in _by(rows, experiment=exp, method="random", fraction=p)]
        if rnd:
            m, c = mean_ci(rnd)
            c = float(np.nan_to_num(c))
            ax.axhspan(m - c, m + c, color=col, alpha=0.10, lw=0)
            ax.axhline(m, color=col, lw=1, ls="--", label=f"prune {p:.0%} at random ({m:.2f})")
        los = [r["extraction"] for r in _by(rows, experiment=exp, method="loss", fraction=p)]
        if los:
            ax.axhline(float(np.mean(los)), color=col, lw=1, ls=":", label=f"prune top {p:.0%} by loss ({np.mean(los):.2f})")
        xs, ms, cs = [], [], []
        for eps in eps_grid:
            sel = _by(rows, experiment=exp, method="eps_sweep", fraction=p, eps=eps)
            if sel:
                m, c = mean_ci([r["extraction"] for r in sel])
                xs.append(eps)
                ms.append(m)
                cs.append(float(np.nan_to_num(c)))
        if xs:
            ax.errorbar(xs, ms, yerr=cs, marker="o", ms=5, capsize=3, color=col, label=f"prune top {p:.0%} by m at eps")
    fixed = sorted({r["eps_fixed"] for r in _by(rows, experiment=exp, method="eps_sweep")})
    for j, e in enumerate(fixed):
        ax.axvline(e, color="k", ls=":", lw=1, label="eps picked by the fixed rule" if j == 0 else None)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("forget threshold eps (nats)")
    ax.set_ylabel("canary extraction success")
    ax.set_title(f"{exp}: extraction after pruning by m_i at each eps (mean ± 95% CI, {len(_seeds(rows, exp))} seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_ylim(-0.25, 1.05)
    ax.legend(fontsize=6.5, loc="lower center", ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig_eps_sensitivity.png"), dpi=110)
    plt.close(fig)
    return True


def _eps_section(rows, cfg, out_dir) -> List[str]:
    """RESULTS.md section on the forget threshold, from the method == "eps_sweep" rows."""
    L: List[str] = []
    add = L.append
    exps = [e for e in cfg["experiments"] if e.get("eps_sweep") and _by(rows, experiment=e["name"], method="eps_sweep")]
    if not exps:
        return L
    add("## Sensitivity to the forget threshold eps\n")
    for e in exps:
        exp, fractions, grid = e["name"], list(e["eps_sweep"]), list(e["eps_grid"])
        sweep = _by(rows, experiment=exp, method="eps_sweep")
        n = len(_seeds(rows, exp))
        fixed_by_seed = {r["seed"]: r["eps_fixed"] for r in sweep}
        fixed = sorted(set(fixed_by_seed.values()))
        add(f"Experiment `{exp}`. All thresholds of the grid ({', '.join(f'{x:g}' for x in grid)} nats) are tracked "
            "in the same record run, so every seed's single record run scores every eps; for each eps and each "
            "fraction p we prune the top p by m_i at that eps and continue from the same burn-in checkpoint with "
            "the same data-order seed as the other interventions (a prune set identical to one already trained "
            "is not trained again). The fixed rule of the main tables (the eps with the most forget events) picked "
            f"eps = {', '.join(f'{x:g}' for x in fixed)} ("
            + ", ".join(f"seed {s}: {v:g}" for s, v in sorted(fixed_by_seed.items())) + ").\n")
        base = mean_ci([r["extraction"] for r in _by(rows, experiment=exp, method="none")])
        for p in fractions:
            rnd_rows = _by(rows, experiment=exp, method="random", fraction=p)
            rnd = mean_ci([r["extraction"] for r in rnd_rows]) if rnd_rows else (float("nan"), float("nan"))
            rrel = _paired(rows, exp, "random", p, "extraction") if rnd_rows else (float("nan"), float("nan"))
            los_rows = _by(rows, experiment=exp, method="loss", fraction=p)
            los = mean_ci([r["extraction"] for r in los_rows]) if los_rows else (float("nan"), float("nan"))
            lrel = _paired(rows, exp, "loss", p, "extraction") if los_rows else (float("nan"), float("nan"))
            add(f"Prune the top {p:.0%} by m_i at each eps (n = {n} seeds; mean ± 95% interval). Reference: no "
                f"intervention {_fmt(*base, digits=2)}; prune {p:.0%} at random {_fmt(*rnd, digits=2)} "
                f"({_fmt(*rrel, pct=True)}); prune the top {p:.0%} by loss (burn-in difficulty) "
                f"{_fmt(*los, digits=2)} ({_fmt(*lrel, pct=True)}).\n")
            add("| eps (nats) | forget events | samples with m > 0 | canary copies in the prune set | canaries with a "
                "copy pruned | canaries with every copy pruned | share of the prune set that is canary copies | extraction after pruning | "
                "change vs no intervention |")
            add("|---|---|---|---|---|---|---|---|---|")
            best = None
            thin = []
            for eps in grid:
                sel = _by(rows, experiment=exp, method="eps_sweep", fraction=p, eps=eps)
                if not sel:
                    continue
                ext = mean_ci([r["extraction"] for r in sel])
                rel = _sweep_paired(rows, exp, p, eps)
                if best is None or (np.isfinite(rel[0]) and rel[0] < best[1][0]):
                    best = (eps, rel, ext)
                mark = " (fixed rule" + ("" if all(r["is_fixed_eps"] for r in sel) else
                                         f", {sum(r['is_fixed_eps'] for r in sel)} of {len(sel)} seeds") + ")" \
                    if any(r["is_fixed_eps"] for r in sel) else ""
                fe = mean_ci([r["forget_events"] for r in sel])[0]
                mp = mean_ci([r["frac_m_positive"] for r in sel])[0]
                if mp < p:
                    thin.append((eps, mp))
                cells = [_fmt(*mean_ci([r[k] for r in sel]), pct=False, digits=2) for k in
                         ("canary_copies_hit", "canaries_any_hit", "canaries_all_hit", "prune_set_canary_share")]
                add(f"| {eps:g}{mark} | {fe:.0f} | {mp:.0%} | " + " | ".join(cells) +
                    f" | {_fmt(*ext, digits=2)} | {_fmt(*rel, pct=True)} |")
            add("")
            if thin:
                add(f"At eps = {', '.join(f'{e_:g}' for e_, _ in thin)} fewer than {p:.0%} of the samples have m_i > 0 "
                    "(the forget events column is the total over all samples), so the rest of the prune set is filled "
                    "by prune()'s tie-break, higher burn-in difficulty: where no sample has m_i > 0 the prune set is "
                    f"exactly the prune-by-loss set, and its extraction is that of pruning by loss, not evidence for m_i.\n")
            fx = [r for r in _by(rows, experiment=exp, method="eps_sweep", fraction=p) if r["is_fixed_eps"]]
            if fx:
                vals = []
                for r in fx:
                    b = _by(rows, experiment=exp, method="none", seed=r["seed"])
                    if b and b[0]["extraction"]:
                        vals.append((r["extraction"] - b[0]["extraction"]) / b[0]["extraction"])
                add(f"At the eps picked by the fixed rule (per seed): extraction "
                    f"{_fmt(*mean_ci([r['extraction'] for r in fx]), digits=2)} ({_fmt(*mean_ci(vals), pct=True)} vs "
                    f"no intervention); canary copies in the prune set "
                    f"{_fmt(*mean_ci([r['canary_copies_hit'] for r in fx]), digits=2)}.\n")
            if best is not None:
                eps_b, rel_b, ext_b = best
                claim = PAPER_CLAIMS["lstm_extraction"].get(round(p, 4), {}).get("reduction")
                sig = np.isfinite(rel_b[1]) and rel_b[0] + rel_b[1] < 0
                ties = [e_ for e_ in grid if e_ != eps_b and _sweep_paired(rows, exp, p, e_)[0] == rel_b[0]]
                tie_txt = f" (tied with eps = {', '.join(f'{e_:g}' for e_ in ties)})" if ties else ""
                txt = (f"Best eps at p = {p:.0%}: {eps_b:g} nats{tie_txt}, extraction {_fmt(*ext_b, digits=2)} "
                       f"({_fmt(*rel_b, pct=True)} vs no intervention; the interval "
                       f"{'excludes' if sig else 'includes'} 0).")
                if claim is not None:
                    reached = (-rel_b[0] >= claim) and sig
                    txt += (f" The paper's claim at {p:.0%} ({PAPER_CLAIMS['lstm_extraction'][round(p, 4)]['text']}) is "
                            f"{'reached' if reached else 'not reached'} at this eps"
                            + ("" if reached else (" (the mean reduction is large enough but not significant with "
                                                   f"{n} seeds)" if -rel_b[0] >= claim else "")) + ".")
                add(txt + "\n")
        add("**Caveat: this is a post-hoc choice.** Picking the eps that works best after seeing extraction is "
            "optimistic: it uses the outcome (on the same seeds) to choose the threshold, which the method cannot "
            f"do in practice, and with {len(grid)} thresholds x {n} seeds the best one benefits from selection noise. The "
            "honest numbers for a fixed procedure are those at the eps picked by the fixed rule (marked in the "
            "table), or at an eps chosen from training-time quantities only (e.g. between the loss of learnt "
            "ordinary sequences and that of an unmemorized canary).\n")
        add("![eps sensitivity](fig_eps_sensitivity.png)\n")
        _fig_eps(rows, out_dir, exp, fractions, grid)
    return L


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


def _setting_section(cfg: dict, rows: List[dict]) -> List[str]:
    """Our setting beside the paper's, generated from the run's config."""
    L: List[str] = ["## Our setting beside the paper's\n", "| | paper | here |", "|---|---|---|"]
    st = PAPER_CLAIMS["gpt2_setting"]
    for e in cfg["experiments"]:
        if not _by(rows, experiment=e["name"]) or "corpus_args" not in e:
            continue
        ca = e["corpus_args"]
        desc = _by(rows, experiment=e["name"])[0]["corpus"]
        dims = ", ".join(f"{k}={v}" for k, v in e["dims"].items())
        paper_model = "a small LSTM language model (size not given)" if e["name"] == "canary" else "GPT-2 small (124M)"
        paper_data = ("a synthetic corpus with unique canaries" if e["name"] == "canary" else
                      f"WikiText-103, {st['epochs']} epochs, two canaries")
        planted = (f"canaries inserted r = {', '.join(map(str, ca.get('canary_reps', ())))} times "
                   f"({ca.get('canaries_per_rep', 1)} per r); held-out sequences injected r = "
                   f"{', '.join(map(str, ca.get('inject_reps', ())))} times ({ca.get('injected_per_rep')} per r)")
        L.append(f"| {e['name']}: model | {paper_model} | {e['model']} ({dims}), trained from scratch |")
        L.append(f"| {e['name']}: data | {paper_data} | {desc}; {planted} |")
        L.append(f"| {e['name']}: epochs T, burn-in T_e, single-job label epoch k | not given | T = {e['epochs']}, "
                 f"T_e = {e['burn_in']}, k = {e.get('label_epoch') or e['burn_in']} |")
        L.append(f"| {e['name']}: eps | {st['eps'] if e['name'] == 'leak' else 'not given'} | grid "
                 f"{', '.join(f'{x:g}' for x in e['eps_grid'])} tracked at once; m_i scores at the grid value with "
                 "the most forget events (fixed rule) |")
    L.append(f"| seeds | not given | {len(cfg['seeds'])} (model init, data order, canary secrets and splits) |")
    L.append("")
    return L


def _findings(rows: List[dict], cfg: dict, rhos: Dict[str, tuple]) -> List[str]:
    """The closing summary, every number read from the rows."""
    from paper.report_detection import PRIMARY, _best_model_score, detection_summary, detection_verdict, \
        intervention_table

    L = ["## Findings (generated from the numbers above)\n"]
    add = L.append
    for exp in sorted({r["experiment"] for r in rows}, key=lambda e: e != "canary"):
        for target in sorted({r["target"] for r in _by(rows, method="detect", experiment=exp)}):
            summ = detection_summary(rows, exp, target, "whole-run")
            best = _best_model_score(summ)
            if best is None:
                continue
            m = summ.get("m", {}).get("auroc", (float("nan"), float("nan")))
            dup = summ.get("duplicates", {}).get("auroc", (float("nan"), float("nan")))
            add(f"- **Detection, {exp}, {target} copies:** best model-based score {best} (AUROC "
                f"{_fmt(*summ[best]['auroc'])}); the paper's m_i {_fmt(*m)} ({detection_verdict(*m).replace('*', '')}); "
                f"duplicate count (no model) {_fmt(*dup)}.")
        prim = PRIMARY.get(exp, "extraction")
        for protocol in ("whole-run", "single-job"):
            tab = [t for t in intervention_table(rows, exp, protocol) if t["method"] != "none"]
            if not tab:
                continue
            if tab[0]["verdict"].startswith("not tested"):
                add(f"- **Interventions, {exp}, {protocol}:** {tab[0]['verdict']}.")
                continue
            best = min(tab, key=lambda t: t["rel"][0] if np.isfinite(t["rel"][0]) else np.inf)
            mem = [t for t in tab if t["method"] == "memorization"]
            cuts = [t for t in tab if t["verdict"].startswith("**cuts")]
            txt = (f"- **Interventions, {exp}, {protocol}:** largest {prim} change {_fmt(*best['rel'], pct=True)} "
                   f"({METHOD_LABEL.get(best['method'], best['method'])}, "
                   f"{'all' if best['method'] == 'goldfish_all' else format(best['fraction'], '.0%')}; perplexity "
                   f"{_fmt(*best['ppl'], pct=True)}).")
            if mem:
                txt += " The paper's prune-by-m_i: " + "; ".join(
                    f"{t['fraction']:.0%}: {_fmt(*t['rel'], pct=True)} ({t['verdict'].replace('*', '')})" for t in mem) + "."
            txt += (" Conditions that cut it significantly: " + ", ".join(
                f"{t['method']} {'all' if t['method'] == 'goldfish_all' else format(t['fraction'], '.0%')}"
                for t in cuts) + "." if cuts else " No condition cuts it significantly.")
            add(txt)
    for e, (m, c) in rhos.items():
        add(f"- **Theorem 4.2, {e}:** Spearman rho(m_i, accumulated logit-gradient energy) = {_fmt(m, c)}.")
    add("")
    return L


def make_report(out_dir: str, docs_dir: Optional[str] = None, notes: Optional[str] = None) -> str:
    from paper.report_counterfactual import JSON_NAME, write_counterfactual

    all_rows = load_rows(out_dir)
    # the counterfactual family has its own section (paper/report_counterfactual.py), at the end;
    # a run of that family alone rewrites only that section of docs_dir/RESULTS.md
    cf_rows = [r for r in all_rows if r.get("experiment") == "counterfactual"]
    all_rows = [r for r in all_rows if r.get("experiment") != "counterfactual"]
    if not all_rows:
        return write_counterfactual(out_dir, cf_rows, docs_dir)
    rows = _main_rows(all_rows)
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
    L.extend(_setting_section(cfg, rows))
    notes_path = notes or (os.path.join(docs_dir, "results_notes.md") if docs_dir else None)
    if notes_path and os.path.exists(notes_path):
        with open(notes_path) as fh:  # number-free prose only: every number in RESULTS.md is generated
            add(fh.read().rstrip() + "\n")
    # --- headline
    add("## Headline: the paper's claims beside our measurements\n")
    add("| claim (paper) | paper | ours | verdict |")
    add("|---|---|---|---|")
    if has["canary"]:
        base = mean_ci([r["extraction"] for r in _by(rows, experiment="canary", method="none")])
        for p, claim in sorted(PAPER_CLAIMS["lstm_extraction"].items()):
            sel = _by(rows, experiment="canary", method="memorization", fraction=p)
            if not sel:
                continue
            now = mean_ci([r["extraction"] for r in sel])
            rel = _paired(rows, "canary", "memorization", p, "extraction")
            add(f"| LSTM canary extraction, prune top {p:.0%} by m | {claim['text']} | {_fmt(*base, digits=2)} -> "
                f"{_fmt(*now, digits=2)} ({_fmt(*rel, pct=True)}) | "
                f"{_verdict_reduction(rel[0], rel[1], claim['reduction'])} |")
            ppl = _paired(rows, "canary", "memorization", p, "perplexity")
            bound = PAPER_CLAIMS["lstm_perplexity"]
            add(f"| LSTM perplexity increase at {p:.0%} pruning | {bound['text']} | {_fmt(*ppl, pct=True)} | "
                f"{_verdict_bound(ppl[0], ppl[1], bound['bound'])} |")
    if has["leak"]:
        st = PAPER_CLAIMS["gpt2_setting"]
        for method, p, lab in (("paper", None, f"paper quadrant down-weight (x{st['alpha']:g}, tau_m at "
                                                f"{st['tau_m']:.0%})"),
                               ("downweight", 0.10, "down-weight top 10% by m (x0.5)")):
            if not _by(rows, experiment="leak", method=method):
                continue
            lk = _paired(rows, "leak", method, p, "leakage")
            lk0 = mean_ci([r["leakage"] for r in _by(rows, experiment="leak", method="none")])[0]
            c = PAPER_CLAIMS["gpt2_leakage"]
            add(f"| Real-text leakage (verbatim recall of injected validation sequences; paper: GPT-2), {lab} | {c['text']} | "
                f"{lk0:.3f} -> {_fmt(*lk, pct=True)} | {_verdict_reduction(lk[0], lk[1], c['reduction'], lk0, 0.05)} |")
            au = _paired(rows, "leak", method, p, "mia_loss_auc")
            au0 = mean_ci([r["mia_loss_auc"] for r in _by(rows, experiment="leak", method="none")])[0]
            c = PAPER_CLAIMS["gpt2_mia_auc"]
            add(f"| Real-text membership-inference AUC (loss attack; paper: GPT-2), {lab} | {c['text']} | {au0:.3f} -> "
                f"{_fmt(*au, pct=True)} | {_verdict_reduction(au[0], au[1], c['reduction'], au0, 0.55)} |")
            pp = _paired(rows, "leak", method, p, "perplexity")
            c = PAPER_CLAIMS["gpt2_perplexity"]
            add(f"| Real-text perplexity increase (paper: GPT-2), {lab} | {c['text']} | {_fmt(*pp, pct=True)} | "
                f"{_verdict_bound(pp[0], pp[1], c['bound'])} |")
    for e, (m, c) in rhos.items():
        add(f"| Theorem 4.2: m_i tracks the gradient (influence) term, {e} | (a bound, no number) | Spearman "
            f"rho(m_i, gradient energy) = {_fmt(m, c)} | see the figure |")
    add("")
    add("A relative change is computed per seed against the same seed's no-intervention run, then averaged. "
        "*agrees*: the reduction is at least the paper's and its interval excludes 0; *partly*: significant but "
        "smaller; *disagrees*: no significant reduction (or, for perplexity, an increase above the paper's bound).\n")
    L.extend(detection_section(all_rows, cfg, out_dir))
    L.extend(intervention_section(all_rows, cfg))
    # --- equal-budget comparison, every metric
    add("## Every metric, whole-run protocol\n")
    for e in exps:
        metrics = (["extraction", "exposure"] if e == "canary" else []) + ["leakage", "leakage_token_recall",
                                                                          "mia_loss_auc", "mia_zlib_auc",
                                                                          "mia_mink_auc", "mia_loss_tpr@1%",
                                                                          "mia_loss_tpr@0.1%", "perplexity"]
        if e == "leak":
            metrics = ["extraction"] + metrics
        desc = _by(rows, experiment=e)[0]["corpus"]
        eps = sorted({r["eps"] for r in _by(rows, experiment=e) if r["method"] != "eps_sweep"})
        add(f"### {e}: {desc}\n")
        add(f"Scoring threshold eps = {', '.join(f'{x:g}' for x in eps)} nats (the tracked threshold with the most "
            f"forget events, per seed).\n")
        add("| method | p | pruned weight | canaries hit | " + " | ".join(metrics) + " |")
        add("|---|---|---|---|" + "---|" * len(metrics))
        conds = list(dict.fromkeys((r["method"], r["fraction"]) for r in _by(rows, experiment=e)
                                   if r["method"] not in ("eps_sweep", "paper"))) + [("paper", None)]
        for mth, p in conds:
            sel = _by(rows, experiment=e, method=mth) if mth in ("none", "paper") else _by(rows, experiment=e, method=mth, fraction=p)
            if not sel:
                continue
            pw = mean_ci([r["pruned_weight"] for r in sel])[0]
            hit = mean_ci([r["canaries_hit"] for r in sel])[0]
            pp = mean_ci([r["fraction"] for r in sel])[0]
            cells = [_fmt(*mean_ci([r.get(k, float("nan")) for r in sel]), digits=2 if k == "perplexity" else 3)
                     for k in metrics]
            add(f"| {METHOD_LABEL.get(mth, mth)} | {pp:.0%} | {pw:.3f} | {hit:.0%} | " + " | ".join(cells) + " |")
        add("")
        first = _by(rows, experiment=e)[0]
        reps = sorted({int(k.split("_r")[1]) for k in first if k.startswith("extraction_r")}) if e == "canary" else []
        if reps:
            pmax = max(p for p in cfg["fractions"])
            cols = [("none", 0.0)] + [(m_, pmax) for m_ in ("memorization", "gain", "excess", "duplicates", "random")
                                      if _by(rows, experiment=e, method=m_, fraction=pmax)] + \
                [("goldfish_all", 1.0)] * bool(_by(rows, experiment=e, method="goldfish_all"))
            add(f"Extraction by number of insertions r (whole-run protocol; pruning at p = {pmax:.0%}):\n")
            add("| r | " + " | ".join("none" if m_ == "none" else "goldfish, all" if m_ == "goldfish_all" else m_
                                      for m_, _ in cols) + " |")
            add("|---|" + "---|" * len(cols))
            for r_ in reps:
                k = f"extraction_r{r_}"
                cells = [_fmt(*mean_ci([r[k] for r in _by(rows, experiment=e, method=m_, fraction=p_)]), digits=2)
                         for m_, p_ in cols]
                add(f"| {r_} | " + " | ".join(cells) + " |")
            add("")
    L.extend(_eps_section(rows, cfg, out_dir))
    L.extend(_findings(all_rows, cfg, rhos))
    add("## Figures\n")
    if os.path.exists(os.path.join(out_dir, "fig_detection_roc.png")):
        add("- `fig_detection_roc.png`: detection ROC of every score against each target (section Detection).")
    add("- `fig_extraction.png`: extraction success (LSTM) and leakage (GPT-2-style) vs fraction of pruned weight "
        "(the paper's Figure 1; down-weighting by 0.5 counts half a sample's weight).")
    add("- `fig_perplexity.png`: validation perplexity increase vs fraction pruned (the paper's Figure 2).")
    if roc:
        add("- `fig_mia_roc.png`: membership-inference ROC curves (log FPR), seeds pooled.")
    add("- `fig_theorem42.png`: m_i against the accumulated logit-gradient energy, with Spearman's rho.")
    if os.path.exists(os.path.join(out_dir, "fig_eps_sensitivity.png")) and _by(rows, method="eps_sweep"):
        add("- `fig_eps_sensitivity.png`: canary extraction after pruning by m_i at each tracked eps (section above).")
    add("")
    add("![extraction](fig_extraction.png)\n\n![perplexity](fig_perplexity.png)\n")
    if roc:
        add("![roc](fig_mia_roc.png)\n")
    add("![theorem](fig_theorem42.png)\n")
    if cf_rows:
        L.append(write_counterfactual(out_dir, cf_rows))
    text = "\n".join(L) + "\n"
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as fh:
        fh.write(text)
    if docs_dir:
        os.makedirs(docs_dir, exist_ok=True)
        shutil.copy(os.path.join(out_dir, "RESULTS.md"), os.path.join(docs_dir, "RESULTS.md"))
        for f in glob.glob(os.path.join(out_dir, "fig_*.png")) + glob.glob(os.path.join(out_dir, JSON_NAME)):
            shutil.copy(f, docs_dir)
    return text


if __name__ == "__main__":
    import sys

    make_report(sys.argv[1], docs_dir=sys.argv[2] if len(sys.argv) > 2 else None)
