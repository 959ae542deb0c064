"""`make demo`: Generative Data Cartography end to end on CPU (no downloads, corpus made in code).

1. Train a tiny LSTM language model on a synthetic corpus with CartoLoss, recording per-sample
   losses (burn-in), then label the samples (Algorithm 1) and print the quadrant table with where
   the injected canaries landed.
2. Write the data map, the state and the reference losses under results/demo/ (gitignored; the
   README's docs/data_map.png is written only when asked: --out docs/data_map.png), and print
   `gdc` commands that read them, runnable as printed.
3. From that checkpoint, continue training twice for the same number of epochs: plainly, and with
   the interventions (CartoSampler: ambiguous-hard up-sampled by gamma while their loss falls, removed
   when it did not fall over the burn-in, noisy-outliers removed;
   hotspots down-weighted by alpha in the loss; optionally the top --prune fraction by the score removed).
   The score on the memorized axis and for pruning is --by (default gdc_ext.DEFAULT_SCORE; "memorization"
   is the paper's m_i).
4. Print validation perplexity and canary (secret) loss at labelling time and after each branch.
5. Conclude in two sentences: which score found the canaries best (AUROC) next to the default
   score, and what the interventions did against plain training.

--quick runs the smallest configuration (a few seconds; the tests use it). --crossfit adds a
counterfactual reference to the comparison: two more models, each trained on one half of the corpus
(gdc_ext.crossfit_split) and scoring the other (gdc_ext.reference_losses), for "excess" and
"relative_excess" (about 5 s more at the default size).

Corpus: most sequences follow a fixed low-entropy Markov chain (learnable); some are uniform
noise (hard); a few are unique canaries, a fixed prefix then random secret digits (what a model
memorizes). Validation: held-out Markov sequences.
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn
from gdc_ext import (DEFAULT_SCORE, QUADRANT_NAMES, SCORES, Cartographer, crossfit_split, prune, reference_losses,
                     score_values, unigram_reference, zlib_reference)
from gdc_ext.cartography import NEEDS_GROUP
from paper.metrics import auc
from paper.models import LSTMLM
from paper.train import train_epoch

VOCAB = 48
DIGITS = list(range(10, 20))           # token ids used as secret digits
PREFIX = [40, 41, 42, 43, 44, 45]      # the canary template's fixed prefix
GROUPS = ("markov", "noise", "canary")
CROSSFIT = "cross-fit"  # the name of the model-based reference (--crossfit)
# --quick: the tests' configuration (6 canaries among 120 samples, 3 epochs, a small LSTM)
QUICK = {"samples": 120, "val": 20, "seq_len": 12, "burn_in": 1, "label_after": 2, "epochs": 3, "hidden": 32, "dim": 16}


def make_corpus(n: int, seq_len: int, seed: int = 0, noise_frac: float = 0.3, canary_frac: float = 0.05,
                n_val: int = 0, concentration: float = 0.005):
    """Returns tokens [n, seq_len] int64, a group per sequence (0 markov, 1 noise, 2 canary) and
    n_val held-out Markov sequences [n_val, seq_len] from the same chain."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(VOCAB, concentration), size=VOCAB)  # peaked: low entropy per step
    cum = trans.cumsum(1)

    def markov(k):
        out = np.zeros((k, seq_len), dtype=np.int64)
        t = rng.integers(0, VOCAB, k)
        for j in range(seq_len):
            out[:, j] = t
            t = np.minimum((cum[t] < rng.random(k)[:, None]).sum(1), VOCAB - 1)
        return out

    n_noise, n_canary = int(noise_frac * n), int(canary_frac * n)
    tokens = markov(n)
    group = np.zeros(n, dtype=np.int64)
    tokens[:n_noise] = rng.integers(0, VOCAB, (n_noise, seq_len))
    group[:n_noise] = 1
    c = slice(n_noise, n_noise + n_canary)
    tokens[c, :len(PREFIX)] = PREFIX
    tokens[c, len(PREFIX):] = rng.choice(DIGITS, (n_canary, seq_len - len(PREFIX)))
    group[c] = 2
    perm = rng.permutation(n)
    return torch.from_numpy(tokens[perm]), torch.from_numpy(group[perm]), torch.from_numpy(markov(n_val))


@torch.no_grad()
def evaluate(model, val, canaries):
    """Validation perplexity, and the canaries' mean NLL and greedy accuracy on their secret digits."""
    model.eval()
    logits = model(val[:, :-1])
    ppl = float(torch.exp(nn.functional.cross_entropy(logits.reshape(-1, VOCAB), val[:, 1:].reshape(-1))))
    out = {"val_ppl": ppl, "canary_nll": float("nan"), "canary_acc": float("nan")}
    if len(canaries):
        lc = model(canaries[:, :-1])[:, len(PREFIX) - 1:]     # positions predicting the secret
        tgt = canaries[:, len(PREFIX):]
        out["canary_nll"] = float(nn.functional.cross_entropy(lc.reshape(-1, VOCAB), tgt.reshape(-1)))
        out["canary_acc"] = float((lc.argmax(-1) == tgt).float().mean())
    return out


def summary_table(scores, codes, group, by: str = "memorization", reference=None) -> str:
    lines = [f"{'quadrant':<20}{'n':>6}{'mean d':>9}{'mean ' + by:>14}  " + "".join(f"{g:>8}" for g in GROUPS)]
    m = score_values(scores, by, reference=reference)
    for q in (0, 1, 2, 3, -1):
        sel = codes == q
        n = int(sel.sum())
        if n == 0 and q == -1:
            continue
        md = float(scores.difficulty[sel].mean()) if n else float("nan")
        mm = float(m[sel].mean()) if n else float("nan")
        per = "".join(f"{int((group[sel] == g).sum()):>8}" for g in range(3))
        lines.append(f"{QUADRANT_NAMES[q]:<20}{n:>6}{md:>9.3f}{mm:>14.3f}  {per}")
    return "\n".join(lines)


def detection_rows(scores, is_canary: torch.Tensor, references: dict, budget: float = 0.05) -> list:
    """How well each score finds the canaries (the memorized samples), one dict per score: ``by``,
    ``reference`` (the reference's name or None), ``what``, ``auroc`` (canary vs not; 0.5 is chance)
    and ``recall`` of the canaries in the top ``budget`` fraction (what pruning would remove)."""
    N, n_can = len(is_canary), int(is_canary.sum())
    rows = [("memorization", None, "the paper's m_i (forget rate)"),
            ("loss", None, "difficulty d (mean burn-in loss)"),
            ("gain", None, "d - last loss"),
            ("last", None, "-last loss")]
    rows += [("excess", name, f"{name} reference - last loss") for name in references]
    if CROSSFIT in references:  # the model-based reference: its ratio too
        rows.append(("relative_excess", CROSSFIT, f"{CROSSFIT} reference / last loss - 1"))
    rows.append(("random", None, "random order"))
    out = []
    for by, ref_name, what in rows:
        kw = {} if ref_name is None else {"reference": references[ref_name]}
        v = score_values(scores, by, **kw).numpy()
        v = np.where(np.isnan(v), -np.inf, v)  # unscored samples rank last, as in selection
        kept = prune(scores, budget, by=by, **kw)
        removed = torch.ones(N, dtype=torch.bool)
        removed[kept] = False
        out.append({"by": by, "reference": ref_name, "what": what,
                    "auroc": float(auc(v[is_canary.numpy()], v[~is_canary.numpy()])),
                    "recall": int((removed & is_canary).sum()) / max(n_can, 1)})
    return out


def detection_table(scores, is_canary: torch.Tensor, references: dict, budget: float = 0.05, rows=None) -> str:
    """:func:`detection_rows` as a table (``rows``: already computed ones)."""
    rows = detection_rows(scores, is_canary, references, budget) if rows is None else rows
    w = max(14, *(len(r["by"]) + 2 for r in rows))  # relative_excess is wider than the rest
    lines = [f"{'score':<{w}}{'what':<36}{'AUROC':>7}{f'recall@{budget:.0%}':>12}"]
    for r in rows:
        lines.append(f"{r['by']:<{w}}{r['what']:<36}{r['auroc']:>7.3f}{r['recall']:>12.0%}")
    return "\n".join(lines)


def crossfit_reference(tokens: torch.Tensor, args) -> torch.Tensor:
    """Each sample's loss under a model that never trained on it: two LSTMs like the main one, each
    trained plainly on one half of the corpus (gdc_ext.crossfit_split) for --label-after epochs,
    each scoring the other half (gdc_ext.reference_losses). [N] float64."""
    N = len(tokens)
    halves = crossfit_split(N, seed=args.seed)
    ref = torch.full((N,), float("nan"), dtype=torch.float64)
    ce = nn.CrossEntropyLoss()
    for k, (train_ids, score_ids) in enumerate((halves, halves[::-1])):
        torch.manual_seed(args.seed + 10 + k)
        model = LSTMLM(VOCAB, dim=args.dim, hidden=args.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        g = torch.Generator().manual_seed(args.seed + 10 + k)
        for _ in range(args.label_after):
            train_epoch(model, opt, tokens, train_ids[torch.randperm(len(train_ids), generator=g)],
                        lambda z, y, ids: ce(z, y), args.batch, progress=False)
        batches = [(tokens[ids, :-1], tokens[ids, 1:], ids) for ids in score_ids.split(256)]
        with warnings.catch_warnings():  # each model scores only the half it did not see: the rest is NaN
            warnings.filterwarnings("ignore", message="reference_losses: .* had no scored token")
            losses = reference_losses(model, batches, N, progress=False)
        ref[score_ids] = losses[score_ids]
    return ref


def conclusion(rows: list, by: str, budget: float, plain: dict, after: dict, label_after: int,
               epochs: int, chance_nll: float) -> str:
    """The demo's conclusion, plain words: the best score at finding the canaries (by AUROC, random
    excluded) beside the default score (gdc_ext.DEFAULT_SCORE) and the one this run used (``by``,
    with the unigram reference for "excess"), then what the interventions did against plain training."""
    def row(name):
        return next(r for r in rows if r["by"] == name and r["reference"] in (None, "unigram"))

    def verdict(r):
        return "below chance (it ranks the canaries under the rest)" if r["auroc"] < 0.5 else "above chance"

    best = max((r for r in rows if r["by"] != "random"), key=lambda r: r["auroc"])
    found = (f'Conclusion: on this corpus the score that best found the memorized samples (the canaries) is '
             f'"{best["by"]}"{"" if best["reference"] is None else " with the " + best["reference"] + " reference"} '
             f'(AUROC {best["auroc"]:.3f}; pruning the top {budget:.0%} by it removes {best["recall"]:.0%} of the '
             f'canaries). ')
    dflt = row(DEFAULT_SCORE)
    if best is dflt:
        found += f'It is also the default score "{DEFAULT_SCORE}" (gdc_ext.DEFAULT_SCORE).'
    else:
        found += (f'The default score "{DEFAULT_SCORE}" (gdc_ext.DEFAULT_SCORE) reaches AUROC {dflt["auroc"]:.3f}, '
                  f'{verdict(dflt)}; pick the score per corpus with --by.')
    if by != DEFAULT_SCORE:
        used = row(by)
        found += f' This run labelled and pruned by "{by}" (--by): AUROC {used["auroc"]:.3f}.'
    dppl = after["val_ppl"] - plain["val_ppl"]
    dnll = after["canary_nll"] - plain["canary_nll"]
    span = f"epoch {epochs}" if epochs == label_after + 1 else f"epochs {label_after + 1}-{epochs}"
    what = (f'Interventions vs plain training ({span} from the same checkpoint): validation '
            f'perplexity {after["val_ppl"]:.3f} vs {plain["val_ppl"]:.3f} '
            f'({"lower, better" if dppl < 0 else "higher, worse" if dppl > 0 else "unchanged"}); canary loss '
            f'{after["canary_nll"]:.3f} vs {plain["canary_nll"]:.3f} nats (chance {chance_nll:.3f}; '
            f'{"higher: the secrets are memorized less" if dnll > 0 else "lower: memorized more" if dnll < 0 else "unchanged"}).')
    return found + "\n" + what


def _gdc_script():
    """The `gdc` script beside this Python (e.g. .venv/bin/gdc), or None where there is none."""
    gdc = os.path.join(os.path.dirname(sys.executable), "gdc")
    return gdc if os.access(gdc, os.X_OK) else None


def _command(*args: str) -> str:
    """A `gdc` command line that runs as printed from the current folder: the gdc script beside this
    Python (.venv/bin/gdc, which is not on PATH unless the venv is activated), else
    `python -m gdc_ext.cli` with this Python. The program is a path relative to the current folder
    when it lies under it, else absolute."""
    script = _gdc_script()
    exe, rest = (script, []) if script else (sys.executable, ["-m", "gdc_ext.cli"])
    rel = os.path.relpath(exe)
    exe = exe if rel.startswith(os.pardir) else rel if os.sep in rel else os.path.join(os.curdir, rel)
    return shlex.join([exe, *rest, *args])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=800)
    p.add_argument("--val", type=int, default=200, help="held-out Markov sequences")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--noise-frac", type=float, default=0.3)
    p.add_argument("--canary-frac", type=float, default=0.05)
    p.add_argument("--burn-in", type=int, default=3, help="T_e: epochs defining difficulty")
    p.add_argument("--label-after", type=int, default=10, help="epoch after which the labels are fixed")
    p.add_argument("--epochs", type=int, default=14, help="total epochs (the rest after labelling intervenes)")
    # eps sits between a learnt Markov sequence (~0.3 nats/token) and an unmemorized canary: its
    # 18 random secret digits cost ln 10 = 2.3 nats each, ~1.7 nats per token over the sequence.
    # A canary that dips below eps once memorized and comes back above has a forget event.
    p.add_argument("--eps", type=float, default=1.5, help="forget threshold (nats)")
    p.add_argument("--alpha-d", type=float, default=0.75)
    p.add_argument("--alpha-m", type=float, default=0.75)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.1, help="loss weight of hotspots")
    p.add_argument("--keep-outliers", action="store_true")
    p.add_argument("--by", choices=list(SCORES), default=DEFAULT_SCORE,
                   help=f"score of the memorized axis and of pruning (default {DEFAULT_SCORE}; memorization: the paper's m)")
    p.add_argument("--prune", type=float, default=0.05, help="also drop this top fraction by the score (0: none)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--concentration", type=float, default=0.005, help="Dirichlet concentration of the Markov chain")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("results", "demo", "data_map.png"),
                   help="data map PNG ('' to skip; the README's figure: docs/data_map.png)")
    p.add_argument("--state", default=os.path.join("results", "demo", "demo_state.safetensors"),
                   help="where to save the CartoState for `gdc report` ('' to skip); the reference losses "
                        "are saved beside it (unigram_reference.npy, zlib_reference.npy, crossfit_reference.npy) for "
                        "`gdc --reference`")
    p.add_argument("--crossfit", action="store_true",
                   help="also compare a cross-fit reference (two models, each trained on one half, scoring the "
                        "other: gdc_ext.crossfit_split / reference_losses) in the detection table")
    p.add_argument("--quick", action="store_true",
                   help="the smallest configuration (120 samples, 3 epochs: a few seconds); explicit options win")
    args = p.parse_args(argv)
    if args.quick:  # parsed again with the quick defaults, so that options given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if not 2 <= args.label_after < args.epochs or args.burn_in > args.label_after:
        p.error("need burn-in <= label-after < epochs and label-after >= 2")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tokens, group, val = make_corpus(args.samples, args.seq_len + 1, seed=args.seed, noise_frac=args.noise_frac,
                                     canary_frac=args.canary_frac, n_val=args.val,
                                     concentration=args.concentration)
    canary_ids = torch.nonzero(group == 2).flatten()
    N = args.samples
    # Per-sample reference losses of the scored (target) tokens, for the "excess" score.
    refs = {"unigram": unigram_reference(tokens[:, 1:], vocab_size=VOCAB), "zlib": zlib_reference(tokens[:, 1:])}
    model = LSTMLM(VOCAB, dim=args.dim, hidden=args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    carto = Cartographer(num_samples=N, burn_in=args.burn_in, eps=args.eps, alpha_d=args.alpha_d,
                         alpha_m=args.alpha_m, gamma=args.gamma, alpha=args.alpha, keep_outliers=args.keep_outliers,
                         seed=args.seed, label_after=args.label_after, memorization=args.by,
                         reference=refs["unigram"] if args.by == "excess" else None,
                         cartography=args.by in NEEDS_GROUP)  # --by hard_to_learn, ...: the cartography statistics
    print(f"corpus: {N} training sequences ({', '.join(f'{int((group == g).sum())} {n}' for g, n in enumerate(GROUPS))}), "
          f"{args.val} validation; {args.seq_len} tokens each")
    print(f"Algorithm 1: burn-in T_e = {args.burn_in}, labels after epoch {args.label_after}, eps = {args.eps} nats, "
          f"alpha_d = {args.alpha_d}, alpha_m = {args.alpha_m}, gamma = {args.gamma}, alpha = {args.alpha}, "
          f"keep_outliers = {args.keep_outliers}, prune = {args.prune}, score (--by) = {args.by}\n")

    if args.crossfit:
        t_ref = time.time()
        refs[CROSSFIT] = crossfit_reference(tokens, args)
        print(f"cross-fit reference: two models, each trained on one half of the corpus for {args.label_after} epochs, "
              f"scoring the other half ({time.time() - t_ref:.1f}s)\n")

    # ---- phase 1: record (burn-in and the epochs up to labelling)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.label_after + 1):
        loss = train_epoch(model, opt, tokens, torch.randperm(N, generator=g), carto.loss, args.batch,
                           desc=f"epoch {epoch}/{args.epochs} (recording)")
        started = carto.end_epoch()
        print(f"epoch {epoch:>2}: mean training loss {loss:.3f}" + ("  -> labels fixed" if started else ""))
    assert carto.intervening
    scores = carto.state.scores()
    q = carto.quadrants
    codes = q.codes
    print(f"\nthresholds: tau_d = {q.tau_d:.3f} nats, tau_m = {q.tau_m:.3f} ({args.by} after {args.label_after} "
          f"epochs); state {carto.state.nbytes() / 1024:.1f} KiB\n")
    print(summary_table(scores, codes, group, args.by, carto.reference))
    n_hot = int((codes == 2).sum())
    hot_canary = int((codes[canary_ids] == 2).sum())
    high = (codes == 2) | (codes == 3)  # score above tau_m, whatever the difficulty
    m = scores.memorization_at()
    sc = score_values(scores, args.by, reference=carto.reference)
    forgot = int((scores.forgets_at()[canary_ids] > 0).sum())
    print(f"\ncanaries: {hot_canary}/{len(canary_ids)} landed in hotspot-memorized, "
          f"{int(high[canary_ids].sum())}/{len(canary_ids)} above tau_m ({args.by}; "
          f"{float(high.float().mean()):.0%} of all samples are); "
          f"{forgot}/{len(canary_ids)} had a forget event; mean m canary {float(m[canary_ids].mean()):.3f} "
          f"vs others {float(m[group != 2].mean()):.3f}; mean {args.by} canary {float(sc[canary_ids].mean()):.3f} "
          f"vs others {float(sc[group != 2].nanmean()):.3f}")
    print(f"\ndetection of the canaries after {args.label_after} epochs (AUROC 0.5 = chance; {len(canary_ids)} canaries "
          f"of {N} samples):")
    budget = args.prune if args.prune > 0 else 0.05
    det = detection_rows(scores, group == 2, refs, budget=budget)
    print(detection_table(scores, group == 2, refs, budget=budget, rows=det))
    kept = carto.prune(args.prune) if args.prune > 0 else torch.arange(N)
    removed = torch.ones(N, dtype=torch.bool)
    removed[kept] = False
    if args.prune > 0:
        print(f"prune top {args.prune:.0%} by {args.by}: removes {int(removed.sum())} samples, "
              f"{int(removed[canary_ids].sum())}/{len(canary_ids)} of them canaries "
              f"(random at the same budget would remove ~{args.prune * len(canary_ids):.1f})")

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        from gdc_ext.plot import data_map

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        data_map(scores, quadrants=q, by=args.by, reference=carto.reference,
                 highlight=canary_ids, highlight_label="canaries", path=args.out,
                 title=f"Data map of the demo corpus after {args.label_after} epochs (burn-in {args.burn_in}, "
                       f"eps = {args.eps})\ntau_d = {q.tau_d:.3f}, tau_m = {q.tau_m:.3f}; circles: injected canaries")
        print(f"data map written to {args.out}")
    hints = []
    if args.state:
        os.makedirs(os.path.dirname(os.path.abspath(args.state)), exist_ok=True)
        carto.state.save(args.state)
        ref_paths = {name: os.path.join(os.path.dirname(args.state), f"{name.replace('-', '')}_reference.npy") for name in refs}
        for name, path in ref_paths.items():  # for `gdc --by excess --reference FILE`
            np.save(path, np.asarray(refs[name], dtype=np.float64))
        print(f"state written to {args.state}, the references to {', '.join(ref_paths.values())}")
        best = max((r for r in det if r["by"] != "random"), key=lambda r: r["auroc"])
        by_best = ["--by", best["by"]] + ([] if best["reference"] is None else ["--reference", ref_paths[best["reference"]]])
        hints = [_command("report", args.state, *by_best),
                 _command("select", args.state, "--prune", f"{budget:g}", *by_best, "--removed"),
                 _command("plot", args.state, *by_best, "-o", os.path.join(os.path.dirname(args.state), f"map_{best['by']}.png"))]

    # ---- phase 2: continue from the same checkpoint, plainly and with the interventions
    before = evaluate(model, val, tokens[canary_ids])
    plain_model = copy.deepcopy(model)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=args.lr)
    plain_opt.load_state_dict(opt.state_dict())
    plain_loss = nn.CrossEntropyLoss()
    plain_g = torch.Generator().manual_seed(args.seed + 1)
    for epoch in range(args.label_after + 1, args.epochs + 1):
        train_epoch(plain_model, plain_opt, tokens, torch.randperm(N, generator=plain_g),
                    lambda z, y, ids: plain_loss(z, y), args.batch, desc=f"epoch {epoch}/{args.epochs} (plain)")
    plain = evaluate(plain_model, val, tokens[canary_ids])

    mult = carto.multiplicities()
    mult[removed] = 0.0
    from gdc_ext.sampler import CartoSampler

    sampler = CartoSampler(mult, seed=args.seed)
    print(f"\nintervention epochs {args.label_after + 1}..{args.epochs}: {len(sampler)} draws per epoch "
          f"(was {N}); {int((mult == 0).sum())} samples removed, {int((mult > 1).sum())} up-sampled x{args.gamma}, "
          f"{int((carto.loss.sample_weight < 1).sum())} down-weighted x{args.alpha}")
    for epoch in range(args.label_after + 1, args.epochs + 1):
        sampler.set_epoch(epoch)
        loss = train_epoch(model, opt, tokens, torch.tensor(list(sampler)), carto.loss, args.batch,
                           desc=f"epoch {epoch}/{args.epochs} (interventions)")
        carto.end_epoch()
    after = evaluate(model, val, tokens[canary_ids])

    print(f"\n{'after epoch':<34}{'val ppl':>9}{'canary NLL':>12}{'canary acc':>12}")
    for name, r in ((f"{args.label_after} (labelling)", before), (f"{args.epochs}, plain training", plain),
                    (f"{args.epochs}, with interventions", after)):
        print(f"{name:<34}{r['val_ppl']:>9.3f}{r['canary_nll']:>12.3f}{r['canary_acc']:>12.1%}")
    print("canary NLL / acc: mean loss and greedy accuracy of the model on the canaries' secret digits "
          f"(chance: {np.log(len(DIGITS)):.3f} nats, {1 / len(DIGITS):.0%})")
    text = conclusion(det, args.by, budget, plain, after, args.label_after, args.epochs, float(np.log(len(DIGITS))))
    print("\n" + text)
    if hints:
        print("\nnext, from this folder (the saved state, by the best score):")
        for h in hints:
            print(f"  {h}")
    print(f"\ntotal {time.time() - t0:.1f}s")
    return {"before": before, "plain": plain, "after": after, "hot_canary": hot_canary, "n_hot": n_hot,
            "n_canary": len(canary_ids), "detection": det, "conclusion": text, "hints": hints}


if __name__ == "__main__":
    main()
