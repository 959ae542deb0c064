"""`make demo`: train a tiny language model with CartoLoss on a synthetic corpus made in code,
then print the per-quadrant summary of the recorded scores. CPU only, no downloads.

Corpus (N sequences): most follow a fixed low-entropy Markov chain (learnable, "easy"), some are
uniform noise ("hard"), and some are unique canaries: a fixed prefix then random secret digits
(the kind of sample a model memorizes).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gdc_ext import CartoLoss, CartoState, QUADRANT_NAMES, quadrants

VOCAB = 48
DIGITS = list(range(10, 20))           # token ids used as secret digits
PREFIX = [40, 41, 42, 43, 44, 45]      # the canary template's fixed prefix


def make_corpus(n: int, seq_len: int, seed: int = 0, noise_frac: float = 0.15, canary_frac: float = 0.05):
    """Returns tokens [n, seq_len] int64 and a group label per sequence (0 markov, 1 noise, 2 canary)."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(VOCAB, 0.08), size=VOCAB)  # peaked: low entropy per step
    tokens = np.zeros((n, seq_len), dtype=np.int64)
    group = np.zeros(n, dtype=np.int64)
    n_noise, n_canary = int(noise_frac * n), int(canary_frac * n)
    for i in range(n):
        if i < n_noise:
            tokens[i] = rng.integers(0, VOCAB, seq_len)
            group[i] = 1
        elif i < n_noise + n_canary:
            secret = rng.choice(DIGITS, seq_len - len(PREFIX))
            tokens[i] = PREFIX + list(secret)
            group[i] = 2
        else:
            t = rng.integers(0, VOCAB)
            for j in range(seq_len):
                tokens[i, j] = t
                t = rng.choice(VOCAB, p=trans[t])
    perm = rng.permutation(n)
    return torch.from_numpy(tokens[perm]), torch.from_numpy(group[perm])


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def summary_table(scores, codes, group) -> str:
    names = ["markov", "noise", "canary"]
    lines = [f"{'quadrant':<20}{'n':>6}{'mean d':>9}{'mean m':>9}  " + "".join(f"{g:>8}" for g in names)]
    m = scores.memorization if scores.memorization.dim() == 1 else scores.memorization[:, 0]
    for q in (0, 1, 2, 3, -1):
        sel = codes == q
        n = int(sel.sum())
        if n == 0 and q == -1:
            continue
        md = float(scores.difficulty[sel].mean()) if n else float("nan")
        mm = float(m[sel].mean()) if n else float("nan")
        per = "".join(f"{int((group[sel] == g).sum()):>8}" for g in range(3))
        lines.append(f"{QUADRANT_NAMES[q]:<20}{n:>6}{md:>9.3f}{mm:>9.3f}  {per}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=640)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--burn-in", type=int, default=3)
    p.add_argument("--eps", type=float, nargs="+", default=[2.0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    tokens, group = make_corpus(args.samples, args.seq_len + 1, seed=args.seed)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = CartoState(args.samples, burn_in=args.burn_in, eps=args.eps[0] if len(args.eps) == 1 else args.eps)
    loss_fn = CartoLoss(state=state)
    t0 = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(args.samples)
        total, steps = 0.0, 0
        for b in tqdm(range(0, args.samples, args.batch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            ids = order[b:b + args.batch]
            x, y = tokens[ids, :-1], tokens[ids, 1:]
            logits = model(x)
            loss = loss_fn(logits.reshape(-1, VOCAB), y.reshape(-1), ids)  # one id per sequence
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        state.end_epoch()
        print(f"epoch {epoch + 1}: mean training loss {total / steps:.3f}")
    scores = state.scores()
    m = scores.memorization if scores.memorization.dim() == 1 else scores.memorization[:, 0]
    q = quadrants(scores.difficulty, m)
    print(f"\ntrained {args.epochs} epochs on {args.samples} sequences in {time.time() - t0:.1f}s; "
          f"state: {state.nbytes() / 1024:.1f} KiB (O(N), independent of epochs)")
    print(f"thresholds: tau_d = {q.tau_d:.3f} nats (alpha_d = 0.75), tau_m = {q.tau_m:.3f} (alpha_m = 0.75), "
          f"eps = {scores.eps[0]} nats\n")
    print(summary_table(scores, q.codes, group))


if __name__ == "__main__":
    main()
