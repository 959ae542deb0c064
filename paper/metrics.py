"""Privacy and quality metrics for language models, each small enough to check by hand.

A "model" here is any callable mapping tokens [B, L] int64 to logits [B, L, V] (next-token
prediction at every position). Scores that feed membership inference are oriented so that
*higher means "more likely a training member"*.

- extraction: greedy decoding from a canary's prefix reproduces its secret exactly.
- exposure (Carlini et al., 2019, "The Secret Sharer"): log2 |R| - log2 rank, where rank is the
  canary's position among all |R| candidate secrets ordered by model likelihood; exact when the
  candidates are enumerated, estimated from a uniform sample of them otherwise.
- leakage (the paper's benchmark contamination): fraction of injected held-out sequences whose
  suffix is reproduced verbatim by greedy decoding from their prefix (plus the softer per-token
  recall).
- membership inference: loss, zlib ratio (Carlini et al., 2021) and min-k% prob (Shi et al., 2024)
  attacks; ROC, AUC (Mann-Whitney, ties count one half) and TPR at a fixed FPR.
- perplexity: exp of the mean token NLL.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["token_logprobs", "greedy_decode", "extraction_success", "secret_logprobs", "exposure_from_rank",
           "exposure_exact", "exposure_sampled", "canary_exposure", "leakage", "perplexity", "zlib_entropy",
           "loss_score", "zlib_score", "min_k_score", "roc_curve", "auc", "tpr_at_fpr", "mia_summary",
           "spearman", "mean_ci"]

Model = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------- model calls
@torch.no_grad()
def token_logprobs(model: Model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1: [n, L-1] float32."""
    out = []
    for b in range(0, tokens.shape[0], batch_size):
        x = tokens[b:b + batch_size]
        logp = torch.log_softmax(model(x[:, :-1]).float(), dim=-1)
        out.append(logp.gather(2, x[:, 1:, None])[..., 0].cpu())
    return torch.cat(out) if out else torch.zeros(0, max(tokens.shape[1] - 1, 0))


@torch.no_grad()
def greedy_decode(model: Model, prefix: torch.Tensor, steps: int, batch_size: int = 256) -> torch.Tensor:
    """Greedy continuation of each prefix [n, P]: [n, steps] int64 (full recompute per step, no cache)."""
    out = []
    for b in range(0, prefix.shape[0], batch_size):
        x = prefix[b:b + batch_size]
        for _ in range(steps):
            nxt = model(x)[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], 1)
        out.append(x[:, prefix.shape[1]:].cpu())
    return torch.cat(out) if out else torch.zeros(0, steps, dtype=torch.int64)


def extraction_success(model: Model, prefixes: torch.Tensor, secrets: torch.Tensor) -> np.ndarray:
    """[n] bool: greedy decoding from prefixes [n, P] gives exactly secrets [n, S]."""
    got = greedy_decode(model, prefixes, secrets.shape[1])
    return (got == secrets.cpu()).all(1).numpy()


@torch.no_grad()
def secret_logprobs(model: Model, prefix: torch.Tensor, candidates: torch.Tensor, batch_size: int = 2048) -> np.ndarray:
    """log p(candidate | prefix) summed over the candidate's tokens, for prefix [P] and
    candidates [n, S]: [n] float64."""
    x = torch.cat([prefix.expand(candidates.shape[0], -1), candidates], 1)
    lp = token_logprobs(model, x, batch_size)[:, prefix.shape[0] - 1:]
    return lp.double().sum(1).numpy()


# ----------------------------------------------------------------------------------- exposure
def exposure_from_rank(rank: float, space_size: float) -> float:
    """log2 |R| - log2 rank (rank 1 = the most likely candidate)."""
    return math.log2(space_size) - math.log2(rank)


def exposure_exact(canary_logp: float, candidate_logps: np.ndarray) -> float:
    """Exposure when candidate_logps holds every candidate's log-likelihood (the canary included).
    Rank = 1 + number of candidates strictly more likely than the canary."""
    c = np.asarray(candidate_logps, dtype=np.float64)
    return exposure_from_rank(1 + int((c > canary_logp).sum()), c.size)


def exposure_sampled(canary_logp: float, sample_logps: np.ndarray, space_size: float) -> float:
    """Exposure estimated from a uniform sample of candidates (the canary excluded): the rank is
    1 + (|R| - 1) * (fraction of sampled candidates strictly more likely). Resolution is about
    log2(sample size) bits; a canary no sample beats gets the maximum, log2 |R|."""
    s = np.asarray(sample_logps, dtype=np.float64)
    frac = float((s > canary_logp).mean()) if s.size else 0.0
    return exposure_from_rank(1 + (space_size - 1) * frac, space_size)


def canary_exposure(model: Model, prefix: torch.Tensor, secret: torch.Tensor, alphabet: Sequence[int],
                    n_samples: int = 2048, exact_max: int = 20000, seed: int = 0) -> float:
    """Exposure of one canary (prefix [P], secret [S]) whose secret is any string of S symbols from
    alphabet: exact enumeration when |alphabet|^S <= exact_max, uniform sampling otherwise."""
    alpha = torch.as_tensor(list(alphabet), dtype=torch.int64)
    S = secret.shape[0]
    space = len(alpha) ** S
    canary = float(secret_logprobs(model, prefix, secret[None])[0])
    if space <= exact_max:
        idx = np.stack(np.unravel_index(np.arange(space), (len(alpha),) * S), 1)
        cands = alpha[torch.from_numpy(idx)]
        return exposure_exact(canary, secret_logprobs(model, prefix, cands))
    rng = np.random.default_rng(seed)
    cands = alpha[torch.from_numpy(rng.integers(0, len(alpha), (n_samples, S)))]
    cands = cands[~(cands == secret).all(1)]
    return exposure_sampled(canary, secret_logprobs(model, prefix, cands), space)


# ----------------------------------------------------------------------------------- leakage, ppl
def leakage(model: Model, sequences: torch.Tensor, prefix_len: int) -> dict:
    """Greedy decoding from sequences[:, :prefix_len] against the rest. Returns
    {'exact': fraction reproduced verbatim, 'token_recall': mean fraction of suffix tokens right,
    'per_sequence': [n] bool}."""
    suffix = sequences[:, prefix_len:]
    got = greedy_decode(model, sequences[:, :prefix_len], suffix.shape[1])
    hit = (got == suffix.cpu())
    exact = hit.all(1).numpy()
    return {"exact": float(exact.mean()) if exact.size else float("nan"),
            "token_recall": float(hit.float().mean()) if exact.size else float("nan"), "per_sequence": exact}


def perplexity(model: Model, tokens: torch.Tensor, batch_size: int = 256) -> float:
    """exp(mean NLL) over all predicted tokens of tokens [n, L]."""
    return float(torch.exp(-token_logprobs(model, tokens, batch_size).double().mean()))


# ----------------------------------------------------------------------------------- MIA scores
def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed (level 9) UTF-8 text: Carlini et al.'s zlib entropy."""
    return len(zlib.compress(text.encode("utf-8"), 9))


def loss_score(token_lp: torch.Tensor) -> np.ndarray:
    """Loss attack (Yeom et al.): score = -mean NLL per sequence. token_lp: [n, T]."""
    return token_lp.double().mean(1).numpy()


def zlib_score(token_lp: torch.Tensor, texts: Sequence[str]) -> np.ndarray:
    """zlib-ratio attack: score = -(sequence NLL in nats) / (zlib entropy in bytes); a sample the
    model finds much easier than a generic compressor does looks memorized."""
    nll = -token_lp.double().sum(1).numpy()
    z = np.array([zlib_entropy(t) for t in texts], dtype=np.float64)
    return -nll / z


def min_k_score(token_lp: torch.Tensor, k: float = 0.2) -> np.ndarray:
    """Min-k% prob attack: score = mean log-prob of the k fraction of least likely tokens."""
    n_low = max(1, int(math.ceil(k * token_lp.shape[1])))
    low = torch.sort(token_lp.double(), dim=1).values[:, :n_low]
    return low.mean(1).numpy()


def roc_curve(members: np.ndarray, nonmembers: np.ndarray):
    """ROC of the rule "member if score >= threshold" over all thresholds: (fpr, tpr), both
    starting at 0 and ending at 1, tied scores stepping together."""
    s = np.concatenate([np.asarray(members, float), np.asarray(nonmembers, float)])
    y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each run of ties
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    tpr = np.r_[0.0, tp / max(len(members), 1)]
    fpr = np.r_[0.0, fp / max(len(nonmembers), 1)]
    return fpr, tpr


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member score > non-member score) + 0.5 P(tie) (Mann-Whitney U / (n1 n0))."""
    a, b = np.asarray(members, float), np.asarray(nonmembers, float)
    s = np.concatenate([a, b])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    u = ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among the thresholds whose FPR <= target (a strict, never interpolated reading)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def mia_summary(members: dict, nonmembers: dict) -> dict:
    """For each attack name: auc, tpr@1%fpr, tpr@0.1%fpr. members/nonmembers: name -> scores."""
    out = {}
    for name in members:
        fpr, tpr = roc_curve(members[name], nonmembers[name])
        out[name] = {"auc": auc(members[name], nonmembers[name]), "tpr@1%": tpr_at_fpr(fpr, tpr, 0.01),
                     "tpr@0.1%": tpr_at_fpr(fpr, tpr, 0.001)}
    return out


# ----------------------------------------------------------------------------------- statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties (NaN if either is constant)."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


# two-sided 97.5% quantiles of Student's t for df = 1..30 (beyond: the normal's 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values) -> tuple:
    """(mean, half-width of the 95% t-interval) over seeds; half-width NaN with one value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    t = _T975[v.size - 2] if v.size - 1 <= 30 else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(v.size))
