"""Data cartography for a denoising-diffusion model on tabular data: do the scores find duplicates?

A small DDPM (an MLP that predicts the added noise) trains on synthetic tabular rows, some of
which are duplicated many times in the training set. Cross-entropy does not apply, so each step
records the per-sample noise-prediction MSE with ``CartoState.record`` (several noise draws per
sample and step, averaged, to tame the noise of the diffusion loss). At the end, each score is
used to rank the samples and its AUROC for "is a copy of a duplicated row" is printed:
difficulty (mean loss over the burn-in epochs), memorization (forget rate at --eps), -last loss,
and gain (difficulty - last loss: how much the loss fell). AUROC 0.5 is chance; below 0.5 the
score ranks duplicates *last*.

    python examples/diffusion_tabular.py            # defaults: < 1 min on a CPU
    python examples/diffusion_tabular.py --help
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

import gdc_ext


def make_data(rows: int, dims: int, dup_rows: int, copies: int, seed: int):
    """Rows from a random Gaussian mixture; ``dup_rows`` of them appear ``copies`` times each.
    Returns (x [N, dims] float32, is_dup [N] bool), N = rows + dup_rows * (copies - 1)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, dims, generator=g) * 2.0
    comp = torch.randint(0, 8, (rows,), generator=g)
    base = centers[comp] + torch.randn(rows, dims, generator=g) * 0.5
    dup = torch.randperm(rows, generator=g)[:dup_rows]
    x = torch.cat([base, base[dup].repeat(copies - 1, 1)])
    is_dup = torch.zeros(len(x), dtype=torch.bool)
    is_dup[dup] = True
    is_dup[rows:] = True
    x = (x - x.mean(0)) / x.std(0)
    return x, is_dup


class Denoiser(nn.Module):
    """eps_hat(x_t, t): an MLP on the noisy row and a sinusoidal embedding of the step."""

    def __init__(self, dims: int, width: int, steps: int):
        super().__init__()
        self.steps = steps
        self.net = nn.Sequential(nn.Linear(dims + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dims))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.arange(8, dtype=torch.float32) * (-math.log(1000.0) / 8))
        ang = (t.float() / self.steps)[:, None] * 1000.0 * freqs[None]
        return self.net(torch.cat([x, ang.sin(), ang.cos()], 1))


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half); NaN
    scores rank lowest."""
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    pos = np.asarray(positive, dtype=bool)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs positives and negatives")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run(args) -> dict:
    torch.manual_seed(args.seed)
    x, is_dup = make_data(args.rows, args.dims, args.dup_rows, args.copies, args.seed)
    N = len(x)
    betas = torch.linspace(1e-4, 0.05, args.steps)
    abar = torch.cumprod(1 - betas, 0)
    model = Denoiser(args.dims, args.width, args.steps)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = gdc_ext.CartoState(N, burn_in=args.burn_in, eps=args.eps)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    for _epoch in range(args.epochs):
        for ids in torch.randperm(N, generator=g).split(args.batch_size):
            x0 = x[ids].repeat(args.draws, 1)                # several noise draws per sample
            # stratified steps: draw k of every sample falls in the k-th of `draws` equal ranges of
            # t, so each sample's mean loss covers all noise levels (far less noisy than iid t)
            k = torch.arange(args.draws).repeat_interleave(len(ids))
            t = ((k + torch.rand(len(x0), generator=g)) * (args.steps / args.draws)).long().clamp(max=args.steps - 1)
            noise = torch.randn(x0.shape, generator=g)
            a = abar[t][:, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            mse = ((model(xt, t) - noise) ** 2).mean(1)      # per-row noise-prediction MSE [draws * B]
            mse.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.record(mse, ids.repeat(args.draws))        # epoch loss of a sample: mean of its draws
        state.end_epoch()
    s = state.scores()
    diff = s.difficulty.numpy()
    last = s.last_loss.numpy()
    dup = is_dup.numpy()
    result = {
        "samples": N, "duplicated_samples": int(dup.sum()), "seconds": time.time() - t0,
        "auroc": {"difficulty": auroc(diff, dup), f"memorization (eps={args.eps})": auroc(s.memorization.numpy(), dup),
                  "-last loss": auroc(-last, dup), "gain (difficulty - last loss)": auroc(diff - last, dup)},
        "mean_last_loss": {"duplicated": float(last[dup].mean()), "other": float(last[~dup].mean())},
    }
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="distinct rows")
    p.add_argument("--dims", type=int, default=8, help="columns")
    p.add_argument("--dup-rows", type=int, default=10, help="rows that are duplicated")
    p.add_argument("--copies", type=int, default=10, help="copies of each duplicated row in the training set")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--burn-in", type=int, default=20, help="epochs whose losses define difficulty")
    p.add_argument("--eps", type=float, default=0.3, help="forget threshold on the per-sample MSE")
    p.add_argument("--steps", type=int, default=100, help="diffusion steps")
    p.add_argument("--draws", type=int, default=8, help="noise draws per sample and training step")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a tiny model runs fastest on one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args)
    print(f"{r['samples']} samples, {r['duplicated_samples']} of them copies of {args.dup_rows} duplicated rows; "
          f"{args.epochs} epochs in {r['seconds']:.1f} s")
    print(f"mean last loss: duplicated {r['mean_last_loss']['duplicated']:.4f}, other {r['mean_last_loss']['other']:.4f}")
    print("AUROC for 'is a duplicated row' (0.5 = chance):")
    for name, v in r["auroc"].items():
        print(f"  {name:32s} {v:.3f}")
    return r


if __name__ == "__main__":
    main()
