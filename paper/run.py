"""One command for the paper's experiments: ``python -m paper.run --config default --out DIR``.

Per experiment and seed: build the corpus, train T epochs with recording (one record run per
seed, shared by everything else; checkpoints at the burn-in T_e and at the label epoch k), then
for each protocol — whole-run (scores after epoch T, interventions from T_e: the paper's
Algorithm 1) and single-job (scores after epoch k, interventions from k) — measure detection of
the planted copies by every score (paper/scores.py) and run every intervention at equal budget
(pruning by each score, goldfish loss on all or on the flagged samples, the paper's quadrant
down-weighting), continuing for the remaining epochs and evaluating extraction, exposure,
leakage, membership inference and perplexity. Jobs (experiment x seed) run in parallel worker
processes, one thread each (tiny models use cores better that way than with intra-op threads).
Results: DIR/rows.jsonl (one row per condition, protocol and seed; detection rows have method
"detect"), DIR/scores_*.npz, DIR/roc_*.npz, DIR/config.json, then report.py draws the figures
and writes DIR/RESULTS.md.

The counterfactual family (paper/counterfactual.py: every score, with and without a reference
model, on settings with fair labels) runs after the experiments; its rows (experiment
"counterfactual", method "cf_detect"; the audit kit's settings: "cf_audit") go to the same rows.jsonl.
``--only counterfactual`` runs it alone and then rewrites only its section of ``--docs``/RESULTS.md;
``--settings NAME ...`` runs only those settings of it and merges their rows into the previous
run's rows.jsonl in ``--out`` (the others' rows, config and wall time kept), e.g. ``--only
counterfactual --settings audit audit_b --out results/counterfactual --docs docs``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from paper.counterfactual import CF_CONFIGS, CFConfig

__all__ = ["ExperimentConfig", "Config", "CONFIGS", "run", "main"]


@dataclass
class ExperimentConfig:
    name: str                      # "canary" (LSTM, synthetic) or "leak" (GPT-2-style, real text)
    model: str                     # "lstm" | "gpt2"
    dims: dict
    corpus: str                    # "synthetic" | "wiki" | "ptb" | "embedded"
    corpus_args: dict
    epochs: int = 8
    burn_in: int = 2
    batch: int = 32
    lr: float = 1e-2
    eps_grid: Tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    tokenizer: str = "gpt2"
    # eps sensitivity: for every eps in eps_grid, prune the top p by m at that eps (p in eps_sweep)
    # and continue from the same burn-in checkpoint; () = off. Reuses the seed's one record run.
    eps_sweep: Tuple[float, ...] = ()
    # the single-job protocol's label epoch k: scores from epochs 1..k, interventions from epoch k
    # on (None: the burn-in T_e)
    label_epoch: Optional[int] = None


@dataclass
class Config:
    name: str
    experiments: List[ExperimentConfig]
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)   # >= 5: paired changes of a few canaries are noisy
    fractions: Tuple[float, ...] = (0.0, 0.05, 0.10)
    # prune the top p by each score (paper/scores.py METHOD_SCORE); equal budget for all
    methods: Tuple[str, ...] = ("memorization", "gain", "excess", "loss", "last", "duplicates", "random")
    # goldfish loss (Hans et al. 2024): drop a target when a hash of the h tokens before it
    # selects it (rate 1/k), on all samples and on the top p flagged by flag_by; 0 = off
    goldfish_k: int = 4
    goldfish_h: int = 4
    flag_by: str = "excess"
    # "whole-run": scores of the whole record run, interventions from the burn-in checkpoint (the
    # paper's Algorithm 1); "single-job": scores of epochs 1..k, interventions from epoch k on
    protocols: Tuple[str, ...] = ("whole-run", "single-job")
    paper_point: bool = True       # the paper's quadrant down-weighting (whole-run protocol)
    alpha: float = 0.5             # down-weighting factor (the paper's GPT-2 setting)
    paper_alpha_d: float = 0.75    # the paper's quadrant setting for its down-weighting point
    paper_alpha_m: float = 0.25    # "tau_m = 25%"
    exposure_samples: int = 256
    workers: int = 2
    roc_fraction: float = 0.10     # ROC curves are kept for p = 0 and this p
    device: str = "cpu"
    # every score with and without a reference model on settings with fair labels (None: off)
    counterfactual: Optional[CFConfig] = None


def _canary(**over) -> ExperimentConfig:
    base = ExperimentConfig(
        name="canary", model="lstm", dims=dict(dim=48, hidden=128), corpus="synthetic",
        corpus_args=dict(n_ordinary=1200, seq_len=20, canary_reps=(1, 2, 4, 8), canaries_per_rep=6,
                         inject_reps=(1, 2, 4, 8), injected_per_rep=3, n_valid=300, n_nonmembers=400,
                         n_members=400),
        epochs=8, burn_in=2, batch=64, lr=1e-2, eps_sweep=(0.10,), label_epoch=4)
    return dataclasses.replace(base, **over)


def _leak(**over) -> ExperimentConfig:
    # CPU scale: an LSTM on real text. The tiny GPT-2-style decoder (2 x 64) we tried first learnt too
    # slowly on CPU budgets (training loss stuck near the unigram level, no injected copy reproduced
    # even at r = 8), so there was no leakage to reduce; `--scale paper` / config gpu use GPT-2.
    base = ExperimentConfig(
        name="leak", model="lstm", dims=dict(dim=64, hidden=256), corpus="wiki",
        corpus_args=dict(n_train=440, seq_len=32, vocab=1024, canary_reps=(2, 8), canaries_per_rep=1,
                         inject_reps=(1, 2, 4, 8), injected_per_rep=4, suffix_len=8, n_valid=250,
                         n_nonmembers=400, n_members=400),
        epochs=10, burn_in=2, batch=32, lr=1e-2, eps_grid=(1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 4.7055, 5.0, 5.5),
        label_epoch=5)
    return dataclasses.replace(base, **over)


CONFIGS: Dict[str, Config] = {
    "default": Config("default", [_canary(), _leak()], counterfactual=CF_CONFIGS["default"]),
    "smoke": Config("smoke", [
        _canary(corpus_args=dict(n_ordinary=150, seq_len=16, canary_reps=(1, 4), canaries_per_rep=2,
                                 inject_reps=(1, 4), injected_per_rep=2, n_valid=50, n_nonmembers=60,
                                 n_members=60), epochs=3, burn_in=1, dims=dict(dim=16, hidden=32),
                eps_sweep=(0.2,), label_epoch=2),
        _leak(corpus="embedded", tokenizer="word", model="lstm", dims=dict(dim=16, hidden=32),
              corpus_args=dict(n_train=120, seq_len=16, vocab=200, canary_reps=(2,), inject_reps=(1, 2),
                               injected_per_rep=2, n_valid=30, n_nonmembers=60, n_members=60),
              epochs=3, burn_in=1, lr=1e-2, label_epoch=2)],
        seeds=(0, 1), fractions=(0.0, 0.2), exposure_samples=64, workers=1, counterfactual=CF_CONFIGS["smoke"]),
    "gpu": Config("gpu", [
        _canary(dims=dict(dim=200, hidden=650, layers=2), epochs=20, burn_in=5, label_epoch=10,
                corpus_args=dict(n_ordinary=20000, seq_len=32, canary_reps=(1, 2, 4, 8, 16), canaries_per_rep=8,
                                 inject_reps=(1, 2, 4, 8), injected_per_rep=16)),
        _leak(model="gpt2", dims=dict(n_embd=768, n_layer=12, n_head=12), epochs=6, burn_in=2, lr=3e-4, label_epoch=3,
              eps_grid=(2.0, 3.0, 3.5, 4.0, 4.5, 4.7055, 5.0, 5.5, 6.0),
              corpus_args=dict(n_train=20000, seq_len=128, vocab=50257, canary_reps=(2, 8), inject_reps=(1, 2, 4, 8),
                               injected_per_rep=16, n_valid=1000, n_nonmembers=2000, n_members=2000))],
        exposure_samples=4096, workers=1, device="cuda"),
}


# --------------------------------------------------------------------------------------- one job
def _build_corpus(exp: ExperimentConfig, seed: int):
    from paper.data import synthetic_corpus, text_corpus

    if exp.corpus == "synthetic":
        return synthetic_corpus(seed, **exp.corpus_args)
    return text_corpus(seed, source=exp.corpus, tokenizer=exp.tokenizer, **exp.corpus_args)


def _pick_eps(scores) -> int:
    """The tracked threshold with the most forget events (fixed rule, applied to every seed)."""
    f = scores.forgets.numpy().reshape(len(scores.forgets), -1)
    return int(np.argmax(f.sum(0)))


def _extraction_eval(model, corpus) -> dict:
    """The cheap part of evaluate(): canary extraction (overall and by r) and perplexity."""
    import torch

    from paper import metrics as M

    model.eval()
    dev = next(model.parameters()).device
    out: dict = {}
    with torch.no_grad():
        if corpus.canaries:
            # batched by prefix length: names tokenize to different lengths in the real-text corpus
            ext = np.zeros(len(corpus.canaries), dtype=bool)
            groups: Dict[tuple, List[int]] = {}
            for i, c in enumerate(corpus.canaries):
                groups.setdefault((len(c.prefix), len(c.secret)), []).append(i)
            for idx in groups.values():
                pre = torch.stack([corpus.canaries[i].prefix for i in idx]).to(dev)
                sec = torch.stack([corpus.canaries[i].secret for i in idx]).to(dev)
                ext[idx] = M.extraction_success(model, pre, sec)
            reps = np.array([c.reps for c in corpus.canaries])
            out["extraction"] = float(ext.mean())
            for r in sorted(set(reps.tolist())):
                out[f"extraction_r{r}"] = float(ext[reps == r].mean())
        out["perplexity"] = M.perplexity(model, corpus.valid.to(dev))
    return out


def _prune_set_stats(corpus, removed: np.ndarray) -> dict:
    """How much of the canaries a prune set (removed ids) covers."""
    removed = np.asarray(removed, dtype=np.int64)
    copies = np.array(sorted(i for c in corpus.canaries for i in c.ids), dtype=np.int64)
    if not len(copies):
        return {"canary_copies_hit": float("nan"), "canaries_any_hit": float("nan"),
                "canaries_all_hit": float("nan"), "prune_set_canary_share": float("nan")}
    any_hit = [bool(np.isin(c.ids, removed).any()) for c in corpus.canaries]
    all_hit = [bool(np.isin(c.ids, removed).all()) for c in corpus.canaries]
    return {"canary_copies_hit": float(np.isin(copies, removed).mean()),
            "canaries_any_hit": float(np.mean(any_hit)), "canaries_all_hit": float(np.mean(all_hit)),
            "prune_set_canary_share": float(np.isin(removed, copies).mean()) if len(removed) else 0.0}


def eps_sweep_rows(exp: ExperimentConfig, corpus, scores, k: int, train_fn, base: dict, cache: Optional[dict] = None,
                   seed: int = 0) -> List[dict]:
    """Eps sensitivity from one record run: for every tracked eps j and fraction p in exp.eps_sweep,
    prune the top p by m at eps j, continue training with train_fn(keep) (the interventions' own
    path: from the burn-in checkpoint) and measure extraction. cache: removed-id tuple -> result,
    so that an eps whose prune set equals one already trained (e.g. the main run's m rows at the
    fixed eps k) is not trained again."""
    import gdc_ext

    cache = {} if cache is None else cache
    N = corpus.num_samples
    rows = []
    for p in exp.eps_sweep:
        for j, eps in enumerate(exp.eps_grid):
            keep = gdc_ext.prune(scores, p, by="memorization", seed=seed, eps_index=j)
            removed = np.setdiff1d(np.arange(N), keep.numpy())
            key = tuple(removed.tolist())
            reused = key in cache
            if not reused:
                cache[key] = _extraction_eval(train_fn(keep, f"{exp.name}/eps{eps:g}/{p}"), corpus)
            m_j = scores.memorization.numpy().reshape(N, -1)[:, j]
            rows.append({**base, "method": "eps_sweep", "fraction": p, "eps": float(eps), "eps_index": j,
                         "eps_fixed": float(exp.eps_grid[k]), "is_fixed_eps": j == k, "reused": reused,
                         "pruned_weight": len(removed) / N, "forget_events": float(
                             scores.forgets.numpy().reshape(N, -1)[:, j].sum()),
                         "frac_m_positive": float((m_j > 0).mean()),
                         **_prune_set_stats(corpus, removed), **cache[key]})
    return rows


def evaluate(model, corpus, cfg: Config, seed: int, keep_scores: bool = False) -> dict:
    import torch

    from paper import metrics as M

    out = _extraction_eval(model, corpus)  # extraction (overall, by r) and perplexity
    dev = next(model.parameters()).device
    with torch.no_grad():
        if corpus.canaries:
            expo = np.array([M.canary_exposure(model, c.prefix.to(dev), c.secret.to(dev), corpus.digits,
                                               n_samples=cfg.exposure_samples, seed=seed)
                             for c in corpus.canaries])
            reps = np.array([c.reps for c in corpus.canaries])
            out["exposure"] = float(expo.mean())
            for r in sorted(set(reps.tolist())):
                out[f"exposure_r{r}"] = float(expo[reps == r].mean())
        lk = M.leakage(model, corpus.injected.to(dev), corpus.prefix_len)
        out["leakage"] = lk["exact"]
        out["leakage_token_recall"] = lk["token_recall"]
        for r in sorted(set(corpus.injected_reps.tolist())):
            out[f"leakage_r{r}"] = float(lk["per_sequence"][corpus.injected_reps == r].mean())
        lp_m = M.token_logprobs(model, corpus.train[corpus.member_ids].to(dev))
        lp_n = M.token_logprobs(model, corpus.nonmembers.to(dev))
        texts_m = [corpus.texts[i] for i in corpus.member_ids]
        sm = {"loss": M.loss_score(lp_m), "zlib": M.zlib_score(lp_m, texts_m), "mink": M.min_k_score(lp_m, 0.2)}
        sn = {"loss": M.loss_score(lp_n), "zlib": M.zlib_score(lp_n, corpus.nonmember_texts),
              "mink": M.min_k_score(lp_n, 0.2)}
        for att, d in M.mia_summary(sm, sn).items():
            for k, v in d.items():
                out[f"mia_{att}_{k}"] = v
    if keep_scores:
        out["_mia_scores"] = (sm, sn)
    return out


def _references(corpus) -> dict:
    """Per-sample reference losses of the training samples' scored (target) tokens."""
    from gdc_ext import unigram_reference, zlib_reference

    targets = corpus.train[:, 1:]
    return {"unigram": unigram_reference(targets, vocab_size=corpus.vocab_size), "zlib": zlib_reference(targets)}


def _targets(corpus) -> Dict[str, np.ndarray]:
    """Ground truth per target: the planted copies of that kind (only kinds present)."""
    out = {}
    for name, g in (("canary", 2), ("injected", 3)):
        if (corpus.group == g).any():
            out[name] = corpus.group == g
    return out


def detection_rows(table: Dict[str, np.ndarray], corpus, base: dict, difficulty: np.ndarray) -> List[dict]:
    """One row per (target, score): AUROC of the target's copies against the unplanted samples
    (ordinary and noise) and recall of the copies by the top p of all samples (m ties broken by d,
    as the paper's pruning)."""
    from paper.scores import detection_metrics

    negative = corpus.group <= 1
    scored = ~np.isnan(difficulty)
    rows = []
    for target, pos in _targets(corpus).items():
        for name, v in table.items():
            tb = difficulty if name == "m" or name.startswith("m@") else None
            rows.append({**base, "method": "detect", "target": target, "score": name, "positives": int(pos.sum()),
                         **detection_metrics(v, pos, negative, tiebreak=tb, scored=scored)})
    return rows


def _conditions(cfg: Config, protocol: str) -> List[Tuple[str, Optional[float]]]:
    ps = [p for p in cfg.fractions if p > 0]
    conds = [("none", 0.0)] + [(m, p) for m in cfg.methods for p in ps]
    if cfg.goldfish_k:
        conds += [("goldfish_all", 1.0)] + [("goldfish_flagged", p) for p in ps]
    if protocol == "whole-run" and cfg.paper_point:
        conds.append(("paper", None))
    return conds


def run_job(args) -> List[dict]:
    """(experiment config, Config, seed, out dir, queue) -> rows for every condition of one seed:
    detection rows (method "detect") and intervention rows of both protocols."""
    exp, cfg, seed, out_dir, queue = args
    import torch

    torch.set_num_threads(1)
    import gdc_ext
    from paper.goldfish import goldfish_mask
    from paper.models import build_model
    from paper.scores import METHOD_SCORE, duplicate_counts, score_table, select_top
    from paper.train import TrainSpec, intervention_phase, record_run

    t0 = time.time()
    corpus = _build_corpus(exp, seed)
    dev = torch.device(cfg.device if (cfg.device == "cpu" or torch.cuda.is_available()) else "cpu")
    data = corpus.train.to(dev)
    spec = TrainSpec(epochs=exp.epochs, burn_in=exp.burn_in, batch=exp.batch, lr=exp.lr, eps=tuple(exp.eps_grid))
    seq_len = corpus.train.shape[1]
    N = corpus.num_samples

    def make_model():
        torch.manual_seed(seed)
        return build_model(exp.model, corpus.vocab_size, seq_len, **exp.dims).to(dev)

    rec = record_run(make_model, data, spec, seed, label_epoch=exp.label_epoch or exp.burn_in, progress=False)
    refs = _references(corpus)
    dups = duplicate_counts(corpus.train)
    gf_mask = goldfish_mask(corpus.train, k=cfg.goldfish_k, h=cfg.goldfish_h, seed=seed) if cfg.goldfish_k else None
    protocols = {"whole-run": (rec.scores, rec.snap, exp.burn_in),
                 "single-job": (rec.scores_k, rec.snap_k, rec.label_epoch)}
    protocols = {k_: v for k_, v in protocols.items() if k_ in cfg.protocols}
    canary_ids = np.array(sorted(i for c in corpus.canaries for i in c.ids), dtype=np.int64)
    rows: List[dict] = []
    roc = {}
    sweep_cache: dict = {}
    for protocol, (scores, snap, start) in protocols.items():
        k = _pick_eps(scores)
        d = scores.difficulty.numpy()
        table = score_table(scores, exp.eps_grid, k, refs, dups, seed)
        m_all = scores.memorization.numpy().reshape(N, -1)
        tag = "" if protocol == "whole-run" else "_single"
        np.savez_compressed(os.path.join(out_dir, f"scores_{exp.name}_seed{seed}{tag}.npz"), memorization=m_all[:, k],
                            memorization_all=m_all, eps_grid=np.array(exp.eps_grid), eps_index=k, difficulty=d,
                            grad_energy=scores.grad_energy.numpy(), group=corpus.group,
                            loss_mean=scores.loss_mean.numpy(), last_loss=scores.last_loss.numpy(),
                            train_losses=np.array(rec.losses), score_names=np.array(list(table)),
                            score_values=np.stack(list(table.values())), label_epoch=rec.label_epoch)
        base = {"experiment": exp.name, "seed": seed, "corpus": corpus.description, "eps": exp.eps_grid[k],
                "protocol": protocol, "start_epoch": start}
        rows += detection_rows(table, corpus, base, d)
        if queue is not None:
            queue.put(1)
        for method, p in _conditions(cfg, protocol):
            keep, weights, mask = None, None, None
            if method in METHOD_SCORE:
                removed = select_top(table[METHOD_SCORE[method]], p, d if method == "memorization" else None,
                                     scored=~np.isnan(d))
                keep = torch.from_numpy(np.setdiff1d(np.arange(N), removed))
                pruned_weight = len(removed) / N
            elif method in ("goldfish_all", "goldfish_flagged"):
                removed = np.arange(N) if method == "goldfish_all" else select_top(
                    table[METHOD_SCORE[cfg.flag_by]], p, scored=~np.isnan(d))
                mask = torch.zeros_like(gf_mask)
                mask[torch.from_numpy(removed)] = gf_mask[torch.from_numpy(removed)]
                pruned_weight = float(mask.float().mean())  # share of target tokens left out of the loss
            elif method == "paper":
                q = gdc_ext.quadrants(scores.difficulty, torch.from_numpy(m_all[:, k]), cfg.paper_alpha_d,
                                      cfg.paper_alpha_m)
                weights = gdc_ext.loss_weights(q, cfg.alpha)
                removed = np.flatnonzero(q.codes.numpy() == 2)
                p = len(removed) / N
                pruned_weight = (1 - cfg.alpha) * p
            elif method == "none":
                removed = np.zeros(0, dtype=np.int64)
                pruned_weight = 0.0
            else:
                raise ValueError(f"unknown intervention method {method!r}")
            model = intervention_phase(make_model, data, spec, snap, seed, keep=keep, weights=weights,
                                       desc=f"{exp.name}/{protocol}/{method}/{p}", progress=False, start_epoch=start,
                                       target_mask=mask)
            keep_scores = protocol == "whole-run" and (method in ("none", "paper") or (
                p is not None and abs(p - cfg.roc_fraction) < 1e-9 and method in ("memorization", "gain", "random")))
            ev = evaluate(model, corpus, cfg, seed, keep_scores=keep_scores)
            if "_mia_scores" in ev:
                sm, sn = ev.pop("_mia_scores")
                for att in sm:
                    roc[f"{method}_{p:g}_{att}_members"] = sm[att]
                    roc[f"{method}_{p:g}_{att}_nonmembers"] = sn[att]
            if protocol == "whole-run" and method == "memorization" and exp.eps_sweep:
                sweep_cache[tuple(removed.tolist())] = {k_: v for k_, v in ev.items() if k_ == "extraction"
                                                        or k_.startswith("extraction_r") or k_ == "perplexity"}
            rows.append({**base, "method": method, "fraction": p, "pruned_weight": pruned_weight,
                         "canaries_hit": float(np.isin(canary_ids, removed).mean()) if len(canary_ids) else float("nan"),
                         "injected_hit": float(np.isin(np.flatnonzero(corpus.group == 3), removed).mean()),
                         **ev})
            if queue is not None:
                queue.put(1)
        if protocol == "whole-run" and exp.eps_sweep:
            def train_keep(keep, desc, snap=snap):
                return intervention_phase(make_model, data, spec, snap, seed, keep=keep, desc=desc, progress=False)
            rows += eps_sweep_rows(exp, corpus, scores, k, train_keep, base, sweep_cache, seed=seed)
            if queue is not None:
                queue.put(1)
    np.savez_compressed(os.path.join(out_dir, f"roc_{exp.name}_seed{seed}.npz"), **roc)
    for r in rows:
        r["job_seconds"] = time.time() - t0
    return rows


def _job_steps(cfg: Config, exp: ExperimentConfig) -> int:
    """Progress-bar steps of one job (one per protocol's detection, per condition, per sweep)."""
    return sum(1 + len(_conditions(cfg, pr)) + (bool(exp.eps_sweep) and pr == "whole-run") for pr in cfg.protocols)


# --------------------------------------------------------------------------------------- driver
def _merge_previous(out_dir: str, cfg: Config, rows: List[dict], timing: dict) -> Tuple[List[dict], dict, dict]:
    """A partial run (``--settings``) merged into out_dir's previous one: its rows replace only the
    rows of what it ran (the experiments it ran; the counterfactual settings it ran), its config's
    counterfactual settings replace theirs in config.json, and its wall time becomes one more part
    of the family's timing (``counterfactual_parts``: which settings ran in which wall time)."""
    ran_exp = {e.name for e in cfg.experiments}
    ran_cf = {s.name for s in cfg.counterfactual.settings} if cfg.counterfactual is not None else set()
    old_rows: List[dict] = []
    path = os.path.join(out_dir, "rows.jsonl")
    if os.path.exists(path):
        with open(path) as fh:
            old_rows = [json.loads(line) for line in fh if line.strip()]
    keep = [r for r in old_rows if not (r.get("setting") in ran_cf if r.get("experiment") == "counterfactual"
                                        else r.get("experiment") in ran_exp)]
    old_t: dict = {}
    if os.path.exists(os.path.join(out_dir, "timing.json")):
        with open(os.path.join(out_dir, "timing.json")) as fh:
            old_t = json.load(fh)
    parts = old_t.get("counterfactual_parts")
    if parts is None and "counterfactual_seconds" in old_t:  # a full run written before parts were recorded
        parts = [{"settings": list(dict.fromkeys(r["setting"] for r in old_rows if r.get("experiment") == "counterfactual")),
                  "seconds": old_t["counterfactual_seconds"], "workers": old_t.get("workers")}]
    parts = [dict(p_, settings=[n for n in p_["settings"] if n not in ran_cf]) for p_ in parts or []]
    parts = [p_ for p_ in parts if p_["settings"]] + timing.get("counterfactual_parts", [])
    merged_t = {**old_t, "counterfactual_parts": parts,
                "counterfactual_seconds": sum(p_["seconds"] for p_ in parts)} if parts else {**old_t, **timing}
    conf = dataclasses.asdict(cfg)
    if os.path.exists(os.path.join(out_dir, "config.json")) and cfg.counterfactual is not None:
        with open(os.path.join(out_dir, "config.json")) as fh:
            old_c = json.load(fh)
        if old_c.get("counterfactual"):
            kept = [st for st in old_c["counterfactual"]["settings"] if st["name"] not in ran_cf]
            old_c["counterfactual"]["settings"] = kept + conf["counterfactual"]["settings"]
            conf = old_c
    return keep + rows, merged_t, conf


def run(cfg: Config, out_dir: str, progress: bool = True, merge: bool = False) -> List[dict]:
    """Runs cfg, writes out_dir/rows.jsonl, timing.json and config.json, returns the rows of this
    run. merge: keep out_dir's previous rows of everything this run did not run (``--settings``:
    re-run some counterfactual settings without the others)."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    # longest experiments first, so the last worker to finish is not left alone with a long job
    jobs = [(exp, cfg, s) for exp in sorted(cfg.experiments, key=lambda e: e.name != "leak") for s in cfg.seeds]
    total = sum(_job_steps(cfg, exp) for exp, _, _ in jobs)
    t0 = time.time()
    rows: List[dict] = []
    bar = tqdm(total=total, desc=f"gdc experiments [{cfg.name}]", disable=not progress or not jobs, smoothing=0.05)
    if jobs and cfg.workers <= 1:
        class _Q:
            def put(self, n):
                bar.update(n)
        for exp, c, s in jobs:
            rows += run_job((exp, c, s, out_dir, _Q()))
    elif jobs:
        ctx = mp.get_context("spawn")
        with ctx.Manager() as mgr:
            q = mgr.Queue()
            with ctx.Pool(cfg.workers) as pool:
                res = pool.map_async(run_job, [(e, c, s, out_dir, q) for e, c, s in jobs])
                done = 0
                while done < total:
                    try:
                        q.get(timeout=1.0)
                        done += 1
                        bar.update(1)
                    except Exception:
                        if res.ready():
                            break
                for r in res.get():
                    rows += r
    bar.close()
    timing = {"config": cfg.name, "workers": cfg.workers, "experiments_seconds": time.time() - t0}
    if cfg.counterfactual is not None and cfg.counterfactual.settings:
        from paper.counterfactual import run_family

        t1 = time.time()
        rows += run_family(cfg.counterfactual, out_dir, workers=cfg.workers, progress=progress)
        timing["counterfactual_seconds"] = time.time() - t1
        timing["counterfactual_parts"] = [{"settings": [st.name for st in cfg.counterfactual.settings],
                                           "seconds": timing["counterfactual_seconds"], "workers": cfg.workers}]
    timing["wall_seconds"] = time.time() - t0
    all_rows, conf = rows, dataclasses.asdict(cfg)
    if merge:
        all_rows, timing, conf = _merge_previous(out_dir, cfg, rows, timing)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(conf, fh, indent=1)
    with open(os.path.join(out_dir, "rows.jsonl"), "w") as fh:
        for r in all_rows:
            fh.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "timing.json"), "w") as fh:
        json.dump(timing, fh)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Reproduce the GenDataCarto experiments with gdc_ext (offline).")
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--out", default="results/reproduce")
    p.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: the config's)")
    p.add_argument("--only", choices=["canary", "leak", "counterfactual"],
                   help="run one experiment only (counterfactual: the family of paper/counterfactual.py)")
    p.add_argument("--settings", nargs="+", metavar="NAME",
                   help="counterfactual family: run only these settings (of the config's: demo, canary, noisy, secrets, "
                        "secrets_ft, audit) and merge their rows into --out's previous rows.jsonl, replacing only theirs")
    p.add_argument("--scale", choices=["config", "paper"], default="config",
                   help="'paper': GPT-2 small (12 x 768, full 50257 BPE vocabulary) for the leak experiment (GPU)")
    p.add_argument("--docs", help="also copy RESULTS.md and the figures into this folder")
    p.add_argument("--no-report", action="store_true")
    a = p.parse_args(argv)
    cfg = CONFIGS[a.config]
    if a.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(a.seeds))
    if a.workers:
        cfg = dataclasses.replace(cfg, workers=a.workers)
    if a.only:
        cfg = dataclasses.replace(cfg, experiments=[e for e in cfg.experiments if e.name == a.only],
                                  counterfactual=cfg.counterfactual if a.only == "counterfactual" else None)
    if a.seeds and cfg.counterfactual is not None:
        cfg = dataclasses.replace(cfg, counterfactual=dataclasses.replace(cfg.counterfactual, seeds=tuple(a.seeds)))
    if a.settings:
        if cfg.counterfactual is None:
            p.error("--settings selects settings of the counterfactual family: not with --only canary / leak")
        known = [st.name for st in cfg.counterfactual.settings]
        unknown = [n for n in a.settings if n not in known]
        if unknown:
            p.error(f"--settings: unknown setting(s) {', '.join(unknown)}; the {cfg.name} config has {', '.join(known)}")
        cfg = dataclasses.replace(cfg, counterfactual=dataclasses.replace(
            cfg.counterfactual, settings=[st for st in cfg.counterfactual.settings if st.name in a.settings]))
    if a.scale == "paper":
        from paper.models import GPT2_SMALL

        cfg = dataclasses.replace(cfg, experiments=[
            dataclasses.replace(e, model="gpt2", dims=dict(GPT2_SMALL), lr=3e-4,
                                corpus_args={**e.corpus_args, "vocab": 50257})
            if e.name == "leak" else e for e in cfg.experiments])
    run(cfg, a.out, merge=bool(a.settings))
    if not a.no_report:
        from paper.report import make_report

        make_report(a.out, docs_dir=a.docs)
    print(f"results in {os.path.abspath(a.out)}")


if __name__ == "__main__":
    main()
