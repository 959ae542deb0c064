"""Which score finds memorized samples: every score on several settings with fair labels.

For each setting and seed, one model is trained with recording (``gdc_ext.CartoState``) and every
per-sample score of the library is measured against the setting's label (AUROC, recall at p):

- in-run scores (one training run, no reference): ``last`` (-last loss), ``gain`` (d - last),
  ``memorization`` (the paper's m_i at the tracked eps with the most forget events), ``loss`` (the
  burn-in difficulty d), and ``random``;
- calibrated scores ``excess`` (ref - last) and ``relative_excess`` (1 - last / ref) with four
  references:

  * ``initial``: the model before training, scored once with ``gdc_ext.reference_losses`` (free in
    a fine-tuning run, where it is the pretrained model; for a model trained from scratch it is an
    untrained network whose loss is about log V for every sample, so excess@initial is close to a
    shifted -last: the rows say how flat it is, ``ref_initial_cv``);
  * ``crossfit``: ``gdc_ext.crossfit_split`` with ``gdc_ext.duplicate_groups`` (identical samples on
    one side), two half-data models trained the same way, each scoring the half it did not see;
  * ``independent``: a model trained the same way on an independent draw of the same source (the
    same generator, other samples);
  * ``unigram``: ``gdc_ext.unigram_reference`` (data only, no model: the baseline a reference model
    has to beat).

Settings (positives vs negatives; samples in neither are left out of the AUROC):

- ``demo``: the demo corpus (``examples.demo.make_corpus``: a peaked Markov chain, uniform noise
  strings, canaries = a fixed prefix then random digits), LSTM from scratch. Fair label:
  memorized = canaries and noise strings (random strings the model can only fit by memorizing,
  far below their entropy of log V nats per token) vs learnable Markov sequences. The independent
  draw is the second half of one ``make_corpus(2 N)`` call (same chain, other samples).
- ``canary``: the reproduction's synthetic canary corpus (``paper.data.synthetic_corpus``), LSTM
  from scratch. Label: canary copies (secret-sharer canaries inserted r = 1, 2, 4, 8 times) vs
  ordinary Markov sequences (noise strings and injected held-out copies left out). Independent
  draw: ``synthetic_corpus(seed + 1000, chain_seed=seed)`` (same chain, its own canaries).
- ``noisy``: a noisy-label classifier: an MLP on a 10-class Gaussian mixture generated in code
  (scikit-learn's digits are not a dependency) with 10% of the labels flipped to another class,
  trained with ``gdc_ext.CartoLoss``. Label: flipped vs clean. Independent draw: the same class
  means, other points, 10% flipped.
- ``secrets``: natural text (``paper.data.load_documents``: gensim's Wikipedia sample; the smoke
  config uses the embedded paragraphs) in windows of L tokens, with planted phone-number secrets
  ("<first> <last>'s phone number is d d d d d d d.", each inserted r = 1, 2, 4, 8 times),
  duplicated documents (windows repeated) and easy distractors (month / weekday / number-word
  lists, the alphabet, web boilerplate, each a cyclic rotation, so learnable from their other
  variants), and held-out windows injected r = 1, 2, 4, 8 times (benchmark contamination). LSTM
  from scratch. Labels: ``extractable`` = copies of the secrets that greedy decoding from their
  prefix reproduces exactly with the trained model vs ordinary windows and distractors;
  ``extractable_vs_easy`` = the same positives vs the distractors only; ``injected`` = the
  injected copies vs ordinary windows. Secrets not extracted and duplicated documents are in
  neither set of the secret labels (memorized ordinary text is a different question than the
  planted secrets). Documents are split into disjoint pools: target, independent draw (its own
  secrets, duplicates, distractors and injected windows), pretraining, and the injected windows.
- ``secrets_ft``: its fine-tuning variant: a model pretrained on the pretraining pool (ordinary
  windows and distractors, no planted secrets or duplicates) is fine-tuned on the target set with
  recording; the initial reference is the pretrained model, the half and independent references
  are the pretrained model fine-tuned the same way on the half / the independent draw.

- ``audit`` (E, ``audit_setting``): the audit kit's own report. Setting B's corpus without its
  canaries, noise strings and injected copies; ``gdc_ext.audit.plant`` canaries (B's repetition
  counts and canaries per count), the same model trained the same way as B, a cross-fit
  reference, then ``gdc_ext.audit.report`` with the model (``run_audit_job``; rows of method
  ``cf_audit``: the kit's AUROC / recall per score for every inserted row and per repetition
  count, exposure and greedy extraction, inserted vs twins). The report compares its AUROC per
  score with B's.
- ``audit_b`` (E'): the same with the kit given B's canary format (``template=``, ``alphabet=``:
  B's prefix and digit secrets), to tell a difference of the kit's measurement from one of its
  canaries.

Every seed changes the data, the model initialization and the data order. Rows (method
``cf_detect``, experiment ``counterfactual``) go to the run's rows.jsonl; the tables are written
by ``paper/report_counterfactual.py``.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["CFSetting", "CFConfig", "CF_CONFIGS", "IN_RUN", "CALIBRATED", "REFERENCES", "score_names",
           "mixture_data", "secrets_corpus", "run_cf_job", "run_family"]

IN_RUN = ("last", "gain", "memorization", "loss", "random")
CALIBRATED = ("excess", "relative_excess")
REFERENCES = ("initial", "crossfit", "independent", "unigram")
LM_SETTINGS = ("demo", "canary", "secrets", "secrets_ft")
REF_FLOOR = 1e-6  # nats: the smallest reference loss used (a float32 loss can be exactly 0)


def score_names() -> List[str]:
    """Every score of a row, in table order: the in-run ones, then score@reference."""
    return list(IN_RUN) + [f"{s}@{r}" for r in REFERENCES for s in CALIBRATED]


@dataclass
class CFSetting:
    name: str                       # "demo" | "canary" | "noisy" | "secrets" | "secrets_ft"
    data: dict                      # the generator's arguments
    model: dict                     # model dimensions
    epochs: int = 10
    burn_in: int = 2
    batch: int = 32
    lr: float = 1e-2
    eps_grid: Tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    pretrain_epochs: int = 0        # secrets_ft: epochs on the pretraining pool
    pretrain_lr: float = 1e-2
    seeds: Optional[Tuple[int, ...]] = None  # None: the family's seeds
    audit: Optional[dict] = None    # the audit-kit setting: audit.plant / audit.report arguments (run_audit_job)


@dataclass
class CFConfig:
    settings: List[CFSetting] = field(default_factory=list)
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)


# Setting B (planted canaries); setting E (the audit kit) is derived from it by audit_setting.
_DEFAULT_CANARY = CFSetting("canary", data=dict(n_ordinary=800, seq_len=20, canary_reps=(1, 2, 4, 8), canaries_per_rep=6,
                                                inject_reps=(1, 2, 4, 8), injected_per_rep=3, n_valid=10,
                                                n_nonmembers=10, n_members=10),
                            model=dict(dim=48, hidden=128), epochs=8, burn_in=2, batch=64, lr=1e-2,
                            eps_grid=(0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0))
_SMOKE_CANARY = CFSetting("canary", data=dict(n_ordinary=120, seq_len=16, canary_reps=(2, 8), canaries_per_rep=2,
                                              inject_reps=(2,), injected_per_rep=1, n_valid=4, n_nonmembers=4,
                                              n_members=4),
                          model=dict(dim=16, hidden=32), epochs=4, burn_in=1, batch=32, lr=1e-2, eps_grid=(1.0, 2.0))


def audit_setting(canary: CFSetting, *, sample_size: int = 1024, reference: str = "crossfit",
                  design: str = "kit") -> CFSetting:
    """Setting E, "the audit kit's own report": setting B's corpus without its own canaries (and
    without its noise strings and injected copies, so that the kit's negatives, every original row,
    are B's negatives, the ordinary Markov sequences), with ``gdc_ext.audit.plant`` canaries (B's
    repetition counts and canaries per count, B's secret length), the same model trained the same
    way (B's dimensions, epochs, optimizer, eps grid), then ``gdc_ext.audit.report`` with the model
    and the cross-fit reference. ``sample_size``: the exposure estimate's candidates per secret.

    design: "kit" (setting ``audit``, E: the kit's default canaries, a random prefix of the data's
    tokens and a secret over an alphabet drawn from the data) or "compare" (setting ``audit_b``,
    E': the kit given B's canary format through ``template=`` and ``alphabet=``: per canary the
    prefix <10 11 name name 12> of B's token layout and a secret of digits 0-9; the data's own
    tokens after it, as B's Markov tail), which tells a difference of the kit's measurement from a
    difference of the canaries."""
    if design not in ("kit", "compare"):
        raise ValueError(f"design must be 'kit' or 'compare', got {design!r}")
    d = canary.data
    kit = dict(compare=canary.name, reps=tuple(d["canary_reps"]), num_canaries_per_rep=d["canaries_per_rep"],
               secret_len=d.get("secret_len", 6), reference=reference, sample_size=sample_size, design=design)
    return dataclasses.replace(canary, name="audit" if design == "kit" else "audit_b",
                               data={**d, "canary_reps": (), "noise_frac": 0.0, "inject_reps": ()}, audit=kit)


def _b_format(num_canaries: int, seed: int) -> Tuple[List[List[int]], List[int]]:
    """Setting B's canary format in its token layout (paper.data.synthetic_corpus: 0-9 digits,
    10-12 the template, 13-52 names): one prefix <10 11 name_a name_b 12> per canary (distinct
    name pairs, seeded) and the digit alphabet."""
    n_names, name0 = 40, 13
    pairs = np.random.default_rng(seed + 7_000).permutation(n_names * n_names)[:num_canaries]
    return [[10, 11, name0 + int(p) // n_names, name0 + int(p) % n_names, 12] for p in pairs], list(range(10))


def _default_settings() -> List[CFSetting]:
    return [
        CFSetting("demo", data=dict(n=800, seq_len=24, noise_frac=0.3, canary_frac=0.05),
                  model=dict(dim=64, hidden=128), epochs=10, burn_in=3, batch=32, lr=3e-2,
                  eps_grid=(0.5, 1.0, 1.5, 2.0)),
        _DEFAULT_CANARY,
        CFSetting("noisy", data=dict(n=1000, classes=10, dim=20, sep=0.8, flip=0.1),
                  model=dict(hidden=128), epochs=50, burn_in=5, batch=64, lr=3e-3,
                  eps_grid=(0.1, 0.25, 0.5, 1.0, 2.0)),
        CFSetting("secrets", data=dict(source="wiki", tokenizer="gpt2", vocab=1024, seq_len=32, n_ordinary=400,
                                       secret_reps=(1, 2, 4, 8), secrets_per_rep=4, n_dup=8, dup_reps=4,
                                       n_distractors=48, n_pretrain=800),
                  model=dict(dim=64, hidden=256), epochs=10, burn_in=2, batch=32, lr=1e-2,
                  eps_grid=(1.0, 2.0, 3.0, 4.0, 5.0)),
        CFSetting("secrets_ft", data=dict(source="wiki", tokenizer="gpt2", vocab=1024, seq_len=32, n_ordinary=400,
                                          secret_reps=(1, 2, 4, 8), secrets_per_rep=4, n_dup=8, dup_reps=4,
                                          n_distractors=48, n_pretrain=800),
                  model=dict(dim=64, hidden=256), epochs=6, burn_in=1, batch=32, lr=5e-3,
                  eps_grid=(1.0, 2.0, 3.0, 4.0, 5.0), pretrain_epochs=5, pretrain_lr=1e-2),
        audit_setting(_DEFAULT_CANARY, sample_size=1024),
        audit_setting(_DEFAULT_CANARY, sample_size=1024, design="compare"),
    ]


def _smoke_settings() -> List[CFSetting]:
    text = dict(source="embedded", tokenizer="word", vocab=400, seq_len=16, n_ordinary=48, secret_reps=(2, 8),
                secrets_per_rep=2, secret_len=3, n_dup=2, dup_reps=2, n_distractors=8, n_pretrain=48,
                inject_reps=(1, 4), injected_per_rep=2)
    return [
        CFSetting("demo", data=dict(n=160, seq_len=12, noise_frac=0.3, canary_frac=0.1),
                  model=dict(dim=16, hidden=48), epochs=6, burn_in=2, batch=32, lr=3e-2, eps_grid=(1.0, 1.5)),
        _SMOKE_CANARY,
        CFSetting("noisy", data=dict(n=200, classes=4, dim=8, sep=0.8, flip=0.1), model=dict(hidden=32),
                  epochs=8, burn_in=2, batch=32, lr=1e-2, eps_grid=(0.5, 1.0)),
        CFSetting("secrets", data=dict(text), model=dict(dim=16, hidden=48), epochs=10, burn_in=1, batch=16,
                  lr=3e-2, eps_grid=(2.0, 4.0)),
        CFSetting("secrets_ft", data=dict(text), model=dict(dim=16, hidden=48), epochs=6, burn_in=1, batch=16,
                  lr=2e-2, eps_grid=(2.0, 4.0), pretrain_epochs=4, pretrain_lr=3e-2),
        audit_setting(_SMOKE_CANARY, sample_size=64),
        audit_setting(_SMOKE_CANARY, sample_size=64, design="compare"),
    ]


CF_CONFIGS: Dict[str, CFConfig] = {
    "default": CFConfig(_default_settings(), seeds=(0, 1, 2, 3, 4)),
    "smoke": CFConfig(_smoke_settings(), seeds=(0, 1)),
}


# ------------------------------------------------------------------------------------ data sets
@dataclass
class Data:
    """A training set: kind "lm" (x = tokens [N, L]: inputs x[:, :-1], targets x[:, 1:], one id per
    sequence) or "clf" (x = features [N, D], y = labels [N])."""

    kind: str
    x: "object"
    y: "object" = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, ids):
        if self.kind == "lm":
            seq = self.x[ids]
            return seq[:, :-1], seq[:, 1:], ids
        return self.x[ids], self.y[ids], ids

    def targets(self):
        """[N, T] scored targets (for the unigram reference and the duplicate groups)."""
        return self.x[:, 1:] if self.kind == "lm" else self.y[:, None]


@dataclass
class Task:
    train: Data
    indep: Data
    groups: "object"                                  # [N] int64 duplicate groups (crossfit)
    make_model: Callable[[], "object"]
    labels: Callable[["object"], Dict[str, Tuple[np.ndarray, np.ndarray]]]  # trained model -> target -> (pos, neg)
    vocab: int                                        # output classes V
    description: str
    pretrain: Optional[Data] = None
    group: Optional[np.ndarray] = None                # [N] kind of each sample (LM settings)
    group_names: Tuple[str, ...] = ()
    diag: Callable[["object"], dict] = lambda model: {}


def mixture_data(source_seed: int, draw_seed: int, n: int, classes: int = 10, dim: int = 20, sep: float = 0.55,
                 flip: float = 0.1):
    """A Gaussian mixture classification set: class means N(0, sep^2 I) from source_seed (the
    source), n points (unit-variance noise around their class mean) from draw_seed, and
    round(flip * n) labels flipped to another class chosen uniformly. Returns (x [n, dim] float32,
    noisy labels [n] int64, flipped [n] bool, clean labels [n] int64)."""
    import torch

    centers = np.random.default_rng(source_seed).normal(0.0, sep, (classes, dim))
    rng = np.random.default_rng(draw_seed)
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(size=(n, dim))
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, int(round(flip * n)), replace=False)] = True
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, classes, int(flipped.sum()))) % classes
    return (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(noisy.astype(np.int64)), flipped,
            torch.from_numpy(y.astype(np.int64)))


class MLP:
    """Built lazily (torch imported in the worker): Linear-ReLU-Linear-ReLU-Linear."""

    def __new__(cls, dim: int, classes: int, hidden: int = 256):
        from torch import nn

        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, classes))


_MONTHS = "January February March April May June July August September October November December".split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_NUMBERS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen twenty").split()
_LETTERS = [chr(ord("A") + i) for i in range(26)]
_BOILER = ["All rights reserved.", "Terms of use.", "Privacy policy.", "Contact us.", "About this site.",
           "Back to top."]
_DISTRACTOR_LISTS = (_MONTHS, _DAYS, _NUMBERS, _LETTERS, _BOILER)


def _distractor_texts() -> List[str]:
    """Every easy distractor variant: each list rotated to start at each of its items, repeated."""
    out = []
    for items in _DISTRACTOR_LISTS:
        for s in range(len(items)):
            rot = items[s:] + items[:s]
            out.append(" " + " ".join(rot * 4))
    return out


def _secret_prefix(first: str, last: str) -> str:
    return f" {first} {last}'s phone number is"


def secrets_corpus(seed: int, source: str = "wiki", tokenizer: str = "gpt2", vocab: int = 1024, seq_len: int = 32,
                   n_ordinary: int = 400, secret_reps=(1, 2, 4, 8), secrets_per_rep: int = 4, secret_len: int = 7,
                   n_dup: int = 8, dup_reps: int = 4, n_distractors: int = 48, n_pretrain: int = 800,
                   inject_reps=(1, 2, 4, 8), injected_per_rep: int = 4) -> dict:
    """Natural text in windows of seq_len tokens with planted phone-number secrets, duplicated
    documents, easy distractors and injected held-out windows (each inserted r in inject_reps
    times: benchmark contamination, from documents that are nowhere else in the set); disjoint
    document pools (target, independent, pretrain, and the injected windows of each set).

    Returns {"target", "indep": dict(tokens [N, L] int64 tensor, group [N] (0 ordinary, 1 duplicated
    document copy, 2 secret copy, 3 distractor, 4 injected copy), secrets: list of (prefix [P],
    secret [S], reps, ids)), "pretrain": tokens [Np, L] (ordinary windows and distractors only),
    "vocab", "description"}."""
    import torch

    from paper.data import _NAMES, _SURNAMES, WordTokenizer, gpt2_tokenizer, load_documents

    docs = load_documents(source)
    rng = np.random.default_rng(seed)
    names = [(f, s) for f in _NAMES for s in _SURNAMES]
    n_secrets = len(secret_reps) * secrets_per_rep
    who = rng.choice(len(names), 2 * n_secrets, replace=False)
    distractors = _distractor_texts()
    extra = [_secret_prefix(*names[k]) + " 0 1 2 3 4 5 6 7 8 9." for k in who] + distractors
    tok = gpt2_tokenizer() if tokenizer == "gpt2" else WordTokenizer(list(docs) + extra)
    # whole documents to one pool, each to the pool furthest from its need (disjoint text)
    inj = [r for r in inject_reps for _ in range(injected_per_rep)]
    need = {"target": n_ordinary + n_dup + n_secrets, "indep": n_ordinary + n_dup + n_secrets, "pretrain": n_pretrain,
            "inj_target": len(inj), "inj_indep": len(inj)}
    need = {k: v for k, v in need.items() if v > 0}
    pools: Dict[str, list] = {k: [] for k in need}
    for k in rng.permutation(len(docs)):
        if all(len(pools[p]) >= need[p] for p in need):
            break
        ids = tok.encode(docs[k]) + [tok.eos]
        wins = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        p = min(need, key=lambda q: len(pools[q]) / need[q])
        pools[p].extend(wins)
    short = {p: (len(pools[p]), need[p]) for p in need if len(pools[p]) < need[p]}
    if short:
        raise ValueError(f"source {source!r} gives too few windows of {seq_len} tokens: (got, needed) {short}")
    for p in pools:
        pools[p] = [pools[p][i] for i in rng.permutation(len(pools[p]))[:need[p]]]
    pools.setdefault("inj_target", [])
    pools.setdefault("inj_indep", [])

    def fit(ids):  # cut or repeat to seq_len tokens
        ids = list(ids)
        while len(ids) < seq_len:
            ids = ids + ids
        return ids[:seq_len]

    dis_tok = [fit(tok.encode(t)) for t in distractors]
    digit_ids = [tok.encode(f" {i}")[0] for i in range(10)]
    dot = tok.encode(".")

    def build(pool, who_part):
        wins = pools[pool]
        rows, group, tag, secrets = [], [], [], []
        ordinary, dups, fillers = wins[:n_ordinary], wins[n_ordinary:n_ordinary + n_dup], wins[n_ordinary + n_dup:]
        rows += ordinary
        group += [0] * len(ordinary)
        tag += [-1] * len(ordinary)
        for w in dups:
            rows += [w] * dup_reps
            group += [1] * dup_reps
            tag += [-1] * dup_reps
        reps = [r for r in secret_reps for _ in range(secrets_per_rep)]
        for j, r in enumerate(reps):
            prefix = tok.encode(_secret_prefix(*names[who_part[j]]))
            secret = [digit_ids[d] for d in rng.integers(0, 10, secret_len)]
            seq = fit(prefix + secret + dot + fillers[j])
            rows += [seq] * r
            group += [2] * r
            tag += [j] * r
            secrets.append([prefix, secret, r])
        pick = rng.integers(0, len(dis_tok), n_distractors)
        rows += [dis_tok[i] for i in pick]
        group += [3] * n_distractors
        tag += [-1] * n_distractors
        for w, r in zip(pools[f"inj_{pool}"], inj):
            rows += [w] * r
            group += [4] * r
            tag += [-1] * r
        perm = rng.permutation(len(rows))
        return ([rows[i] for i in perm], np.array(group, dtype=np.int64)[perm], np.array(tag, dtype=np.int64)[perm],
                secrets)

    built = {"target": build("target", who[:n_secrets]), "indep": build("indep", who[n_secrets:])}
    pre_rows = pools["pretrain"] + [dis_tok[i] for i in rng.integers(0, len(dis_tok), n_distractors)]
    pre_rows = [pre_rows[i] for i in rng.permutation(len(pre_rows))]
    # limited vocabulary: the most frequent tokens of all pools, the planted items' tokens forced in, UNK last
    from collections import Counter

    counts = Counter(t for part in built.values() for w in part[0] for t in w)
    counts.update(t for w in pre_rows for t in w)
    forced = set(digit_ids) | {t for w in dis_tok for t in w} | {tok.eos} | set(dot)
    for part in built.values():
        forced |= {t for pre, sec, _ in part[3] for t in pre + sec}
    keep = list(forced) + [t for t, _ in counts.most_common() if t not in forced]
    if len(keep) > vocab - 1:
        if len(forced) > vocab - 1:
            raise ValueError(f"vocab = {vocab} is smaller than the {len(forced) + 1} forced tokens")
        keep = keep[:vocab - 1]
    remap = np.full(max(max(keep), max(counts)) + 1, vocab - 1, dtype=np.int64)
    remap[np.array(keep)] = np.arange(len(keep))
    to_t = lambda ws: torch.from_numpy(remap[np.array(ws, dtype=np.int64)])  # noqa: E731
    out = {"vocab": vocab, "pretrain": to_t(pre_rows)}
    for name, (rows, group, tag, secrets) in built.items():
        out[name] = {"tokens": to_t(rows), "group": group,
                     "secrets": [(to_t(pre), to_t(sec), r, np.flatnonzero(tag == j).tolist())
                                 for j, (pre, sec, r) in enumerate(secrets)]}
    unk = float((out["target"]["tokens"] == vocab - 1).float().mean())
    out["description"] = (f"{source} text, {tokenizer} tokens limited to the {vocab - 1} most frequent (+UNK, "
                          f"{100 * unk:.1f}% of target tokens), windows of {seq_len}: {n_ordinary} ordinary, {n_dup} "
                          f"documents x {dup_reps}, {n_secrets} secrets x r = {', '.join(map(str, secret_reps))}, "
                          f"{n_distractors} distractors, {len(inj)} held-out windows injected r = "
                          f"{', '.join(map(str, inject_reps))}; pretraining pool {n_pretrain} windows")
    return out


def _group_diag(model, data: Data, group: np.ndarray, names: Tuple[str, ...]) -> dict:
    """Mean per-token loss of the trained model on each sample kind."""
    ref = _ref_losses(model, data, np.arange(len(data)), len(data))
    return {f"last_loss_{n}": float(np.mean(ref[group == g])) for g, n in enumerate(names) if (group == g).any()}


def build_task(setting: CFSetting, seed: int) -> Task:
    """The data, model factory and labels of one setting and seed."""
    import torch

    from paper.models import build_model

    s = setting
    if s.name == "demo":
        from examples.demo import VOCAB, make_corpus

        n = s.data["n"]
        tokens, group, _ = make_corpus(2 * n, s.data["seq_len"] + 1, seed=seed, noise_frac=s.data["noise_frac"],
                                       canary_frac=s.data["canary_frac"])
        group = group.numpy()
        train, indep = Data("lm", tokens[:n]), Data("lm", tokens[n:])
        g = group[:n]
        return Task(train, indep, _dup_groups(train), lambda: build_model("lstm", VOCAB, s.data["seq_len"], **s.model),
                    lambda model: {"memorized": (g >= 1, g == 0)}, VOCAB,
                    f"demo corpus (examples/demo.py): {n} sequences of {s.data['seq_len']} tokens, "
                    f"{int((g == 0).sum())} Markov, {int((g == 1).sum())} noise, {int((g == 2).sum())} canaries",
                    group=g, group_names=("markov", "noise", "canary"))
    if s.name == "canary":
        from paper.data import synthetic_corpus

        c = synthetic_corpus(seed, **s.data)
        ci = synthetic_corpus(seed + 1000, chain_seed=seed, **s.data)
        train, indep = Data("lm", c.train), Data("lm", ci.train)
        g = c.group
        return Task(train, indep, _dup_groups(train),
                    lambda: build_model("lstm", c.vocab_size, c.train.shape[1], **s.model),
                    lambda model: {"canary": (g == 2, g == 0)}, c.vocab_size, c.description, group=g,
                    group_names=("ordinary", "noise", "canary", "injected"))
    if s.name == "noisy":
        d = s.data
        x, y, flipped, _ = mixture_data(seed, seed, d["n"], d["classes"], d["dim"], d["sep"], d["flip"])
        xi, yi, _, _ = mixture_data(seed, seed + 10_000, d["n"], d["classes"], d["dim"], d["sep"], d["flip"])
        xt, _, _, yt = mixture_data(seed, seed + 20_000, d["n"], d["classes"], d["dim"], d["sep"], 0.0)
        train = Data("clf", x, y)

        def diag(model):
            with torch.no_grad():
                model.eval()
                fl = torch.from_numpy(flipped)
                fit = float((model(x[fl]).argmax(-1) == y[fl]).float().mean())
                acc = float((model(xt).argmax(-1) == yt).float().mean())
            return {"flipped_fit": fit, "clean_test_accuracy": acc}
        return Task(train, Data("clf", xi, yi), torch.arange(d["n"]),
                    lambda: MLP(d["dim"], d["classes"], **s.model),
                    lambda model: {"flipped": (flipped, ~flipped)}, d["classes"],
                    f"{d['classes']}-class Gaussian mixture in {d['dim']} dimensions (class means N(0, {d['sep']}^2)), "
                    f"{d['n']} points, {int(flipped.sum())} labels flipped; MLP {d['dim']}-{s.model['hidden']}-"
                    f"{s.model['hidden']}-{d['classes']}", diag=diag)
    if s.name in ("secrets", "secrets_ft"):
        c = secrets_corpus(seed, **s.data)
        tgt = c["target"]
        train, indep = Data("lm", tgt["tokens"]), Data("lm", c["indep"]["tokens"])
        g = tgt["group"]
        L = tgt["tokens"].shape[1]

        def labels(model):
            ext = _extracted(model, tgt["secrets"])
            pos = np.zeros(len(g), dtype=bool)
            for e, (_, _, _, ids) in zip(ext, tgt["secrets"]):
                pos[ids] = e
            out = {"extractable": (pos, (g == 0) | (g == 3)), "extractable_vs_easy": (pos, g == 3)}
            if (g == 4).any():
                out["injected"] = (g == 4, g == 0)
            return out

        def diag(model):
            ext = _extracted(model, tgt["secrets"])
            reps = np.array([r for _, _, r, _ in tgt["secrets"]])
            return {f"extracted_r{r}": float(ext[reps == r].mean()) for r in sorted(set(reps.tolist()))}
        return Task(train, indep, _dup_groups(train), lambda: build_model("lstm", c["vocab"], L, **s.model), labels,
                    c["vocab"], c["description"] + ("; fine-tuned from a model pretrained on the pretraining pool"
                                                    if s.name == "secrets_ft" else "; trained from scratch"),
                    pretrain=Data("lm", c["pretrain"]) if s.name == "secrets_ft" else None, group=g,
                    group_names=("ordinary", "duplicate", "secret", "distractor", "injected"), diag=diag)
    raise ValueError(f"unknown counterfactual setting {s.name!r}")


def _extracted(model, secrets) -> np.ndarray:
    import torch

    from paper.metrics import extraction_success

    ext = np.zeros(len(secrets), dtype=bool)
    by_len: Dict[tuple, List[int]] = {}
    for j, (pre, sec, _, _) in enumerate(secrets):
        by_len.setdefault((len(pre), len(sec)), []).append(j)
    model.eval()
    for idx in by_len.values():
        ext[idx] = extraction_success(model, torch.stack([secrets[j][0] for j in idx]),
                                      torch.stack([secrets[j][1] for j in idx]))
    return ext


def _dup_groups(data: Data):
    import gdc_ext

    return gdc_ext.duplicate_groups(data.x)


# ------------------------------------------------------------------------------------ training
def _train(model, data: Data, ids, epochs: int, lr: float, batch: int, seed: int, state=None, clip: float = 1.0):
    """AdamW, gradient clipping, shuffled batches of ``ids``; a recording CartoLoss when ``state``."""
    import torch

    import gdc_ext

    ids = torch.as_tensor(ids, dtype=torch.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = gdc_ext.CartoLoss(state=state) if state is not None else gdc_ext.CartoLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = ids[torch.randperm(len(ids), generator=gen)]
        for b in range(0, len(order), batch):
            inp, tgt, bid = data.batch(order[b:b + batch])
            logits = model(inp)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), bid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        if state is not None:
            state.end_epoch()
    model.eval()
    return model


def _ref_losses(model, data: Data, ids, n: int, batch: int = 256) -> np.ndarray:
    """gdc_ext.reference_losses over the samples ``ids`` (NaN for the others)."""
    import torch

    import gdc_ext

    ids = torch.as_tensor(ids, dtype=torch.int64)
    batches = [data.batch(ids[b:b + batch]) for b in range(0, len(ids), batch)]
    with warnings.catch_warnings():  # the ids outside `ids` are NaN on purpose (the other half)
        warnings.simplefilter("ignore", UserWarning)
        return gdc_ext.reference_losses(model, batches, n, progress=False).numpy()


def _pick_eps(scores) -> int:
    """The tracked threshold with the most forget events (the reproduction's fixed rule)."""
    f = scores.forgets.numpy().reshape(len(scores.forgets), -1)
    return int(np.argmax(f.sum(0)))


def run_cf_job(args) -> List[dict]:
    """(CFSetting, seed, out dir or None) -> one row per (target label, score)."""
    setting, seed, out_dir = args
    if setting.audit is not None:
        return run_audit_job(setting, seed, out_dir)
    import torch

    torch.set_num_threads(1)
    import gdc_ext
    from paper.scores import detection_metrics

    t0 = time.time()
    s = setting
    task = build_task(s, seed)
    N = len(task.train)
    init_state = None
    if task.pretrain is not None:  # the fine-tuning variant: one pretrained model shared by every run
        torch.manual_seed(seed)
        pre = _train(task.make_model(), task.pretrain, np.arange(len(task.pretrain)), s.pretrain_epochs,
                     s.pretrain_lr, s.batch, seed + 3_000)
        init_state = {k: v.clone() for k, v in pre.state_dict().items()}

    def fresh():
        torch.manual_seed(seed)
        m = task.make_model()
        if init_state is not None:
            m.load_state_dict(init_state)
        return m

    def fit(data, ids, gen_seed, state=None):
        return _train(fresh(), data, ids, s.epochs, s.lr, s.batch, gen_seed, state=state)

    refs: Dict[str, np.ndarray] = {"initial": _ref_losses(fresh(), task.train, np.arange(N), N)}
    state = gdc_ext.CartoState(N, burn_in=s.burn_in, eps=list(s.eps_grid))
    target = fit(task.train, np.arange(N), seed, state)
    scores = state.scores()
    t_target = time.time() - t0
    half_a, half_b = gdc_ext.crossfit_split(N, task.groups, seed=seed)
    a, b = half_a.numpy(), half_b.numpy()
    ref_cf = np.full(N, np.nan)
    ref_cf[b] = _ref_losses(fit(task.train, a, seed + 1_000), task.train, b, N)[b]
    ref_cf[a] = _ref_losses(fit(task.train, b, seed + 2_000), task.train, a, N)[a]
    refs["crossfit"] = ref_cf
    refs["independent"] = _ref_losses(fit(task.indep, np.arange(len(task.indep)), seed + 4_000), task.train,
                                      np.arange(N), N)
    refs["unigram"] = np.asarray(gdc_ext.unigram_reference(task.train.targets(), vocab_size=task.vocab),
                                 dtype=np.float64)
    # A confident reference model can give a loss of exactly 0 (float32: the target's logit exceeds
    # the others by more than ~17); relative_excess divides by the reference, so such losses are
    # floored at REF_FLOOR (counted per reference in the rows: ref_<name>_floored).
    floored = {f"ref_{r}_floored": int((refs[r] < REF_FLOOR).sum()) for r in REFERENCES}
    refs = {r: np.maximum(v, REF_FLOOR) for r, v in refs.items()}
    k = _pick_eps(scores)
    table: Dict[str, np.ndarray] = {}
    for by in IN_RUN:
        table[by] = gdc_ext.score_values(scores, by, eps_index=k, seed=seed).numpy()
    for r in REFERENCES:
        for by in CALIBRATED:
            table[f"{by}@{r}"] = gdc_ext.score_values(scores, by, eps_index=k, reference=torch.from_numpy(refs[r])).numpy()
    labels = task.labels(target)
    diag = task.diag(target)
    if task.group is not None:
        diag.update(_group_diag(target, task.train, task.group, task.group_names))
    ri = refs["initial"]
    base = {"experiment": "counterfactual", "method": "cf_detect", "setting": s.name, "seed": seed,
            "description": task.description, "num_samples": N, "eps": float(s.eps_grid[k]),
            "ref_initial_cv": float(np.std(ri) / np.mean(ri)), "log_vocab": float(np.log(task.vocab)),
            "ref_initial_mean": float(np.mean(ri)), "target_seconds": t_target, "epochs": s.epochs,
            "burn_in": s.burn_in, "pretrain_epochs": s.pretrain_epochs, "lr": s.lr, "batch": s.batch,
            "model_dims": ", ".join(f"{k_}={v_}" for k_, v_ in s.model.items()), **floored, **diag}
    rows = []
    for target_name, (pos, neg) in labels.items():
        for name, v in table.items():
            by, _, ref = name.partition("@")
            rows.append({**base, "target": target_name, "score": name, "by": by, "reference": ref or "none",
                         "positives": int(pos.sum()), "negatives": int(neg.sum()),
                         **detection_metrics(v, pos, neg)})
    if out_dir:
        np.savez_compressed(os.path.join(out_dir, f"cf_{s.name}_seed{seed}.npz"), names=np.array(list(table)),
                            values=np.stack(list(table.values())), **{f"ref_{r}": v for r, v in refs.items()},
                            **{f"pos_{t}": p for t, (p, _) in labels.items()},
                            **{f"neg_{t}": n_ for t, (_, n_) in labels.items()})
    dt = time.time() - t0
    for r in rows:
        r["job_seconds"] = dt
    return rows


def _edge_tied(values: np.ndarray, fraction: float) -> bool:
    """Whether the top round(fraction N) of ``values`` (NaN lowest) depends on how ties are broken:
    more rows share the last selected value than the budget has slots left for them."""
    v = np.where(np.isnan(values), -np.inf, values)
    k = int(round(fraction * len(v)))
    if k == 0 or k >= len(v):
        return False
    t = np.sort(v)[::-1][k - 1]
    return bool((v == t).sum() > k - (v > t).sum())


def run_audit_job(setting: CFSetting, seed: int, out_dir: Optional[str]) -> List[dict]:
    """Setting E (``audit_setting``): the audit kit run the way its README shows, on setting B's
    corpus. Rows (method ``cf_audit``): per kit score (``score@reference`` for the reference
    ones) the kit's AUROC and recall at 1 / 5 / 10 % for target ``planted`` (every inserted row)
    and ``planted_r<r>`` per repetition count r (the rows of the canaries inserted r times), with the exposure and
    extraction of the secrets, inserted vs twins, on every row; ``repro_auroc`` / ``repro_recall@p``: the
    same labels on the same run measured by the reproduction's own code (each score as ``run_cf_job``
    computes it, ``paper.scores.detection_metrics``), which the kit's should match; ``repro_edge_tied@p``:
    whether that budget's selection depends on the tie rule (the kit counts tied rows in expectation,
    the reproduction by lower id). out_dir: the kit's JSON
    (``<setting>_seed<k>.json``: the report; ``<setting>_canaries_seed<k>.json``: the planted canaries)."""
    import json

    import torch

    import gdc_ext
    from gdc_ext import audit
    from gdc_ext.cartography import NEEDS_REFERENCE
    from paper.data import synthetic_corpus
    from paper.models import build_model
    from paper.scores import RECALL_PS, detection_metrics

    torch.set_num_threads(1)
    t0 = time.time()
    s, kit = setting, setting.audit
    c = synthetic_corpus(seed, **s.data)
    if (c.group == 2).any():
        raise ValueError("the audit-kit setting needs a corpus without its own canaries (data canary_reps=())")
    how = dict(num_canaries_per_rep=kit["num_canaries_per_rep"], reps=tuple(kit["reps"]), secret_len=kit["secret_len"])
    shown = ", ".join(f"{k_}={v_}" for k_, v_ in how.items())
    if kit.get("design", "kit") == "compare":
        how["template"], how["alphabet"] = _b_format(kit["num_canaries_per_rep"] * len(kit["reps"]), seed)
        shown += ", template=<10 11 name name 12> per canary, alphabet=digits 0-9"
    planted = audit.plant(c.train, vocab_size=c.vocab_size, seed=seed, **how)
    data = Data("lm", planted.data)
    N = planted.num_rows

    def fit(ids, gen_seed, state=None):
        torch.manual_seed(seed)
        m = build_model("lstm", c.vocab_size, c.train.shape[1], **s.model)
        return _train(m, data, ids, s.epochs, s.lr, s.batch, gen_seed, state=state)

    state = gdc_ext.CartoState(N, burn_in=s.burn_in, eps=list(s.eps_grid))
    target = fit(np.arange(N), seed, state)
    scores = state.scores()
    reference, ref_name = None, "none"
    if kit.get("reference") == "crossfit":  # as in setting B: identical rows (a canary's copies) on one side
        half_a, half_b = gdc_ext.crossfit_split(N, gdc_ext.duplicate_groups(data.x), seed=seed)
        a, b = half_a.numpy(), half_b.numpy()
        ref = np.full(N, np.nan)
        ref[b] = _ref_losses(fit(a, seed + 1_000), data, b, N)[b]
        ref[a] = _ref_losses(fit(b, seed + 2_000), data, a, N)[a]
        reference, ref_name = torch.from_numpy(ref), "crossfit"
    elif kit.get("reference") not in (None, "none"):
        raise ValueError(f"audit setting: reference must be 'crossfit' or None, got {kit.get('reference')!r}")
    k = _pick_eps(scores)  # the memorization score at the eps setting B uses (the family's rule)
    t_scores = time.time() - t0
    rep = audit.report(planted, scores, model=target, reference=reference, eps=float(s.eps_grid[k]),
                       sample_size=kit["sample_size"], seed=seed)
    by_r = rep.exposure_by_reps()
    base = {"experiment": "counterfactual", "method": "cf_audit", "setting": s.name, "seed": seed,
            "compare": kit["compare"], "description": f"{c.description}; {planted!r}", "num_samples": N,
            "plant": f"audit.plant(tokens, vocab_size={c.vocab_size}, {shown}, seed=seed)",
            "design": kit.get("design", "kit"),
            "eps": float(s.eps_grid[k]), "epochs": s.epochs, "burn_in": s.burn_in, "pretrain_epochs": 0, "lr": s.lr,
            "batch": s.batch, "log_vocab": float(np.log(c.vocab_size)),
            "model_dims": ", ".join(f"{k_}={v_}" for k_, v_ in s.model.items()),
            "exposure_method": rep.exposure_method["method"], "exposure_max_bits": rep.exposure_method["max_bits"],
            "exposure_cap_bits": rep.exposure_method["cap_bits"], "exposure_sample_size": kit["sample_size"],
            "scores_seconds": t_scores}
    for kind in ("inserted", "twin"):  # over every secret of that kind, then per r
        sel = [x for x in rep.secrets if x["kind"] == kind]
        base[f"exposure_{kind}"] = float(np.mean([x["exposure"] for x in sel]))
        base[f"extracted_{kind}"] = float(np.mean([x["extracted"] for x in sel]))
        base[f"capped_{kind}"] = float(np.mean([x["capped"] for x in sel]))
    for r, v in by_r.items():
        for kind, label in (("inserted", "inserted"), ("twin", "twins")):
            base[f"exposure_r{r}_{kind}"] = v[label]["mean_exposure"]
            base[f"extracted_r{r}_{kind}"] = v[label]["extracted"]
    # The same labels measured by the reproduction's own code on the same run: each score computed
    # as run_cf_job computes it (gdc_ext.score_values at the family's eps index, the same seed and
    # reference) and measured by paper.scores.detection_metrics (AUROC: paper.metrics.auc; recall:
    # the top round(p N) by select_top, ties by lower id), columns repro_*: the kit's table should
    # equal these (AUROC) or be within their interval (recall: the kit counts rows tied at the
    # budget's edge in expectation, the reproduction by id).
    neg = np.zeros(N, dtype=bool)
    neg[:planted.num_original] = True
    pos_of = {None: np.asarray(planted.inserted_ids, dtype=np.int64)}
    pos_of.update({r: np.array([i for x in planted.canaries if x.reps == r for i in x.ids], dtype=np.int64)
                   for r in planted.reps})
    rows = []
    for name, v in rep.scores.items():
        score = f"{name}@{ref_name}" if name in NEEDS_REFERENCE else name
        values = gdc_ext.score_values(scores, name, eps_index=k, seed=seed,
                                      reference=reference if name in NEEDS_REFERENCE else None).numpy()
        for r, m in [(None, v)] + sorted(v["by_reps"].items()):
            pos = np.zeros(N, dtype=bool)
            pos[pos_of[r]] = True
            own = detection_metrics(values, pos, neg)
            own.update({f"edge_tied@{q:.0%}": _edge_tied(values, q) for q in RECALL_PS})
            rows.append({**base, "target": "planted" if r is None else f"planted_r{r}", "score": score, "by": name,
                         "reference": ref_name if name in NEEDS_REFERENCE else "none",
                         "positives": int(pos.sum()), "negatives": planted.num_original, "auroc": m["auroc"],
                         **{f"recall@{q}": val for q, val in m["recall"].items()},
                         **{f"repro_{key}": val for key, val in own.items()}})
    if out_dir:
        planted.save(os.path.join(out_dir, f"{s.name}_canaries_seed{seed}.json"))
        with open(os.path.join(out_dir, f"{s.name}_seed{seed}.json"), "w") as fh:
            json.dump(rep.to_dict(), fh, indent=1)
    dt = time.time() - t0
    for r in rows:
        r["job_seconds"] = dt
    return rows


_COST = {"secrets_ft": 0, "secrets": 1, "canary": 2, "audit": 3, "audit_b": 3, "demo": 4, "noisy": 5}  # longest first


def run_family(cfg: CFConfig, out_dir: Optional[str], workers: int = 1, progress: bool = True) -> List[dict]:
    """Every (setting, seed) job, in ``workers`` processes (one thread each); rows of all jobs."""
    jobs = [(st, sd, out_dir) for st in sorted(cfg.settings, key=lambda x: _COST.get(x.name, 9))
            for sd in (st.seeds if st.seeds is not None else cfg.seeds)]
    rows: List[dict] = []
    t0 = time.time()

    def note(res):
        if progress and res:
            r = res[0]
            print(f"[counterfactual] {r['setting']} seed {r['seed']}: {r['job_seconds']:.0f}s "
                  f"(elapsed {time.time() - t0:.0f}s)", flush=True)

    if workers <= 1:
        for j in jobs:
            res = run_cf_job(j)
            note(res)
            rows += res
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for res in pool.imap_unordered(run_cf_job, jobs):
                note(res)
                rows += res
    order = {(st.name, sd): i for i, (st, sd, _) in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["setting"], r["seed"])])
    return rows


def config_dict(cfg: CFConfig) -> dict:
    return dataclasses.asdict(cfg)
