"""Cost of CartoState's lock (issue 17 item 7): one CartoLoss training step (forward + backward)
and one ``state.record`` call, with the state's real RLock against a no-op stand-in, on small
shapes where a fixed per-call cost would show most.

    OMP_NUM_THREADS=2 .venv/bin/python bench/lock_overhead.py [--shapes 64x128 512x1000 4096x8000] [--repeats 15]

The two variants run interleaved (A B A B ...) in rounds, so a burst of load on a shared machine
hits both alike; each round times ``--inner`` steps. The table gives the median per-step time
of each variant, the median of the per-round differences, and the noise as the interquartile
range of those differences. An uncontended RLock acquire/release pair costs under a
microsecond; a step takes the lock once (the fused kernel's recording in the forward), so that
is the overhead per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gdc_ext import CartoLoss, CartoState


class _NoLock:
    """Stands in for the RLock: what the code cost before the lock existed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _step_fn(R: int, V: int, kind: str):
    g = torch.Generator().manual_seed(0)
    N = max(R // 8, 1)
    state = CartoState(N, burn_in=1, eps=0.5)
    logits = torch.randn(R, V, generator=g)
    target = torch.randint(0, V, (R,), generator=g)
    ids = torch.randint(0, N, (R // 8 if R % 8 == 0 else R,), generator=g)
    loss_fn = CartoLoss(state=state)
    losses = torch.rand(R, generator=g)
    row_ids = torch.randint(0, N, (R,), generator=g)

    def train_step():
        x = logits.clone().requires_grad_()
        loss_fn(x, target, ids).backward()

    def record_step():
        state.record(losses, row_ids)

    return state, (train_step if kind == "step" else record_step)


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["64x128", "512x1000", "4096x8000"])
    ap.add_argument("--repeats", type=int, default=15, help="rounds (each times both variants)")
    ap.add_argument("--inner", type=int, default=0, help="steps per round (0: about 50 ms worth)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | shape [R, V] | no lock (us) | RLock (us) | difference (us) | noise: IQR of round diffs (us) |")
    print("|---|---|---|---|---|---|")
    for kind in ("step", "record"):
        for shape in args.shapes:
            R, V = (int(v) for v in shape.split("x"))
            state, fn = _step_fn(R, V, kind)
            real = state._lock
            for _ in range(3):
                fn()  # warm-up
            inner = args.inner or max(1, int(0.05 / max(_time(fn, 3), 1e-7)))
            rows = {"none": [], "lock": []}
            diffs = []
            for _ in range(args.repeats):
                state._lock = _NoLock()
                a = _time(fn, inner)
                state._lock = real
                b = _time(fn, inner)
                rows["none"].append(a)
                rows["lock"].append(b)
                diffs.append(b - a)
            q = statistics.quantiles(diffs, n=4)
            m0, m1 = statistics.median(rows["none"]), statistics.median(rows["lock"])
            print(f"| {'CartoLoss fwd+bwd' if kind == 'step' else 'state.record'} | {R}x{V} | {m0 * 1e6:.1f} | "
                  f"{m1 * 1e6:.1f} | {statistics.median(diffs) * 1e6:+.2f} | {(q[2] - q[0]) * 1e6:.2f} |")
    lock = CartoState(1, burn_in=1)._lock
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            pass
    print(f"\nuncontended RLock enter+exit: {(time.perf_counter() - t0) / n * 1e9:.0f} ns")


if __name__ == "__main__":
    main()
