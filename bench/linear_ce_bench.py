"""Fused linear + cross-entropy benchmark: gdc_ext.linear_cross_entropy (recording) against the
logits-materialising paths and the other fused implementations.

For each shape [R x H] x [V x H] and dtype it times one training step (forward + backward of the
loss w.r.t. the hidden states and the weight) for every method, in the same invocation, round-
robin, and measures the peak extra memory of that step (CUDA: max_memory_allocated; CPU: the
process's RSS high-water mark in a fresh worker process, as bench/loss_bench.py does). Results go
to ``<out>/linear_ce.json``, ``<out>/linear_ce.md`` and ``<out>/linear_ce.png``.

    OMP_NUM_THREADS=2 python bench/linear_ce_bench.py --device cpu          # 4096x1024x32000 float32
    python bench/linear_ce_bench.py --device cpu --large                    # + up to 4096x4096x128256
    python bench/linear_ce_bench.py --device cuda                           # CUDA shapes, f32 + bf16

Methods:
  gdc_flce        gdc_ext.linear_cross_entropy(..., state=, sample ids): records per-sample dynamics
  carto_inplace   x @ W.T, then CartoLoss(inplace_grad=True, state=) (records)
  torch_ce        x @ W.T, then F.cross_entropy (records nothing)
  torch_chunked   F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions()) (records nothing)
  liger, cce      Liger-Kernel's fused linear cross-entropy, Apple's Cut Cross-Entropy (CUDA, when
                  importable; record nothing)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import (Timer, device_name, git_commit, maxrss_bytes, replace_file, reset_hwm,  # noqa: E402
                        slug, sync)

METHODS = ("gdc_flce", "carto_inplace", "torch_ce", "torch_chunked", "liger", "cce")
CUDA_ONLY = ("liger", "cce")
RECORDS = {"gdc_flce", "carto_inplace"}
CPU_SHAPES = ("4096x1024x32000",)
CPU_LARGE = ("4096x4096x128256",)
CUDA_SHAPES = ("8192x2048x32000", "8192x4096x128256")
CUDA_LARGE = ("16384x4096x128256",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEQ_LEN = 512        # rows per sample: one sample id per sequence
NUM_SAMPLES = 100_000


class Inputs:
    """Hidden states x [R, H] and weight W [V, H] (leaves that need gradients), targets [R] and
    per-sequence sample ids."""

    def __init__(self, R, H, V, dtype, device, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(R, H, generator=g, dtype=dtype, device=device).requires_grad_()
        self.W = (torch.randn(V, H, generator=g, dtype=dtype, device=device) / H ** 0.5).requires_grad_()
        self.target = torch.randint(0, V, (R,), generator=g, device=device)
        self.target[::97] = -100  # some ignored rows, as padding would give
        self.ids = torch.randint(0, NUM_SAMPLES, (max(1, R // SEQ_LEN),), generator=g, device=device)

    def reset(self):
        self.x.grad = None
        self.W.grad = None


def make_method(name: str, inp: Inputs) -> Callable[[], torch.Tensor]:
    """A closure computing the loss (its backward is the rest of the step)."""
    import gdc_ext

    if name == "gdc_flce":
        state = gdc_ext.CartoState(NUM_SAMPLES, burn_in=2, eps=0.1, device=inp.x.device)
        return lambda: gdc_ext.linear_cross_entropy(inp.x, inp.W, inp.target, inp.ids, state=state)
    if name == "carto_inplace":
        loss_fn = gdc_ext.CartoLoss(state=gdc_ext.CartoState(NUM_SAMPLES, burn_in=2, eps=0.1, device=inp.x.device),
                                    inplace_grad=True)
        return lambda: loss_fn(inp.x @ inp.W.t(), inp.target, inp.ids)
    if name == "torch_ce":
        return lambda: F.cross_entropy(inp.x @ inp.W.t(), inp.target)
    if name == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(inp.x, inp.W, inp.target, options=opts)
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda: liger_fused_linear_cross_entropy(inp.x, inp.W, inp.target)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda: cce(inp.x, inp.W, inp.target)
    raise ValueError(f"unknown method {name!r}")


def one_step(fn, inp: Inputs, timer: Optional[Timer] = None) -> None:
    inp.reset()
    if timer:
        timer.mark()
    loss = fn()
    if timer:
        timer.mark()
    loss.backward()
    if timer:
        timer.mark()


def time_methods(fns: dict, inp: Inputs, warmup: int, repeats: int) -> dict:
    """Round-robin over the methods, so load drift on a shared machine hits all alike."""
    out = {n: {"fwd": [], "bwd": []} for n in fns}
    dev = inp.x.device
    for it in range(warmup + repeats):
        for n, fn in fns.items():
            sync(dev)
            t = Timer(dev)
            one_step(fn, inp, t)
            fwd, bwd = t.read()
            if it >= warmup:
                out[n]["fwd"].append(fwd)
                out[n]["bwd"].append(bwd)
        print(f"  round {it + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    return out


def peak_cuda(fn, inp: Inputs) -> int:
    inp.reset()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one_step(fn, inp)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def worker(spec: dict) -> dict:
    """Fresh process: the RSS high-water mark of one step above a baseline taken once the inputs
    (and the method's state) exist and a small step has initialised thread pools and libraries."""
    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    small = Inputs(SEQ_LEN, 64, 256, dtype, torch.device("cpu"))
    one_step(make_method(spec["method"], small), small)
    del small
    inp = Inputs(spec["R"], spec["H"], spec["V"], dtype, torch.device("cpu"))
    fn = make_method(spec["method"], inp)
    gc.collect()
    hwm_reset = reset_hwm()
    base = maxrss_bytes()
    one_step(fn, inp)
    return {"peak_extra_bytes": maxrss_bytes() - base, "hwm_reset": hwm_reset}


def peak_cpu(name: str, R, H, V, dtype: str, threads: int) -> dict:
    spec = {"method": name, "R": R, "H": H, "V": V, "dtype": dtype, "threads": threads}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_shape(s: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"--shapes: expected RxHxV such as 4096x1024x32000, got {s!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


# ------------------------------------------------------------------------------------ reports
def targets(case: dict) -> list[str]:
    """The issue's targets for this case, checked (CPU: vs carto_inplace and torch_chunked; CUDA:
    memory vs cce, time vs liger)."""
    by = {r["method"]: r for r in case["rows"] if "median_s" in r}
    me = by.get("gdc_flce")
    if me is None:
        return []
    out = []

    def check(label, ok):
        out.append(f"- {label}: {'met' if ok else 'MISSED'}")

    if case["device"] == "cpu":
        if "carto_inplace" in by:
            check(f"time {me['median_s']:.2f} s <= matmul + CartoLoss(inplace) {by['carto_inplace']['median_s']:.2f} s",
                  me["median_s"] <= by["carto_inplace"]["median_s"])
        if "torch_chunked" in by:
            t = by["torch_chunked"]
            check(f"time {me['median_s']:.2f} s <= 0.8 x torch chunked ({0.8 * t['median_s']:.2f} s)",
                  me["median_s"] <= 0.8 * t["median_s"])
            if "peak_extra_bytes" in me and "peak_extra_bytes" in t:
                check(f"peak extra {me['peak_extra_bytes'] / 2**20:.0f} MiB <= torch chunked "
                      f"{t['peak_extra_bytes'] / 2**20:.0f} MiB", me["peak_extra_bytes"] <= t["peak_extra_bytes"])
    else:
        if "cce" in by and "peak_extra_bytes" in me and "peak_extra_bytes" in by["cce"]:
            check(f"peak extra {me['peak_extra_bytes'] / 2**20:.0f} MiB <= CCE {by['cce']['peak_extra_bytes'] / 2**20:.0f}"
                  " MiB", me["peak_extra_bytes"] <= by["cce"]["peak_extra_bytes"])
        if "liger" in by:
            check(f"time {me['median_s'] * 1e3:.1f} ms <= Liger {by['liger']['median_s'] * 1e3:.1f} ms",
                  me["median_s"] <= by["liger"]["median_s"])
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Fused linear + cross-entropy benchmark: {env['device_name']}", "",
             f"torch {env['torch']}, {env['threads']} threads (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), gdc_ext "
             f"commit `{env['git_commit'][:12]}`, {result['args']['repeats']} repeats (median), "
             f"{result['args']['warmup']} warmup. Machine load: start `{env['uptime_start']}`; end "
             f"`{env.get('uptime_end', '?')}` ({env['cpu_count']} CPUs).", "",
             "| shape R x H x V | dtype | method | records | fwd+bwd ms | fwd ms | bwd ms | time / carto_inplace | "
             "peak extra MiB | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in result["cases"]:
        shape = f"{c['R']}x{c['H']}x{c['V']}"
        ref = next((r for r in c["rows"] if r["method"] == "carto_inplace" and "median_s" in r), None)
        for r in c["rows"]:
            if "skipped" in r:
                lines.append(f"| {shape} | {c['dtype']} | {r['method']} | | – | – | – | – | – | skipped: {r['skipped']} |")
                continue
            mem = r.get("peak_extra_bytes")
            ratio = f"{r['median_s'] / ref['median_s']:.2f}" if ref else "–"
            lines.append(f"| {shape} | {c['dtype']} | {r['method']} | {'yes' if r['method'] in RECORDS else 'no'} | "
                         f"{r['median_s'] * 1e3:.0f} | {r['fwd_median_s'] * 1e3:.0f} | {r['bwd_median_s'] * 1e3:.0f} | "
                         f"{ratio} | {'–' if mem is None else f'{mem / 2**20:.0f}'} | {r.get('memory_error', '')} |")
        t = targets(c)
        if t:
            lines += ["", f"Targets ({shape} {c['dtype']}):"] + t + [""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.5 * sum(len(c["rows"]) for c in cases)),
                             constrained_layout=True)
    labels, times, mems = [], [], []
    for c in cases:
        for r in c["rows"]:
            if "median_s" not in r:
                continue
            labels.append(f"{c['R']}x{c['H']}x{c['V']} {c['dtype']}\n{r['method']}")
            times.append(r["median_s"] * 1e3)
            mems.append(r.get("peak_extra_bytes", float("nan")) / 2**20)
    colors = ["tab:green" if lab.endswith("gdc_flce") else "tab:blue" for lab in labels]
    for ax, vals, title in ((axes[0], times, "fwd+bwd ms (lower is better)"),
                            (axes[1], mems, "peak extra MiB (lower is better)")):
        bars = ax.barh(range(len(vals)), vals, color=colors)
        for b, v in zip(bars, vals):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.0f}", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.15)
    env = result["environment"]
    fig.suptitle(f"linear + cross-entropy: {env['device_name']}, torch {env['torch']}, {env['threads']} threads",
                 fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def write_outputs(result: dict, out: str) -> None:
    """linear_ce.{json,md,png}. Called after every case, so a run stopped by a time limit (a lent
    GPU machine's call) keeps what it measured."""
    for c in result["cases"]:
        c["targets"] = targets(c)
    replace_file(os.path.join(out, "linear_ce.json"), json.dumps(result, indent=1))
    replace_file(os.path.join(out, "linear_ce.md"), markdown(result))
    try:
        replace_file(os.path.join(out, "linear_ce.png"), lambda tmp: plot(result, tmp))
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="RxHxV (rows x hidden x vocabulary)")
    p.add_argument("--large", action="store_true", help=f"add the large shapes (CPU {' '.join(CPU_LARGE)}; CUDA "
                                                        f"{' '.join(CUDA_LARGE)})")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default CPU float32; CUDA bfloat16 float32")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device-name>/)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import gdc_ext

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    shapes = args.shapes or [parse_shape(s) for s in (CUDA_SHAPES if cuda else CPU_SHAPES)]
    if args.large:
        shapes += [parse_shape(s) for s in (CUDA_LARGE if cuda else CPU_LARGE)]
    dtypes = args.dtypes or (["bfloat16", "float32"] if cuda else ["float32"])
    name = device_name(device)
    env = {"device": device.type, "device_name": name, "torch": torch.__version__, "gdc_ext": gdc_ext.__version__,
           "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "git_commit": git_commit(), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "uptime_start": uptime()}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   slug(("" if cuda else "cpu-") + name))
    os.makedirs(out, exist_ok=True)
    result = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "cases": []}
    result["args"]["shapes"] = [f"{r}x{h}x{v}" for r, h, v in shapes]
    for R, H, V in shapes:
        for dt in dtypes:
            print(f"{R}x{H}x{V} {dt}", file=sys.stderr, flush=True)
            inp = Inputs(R, H, V, DTYPES[dt], device)
            fns, rows = {}, {}
            for m in args.methods:
                if m in CUDA_ONLY and not cuda:
                    rows[m] = {"method": m, "skipped": "CUDA only"}
                    continue
                try:
                    fns[m] = make_method(m, inp)
                    one_step(fns[m], inp)  # a peer that fails on this shape is dropped after one try
                    sync(device)
                except Exception as e:  # noqa: BLE001  (a missing or broken peer must not stop the run)
                    rows[m] = {"method": m, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                    fns.pop(m, None)
            times = time_methods(fns, inp, args.warmup, args.repeats)
            for m in fns:
                t = times[m]
                tot = [a + b for a, b in zip(t["fwd"], t["bwd"])]
                rows[m] = {"method": m, "median_s": statistics.median(tot), "fwd_median_s": statistics.median(t["fwd"]),
                           "bwd_median_s": statistics.median(t["bwd"]), "times_s": tot}
            if not args.no_memory:
                for m, fn in fns.items():
                    try:
                        if cuda:
                            rows[m]["peak_extra_bytes"] = peak_cuda(fn, inp)
                        else:
                            rows[m].update(peak_cpu(m, R, H, V, dt, torch.get_num_threads()))
                    except Exception as e:  # noqa: BLE001
                        rows[m]["memory_error"] = str(e)[:300]
            result["cases"].append({"R": R, "H": H, "V": V, "dtype": dt, "device": device.type,
                                    "rows": [rows[m] for m in args.methods if m in rows]})
            write_outputs(result, out)
            del inp, fns
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    env["uptime_end"] = uptime()
    write_outputs(result, out)
    md = markdown(result)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
