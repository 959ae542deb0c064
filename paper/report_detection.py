"""RESULTS.md sections on detection and interventions at equal budget, written from the numbers.

Detection: per experiment, target (canary copies, injected copies) and protocol, AUROC and
recall at p of every score, mean over seeds with a 95% t-interval, and a verdict by rule.
Interventions: per experiment and protocol, every condition's effect on extraction/leakage,
exposure, membership inference and perplexity, paired per seed against no intervention.
Every sentence that states a number is generated here; nothing is pasted from an earlier run.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from paper.metrics import mean_ci, roc_curve

__all__ = ["detection_verdict", "intervention_verdict", "detection_section", "intervention_section",
           "detection_summary", "fig_detection_roc", "PROTOCOL_LABEL"]

PROTOCOL_LABEL = {
    "whole-run": "whole-run protocol (scores of the whole record run, T epochs; interventions restart from the "
                 "burn-in checkpoint T_e: the paper's Algorithm 1, which uses information from after the restart)",
    "single-job": "single-job protocol (scores of epochs 1..k only; interventions continue from epoch k: what "
                  "one training job can do)",
}
TARGET_LABEL = {"canary": "canary copies", "injected": "injected held-out copies"}
RECALL_KEYS = ("recall@1%", "recall@2%", "recall@5%", "recall@10%")
PRIMARY = {"canary": "extraction", "leak": "leakage"}
MIN_BASELINE = 0.05  # a primary metric at or below this at baseline leaves nothing to reduce


def _by(rows, **kv):
    return [r for r in rows if all(r.get(k) == v for k, v in kv.items())]


def _fmt(m, c, digits=3, pct=False):
    if m is None or not np.isfinite(m):
        return "n/a"
    if pct:
        return f"{100 * m:+.1f}%" + (f" ± {100 * c:.1f}" if np.isfinite(c) else "")
    return f"{m:.{digits}f}" + (f" ± {c:.{digits}f}" if np.isfinite(c) else "")


def detection_verdict(mean: float, half: float) -> str:
    """By rule from the AUROC's 95% interval: above 0.5 -> finds them; below -> ranks them below
    the rest; otherwise no better than chance."""
    if not np.isfinite(mean):
        return "not measurable"
    if not np.isfinite(half):
        return "one seed: no interval"
    if mean - half > 0.5:
        return "**finds memorized samples**"
    if mean + half < 0.5:
        return "ranks them *below* the rest"
    return "no better than chance"


def intervention_verdict(rel: float, half: float, baseline: float, metric: str) -> str:
    """By rule from the paired relative change's 95% interval (negative = reduction)."""
    if not (np.isfinite(baseline) and baseline > MIN_BASELINE):
        return f"not tested ({metric} at baseline {baseline:.3f}: nothing to reduce)"
    if not np.isfinite(rel):
        return "not measurable"
    if not np.isfinite(half):
        return "one seed: no interval"
    if rel + half < 0:
        return f"**cuts {metric}**"
    if rel - half > 0:
        return f"raises {metric}"
    return "no significant change"


def _scores_order(rows) -> List[str]:
    names = list(dict.fromkeys(r["score"] for r in rows))
    eps = [n for n in names if n.startswith("m@")]
    rest = [n for n in names if not n.startswith("m@")]
    return rest[:1] + eps + rest[1:] if rest and rest[0] == "m" else rest + eps


def _score_label(name: str) -> str:
    from paper.report import SCORE_LABEL

    return f"m_i at eps = {name[2:]}" if name.startswith("m@") else SCORE_LABEL.get(name, name)


def detection_summary(rows, exp: str, target: str, protocol: str) -> Dict[str, dict]:
    """score -> {'auroc': (mean, half), 'recall@p': (mean, half), 'per_seed': {seed: auroc}}."""
    det = _by(rows, method="detect", experiment=exp, target=target, protocol=protocol)
    out = {}
    for name in _scores_order(det):
        sel = _by(det, score=name)
        out[name] = {"auroc": mean_ci([r["auroc"] for r in sel]),
                     **{k: mean_ci([r[k] for r in sel]) for k in RECALL_KEYS if k in sel[0]},
                     "per_seed": {r["seed"]: r["auroc"] for r in sel}}
    return out


def _best_model_score(summary: Dict[str, dict]) -> Optional[str]:
    from paper.report import DATA_ONLY

    cand = [n for n in summary if n not in DATA_ONLY and n != "random" and np.isfinite(summary[n]["auroc"][0])]
    return max(cand, key=lambda n: summary[n]["auroc"][0]) if cand else None


def _paired_diff(summary, a: str, b: str) -> Tuple[float, float]:
    sa, sb = summary[a]["per_seed"], summary[b]["per_seed"]
    return mean_ci([sa[s] - sb[s] for s in sa if s in sb])


def detection_section(rows, cfg: dict, out_dir: str) -> List[str]:
    L: List[str] = []
    add = L.append
    det = _by(rows, method="detect")
    if not det:
        return L
    add("## Detection: which score finds the memorized samples\n")
    add("Ground truth: the planted copies (canary copies; copies of injected held-out sequences). AUROC: a "
        "target copy against the unplanted samples (ordinary and noise sequences; ties count one half). Recall at "
        "p: the share of the target copies among the top p of *all* training samples by the score (the set an "
        "intervention at budget p removes; m_i ties broken by d_i as in the paper's pruning). Mean over seeds ± "
        "the half-width of the 95% t-interval. Verdict by rule: *finds memorized samples* when the AUROC interval "
        "lies above 0.5. Two scores need no model at all (data only): the duplicate count, and the unigram "
        "reference alone (a sample made of rare tokens looks \"memorized\" to it); a model-based score is only "
        "useful where it beats them.\n")
    for exp in sorted({r["experiment"] for r in det}, key=lambda e: e != "canary"):
        for target in sorted({r["target"] for r in _by(det, experiment=exp)}):
            for protocol in [p for p in ("whole-run", "single-job") if _by(det, experiment=exp, protocol=p)]:
                summ = detection_summary(rows, exp, target, protocol)
                n = len(next(iter(summ.values()))["per_seed"]) if summ else 0
                pos = _by(det, experiment=exp, target=target, protocol=protocol)[0]["positives"]
                add(f"### {exp}: {TARGET_LABEL.get(target, target)} ({pos} per seed), {protocol}\n")
                add("| score | AUROC | " + " | ".join(RECALL_KEYS) + " | verdict |")
                add("|---|---|" + "---|" * len(RECALL_KEYS) + "---|")
                for name, d in summ.items():
                    if name.startswith("m@") and protocol != "whole-run":
                        continue  # m at every eps: once per target, in the whole-run table
                    add(f"| {_score_label(name)} | {_fmt(*d['auroc'])} | "
                        + " | ".join(_fmt(*d[k], digits=2) for k in RECALL_KEYS if k in d)
                        + f" | {detection_verdict(*d['auroc'])} |")
                best = _best_model_score(summ)
                if best is not None:
                    ties = [nm for nm in summ if nm != best and nm not in ("random", "ref_unigram", "duplicates")
                            and not nm.startswith("m@")
                            and np.isfinite(_paired_diff(summ, best, nm)[1])
                            and _paired_diff(summ, best, nm)[0] - _paired_diff(summ, best, nm)[1] <= 0]
                    data_beat = [nm for nm in ("duplicates", "ref_unigram") if nm in summ
                                 and summ[nm]["auroc"][0] >= summ[best]["auroc"][0]]
                    txt = (f"\nBest model-based score (n = {n} seeds): **{_score_label(best)}**, AUROC "
                           f"{_fmt(*summ[best]['auroc'])}.")
                    txt += (" Not distinguishable from it (the paired AUROC difference's interval includes 0): "
                            + ", ".join(_score_label(t) for t in ties) + "." if ties else
                            " Every other model-based score's AUROC is lower by a paired difference whose interval excludes 0.")
                    if data_beat:
                        txt += (" A data-only baseline does at least as well ("
                                + ", ".join(f"{_score_label(t)} {_fmt(*summ[t]['auroc'])}" for t in data_beat)
                                + "): at this target the planted copies can be found without training a model.")
                    if "m" in summ:
                        txt += f" The paper's m_i: AUROC {_fmt(*summ['m']['auroc'])} ({detection_verdict(*summ['m']['auroc'])})."
                    add(txt)
                add("")
    if fig_detection_roc(out_dir):
        add("![detection ROC](fig_detection_roc.png)\n")
        add("`fig_detection_roc.png`: ROC of each score for each target (whole-run protocol, seeds pooled).\n")
    return L


def fig_detection_roc(out_dir: str) -> bool:
    """ROC curves of the scores against each target, seeds pooled, from scores_*_seed*.npz."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for exp in ("canary", "leak"):
        files = sorted(f for f in glob.glob(os.path.join(out_dir, f"scores_{exp}_seed*.npz")) if "_single" not in f)
        data = [np.load(f) for f in files]
        data = [d for d in data if "score_names" in d.files]
        if not data:
            continue
        for target, g in (("canary", 2), ("injected", 3)):
            if any((d["group"] == g).any() for d in data):
                panels.append((exp, target, g, data))
    if not panels:
        return False
    show = ("m", "d", "gain", "-last", "excess_unigram", "excess_zlib", "ref_unigram", "duplicates", "random")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (exp, target, g, data) in zip(axes[0], panels):
        names = [str(x) for x in data[0]["score_names"]]
        for j, name in enumerate(n for n in show if n in names):
            k = names.index(name)
            pos, neg = [], []
            for d in data:
                v = d["score_values"][k].astype(np.float64)
                ok = ~np.isnan(v)
                v = np.where(ok, v, v[ok].min() - 1 if ok.any() else 0.0)
                pos.append(v[d["group"] == g])
                neg.append(v[d["group"] <= 1])
            fpr, tpr = roc_curve(np.concatenate(pos), np.concatenate(neg))
            ls = ":" if name in ("ref_unigram", "duplicates", "random") else "-"
            ax.plot(fpr, tpr, ls=ls, color=f"C{j}", label=_score_label(name))
        ax.plot([0, 1], [0, 1], color="k", ls="--", lw=0.5)
        ax.set_title(f"{exp}: {TARGET_LABEL[target]} vs unplanted", fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig_detection_roc.png"), dpi=110)
    plt.close(fig)
    return True


def _paired_rel(rows, exp, protocol, method, p, metric, relative=True):
    vals = []
    for s in sorted({r["seed"] for r in _by(rows, experiment=exp, protocol=protocol)}):
        b = _by(rows, experiment=exp, protocol=protocol, method="none", seed=s)
        x = _by(rows, experiment=exp, protocol=protocol, method=method, fraction=p, seed=s)
        if b and x and metric in b[0] and metric in x[0]:
            x0, x1 = b[0][metric], x[0][metric]
            vals.append(((x1 - x0) / x0 if x0 else float("nan")) if relative else x1 - x0)
    return mean_ci(vals)


def intervention_table(rows, exp: str, protocol: str) -> List[dict]:
    """One dict per condition: the numbers of the intervention table (means, intervals, verdict)."""
    prim = PRIMARY.get(exp, "extraction")
    sel_rows = _by(rows, experiment=exp, protocol=protocol)
    sel_rows = [r for r in sel_rows if r["method"] not in ("detect", "eps_sweep")]
    base = mean_ci([r[prim] for r in _by(sel_rows, method="none")])
    out = []
    for method, p in dict.fromkeys((r["method"], r["fraction"]) for r in sel_rows if r["method"] != "paper"):
        sel = _by(sel_rows, method=method, fraction=p)
        rel = _paired_rel(rows, exp, protocol, method, p, prim) if method != "none" else (0.0, 0.0)
        out.append({"method": method, "fraction": p, "n": len(sel),
                    "pruned_weight": float(np.mean([r["pruned_weight"] for r in sel])),
                    "canaries_hit": mean_ci([r["canaries_hit"] for r in sel]),
                    "injected_hit": mean_ci([r["injected_hit"] for r in sel]),
                    prim: mean_ci([r[prim] for r in sel]), "rel": rel,
                    "exposure": _paired_rel(rows, exp, protocol, method, p, "exposure", relative=False),
                    "mia": _paired_rel(rows, exp, protocol, method, p, "mia_loss_auc", relative=False),
                    "ppl": _paired_rel(rows, exp, protocol, method, p, "perplexity"),
                    "verdict": "(reference)" if method == "none" else intervention_verdict(*rel, base[0], prim)})
    return out


def intervention_section(rows, cfg: dict) -> List[str]:
    from paper.report import METHOD_LABEL

    L: List[str] = []
    add = L.append
    iv = [r for r in rows if r["method"] not in ("detect", "eps_sweep")]
    if not iv:
        return L
    add("## Interventions at equal budget\n")
    add(f"Each intervention restarts from a checkpoint of the seed's record run and trains the remaining epochs "
        f"with the same data order; pruning removes exactly round(p N) samples whatever the score; goldfish loss "
        f"(Hans et al. 2024) leaves a target token out of the loss when a hash of the {cfg.get('goldfish_h')} "
        f"tokens before it selects it (rate 1/{cfg.get('goldfish_k')}), on every sample or on the top p flagged by "
        f"`{cfg.get('flag_by')}` (the pruned-weight column is then the share of target tokens left out). Changes are "
        "paired per seed against the same protocol's no-intervention run: relative for the primary metric and "
        "perplexity, absolute for exposure (bits) and the loss attack's membership-inference AUC. Verdict by rule "
        "on the primary metric: *cuts* when the interval of the paired relative change lies below 0.\n")
    for exp in sorted({r["experiment"] for r in iv}, key=lambda e: e != "canary"):
        prim = PRIMARY.get(exp, "extraction")
        for protocol in [p for p in ("whole-run", "single-job") if _by(iv, experiment=exp, protocol=p)]:
            tab = intervention_table(rows, exp, protocol)
            n = tab[0]["n"] if tab else 0
            add(f"### {exp}, {PROTOCOL_LABEL.get(protocol, protocol)}\n")
            add(f"n = {n} seeds. Primary metric: {prim}.\n")
            expo = exp == "canary"
            add(f"| intervention | p | pruned weight | canary copies hit | injected copies hit | {prim} | change | "
                + ("exposure change (bits) | " if expo else "") + "MIA AUC change | perplexity change | verdict |")
            add("|---|---|---|---|---|---|---|" + ("---|" if expo else "") + "---|---|---|")
            for t in tab:
                p = t["fraction"]
                add(f"| {METHOD_LABEL.get(t['method'], t['method'])} | {'all' if t['method'] == 'goldfish_all' else f'{p:.0%}'} "
                    f"| {t['pruned_weight']:.3f} | {_fmt(*t['canaries_hit'], digits=2)} | "
                    f"{_fmt(*t['injected_hit'], digits=2)} | {_fmt(*t[prim], digits=2)} | "
                    f"{'' if t['method'] == 'none' else _fmt(*t['rel'], pct=True)} | "
                    + (f"{'' if t['method'] == 'none' else _fmt(*t['exposure'], digits=1)} | " if expo else "")
                    + f"{'' if t['method'] == 'none' else _fmt(*t['mia'])} | "
                    f"{'' if t['method'] == 'none' else _fmt(*t['ppl'], pct=True)} | {t['verdict']} |")
            add("")
            add(power_sentence(rows, exp, protocol))
            add("")
    return L


def power_sentence(rows, exp: str, protocol: str) -> str:
    """Is a 40% cut of the primary metric distinguishable from seed noise? From the paired
    relative changes of random pruning (whose true effect is small) at each fraction."""
    prim = PRIMARY.get(exp, "extraction")
    base = mean_ci([r[prim] for r in _by(rows, experiment=exp, protocol=protocol, method="none")])
    if not (np.isfinite(base[0]) and base[0] > MIN_BASELINE):
        return (f"Statistical power: {prim} at baseline is {_fmt(*base, digits=3)}, too low to measure a "
                "reduction at this scale.")
    halves = [h for p in sorted({r["fraction"] for r in _by(rows, experiment=exp, protocol=protocol, method="random")})
              for _, h in [_paired_rel(rows, exp, protocol, "random", p, prim)] if np.isfinite(h)]
    if not halves:
        return "Statistical power: not measurable (no random-pruning rows or one seed)."
    h = max(halves)
    return (f"Statistical power: baseline {prim} {_fmt(*base, digits=2)}; the 95% interval of random pruning's paired "
            f"relative change has half-width up to {100 * h:.0f} points, so a 40% cut "
            + ("**is** distinguishable from seed noise." if h < 0.4 else "is **not** reliably distinguishable from "
               "seed noise at this number of seeds."))
