"""Loss benchmark: CartoLoss against F.cross_entropy (and, on CUDA, its usual replacements).

For each shape [R, V] and dtype it times one training step of the loss (forward + backward) for
every method in the same invocation, measures the peak extra memory of that step, the achieved
bandwidth, and (optionally) the cost of ``CartoState.end_epoch()``. Results go to
``<out>/results.json``, ``<out>/results.md`` and ``<out>/results.png``; see bench/README.md for
the columns.

    OMP_NUM_THREADS=2 python bench/loss_bench.py --device cpu --shapes 4096x32000 --repeats 5
    python bench/loss_bench.py --device cuda            # all CUDA shapes, float32 and bfloat16

The rows of one shape are B = R / seq_len sequences of seq_len tokens; each sequence is one
sample of a dataset of --num-samples samples, and sample ids are given per sequence ([B]).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

METHODS = ("torch_ce", "naive_record", "carto", "carto_inplace", "carto_norecord", "carto_cartography",
           "torch_compile", "liger", "cce")
CUDA_ONLY = ("torch_compile", "liger", "cce")
CPU_SHAPES = ("4096x32000",)
CUDA_SHAPES = ("8192x32000", "8192x50257", "8192x128256", "8192x151936")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One benchmarked configuration: R rows of V classes, in groups of seq_len rows per sample."""

    R: int
    V: int
    dtype: torch.dtype
    device: torch.device
    seq_len: int
    num_samples: int     # N, the dataset size the state and the naive matrix are sized for
    epochs: int          # T, rows of the naive T x N loss matrix
    eps: float
    hidden: int          # D of the equivalent hidden states (Cut Cross-Entropy only)
    plain_leaf: bool     # logits a plain leaf (True) or a view of one, as out of an LM head (False)

    @property
    def B(self) -> int:
        return self.R // self.seq_len

    @property
    def logits_bytes(self) -> int:
        return self.R * self.V * torch.empty((), dtype=self.dtype).element_size()


class Inputs:
    """The shared logits buffer (restored from a master copy before every step), targets and
    per-sequence sample ids. One instance serves every method, so only one working copy exists."""

    def __init__(self, case: Case, seed: int = 0, master: bool = True):
        dev = case.device
        g = torch.Generator(device=dev).manual_seed(seed)
        self.case = case
        # Drawn directly in the dtype on the device: no temporary raises the memory baseline.
        self.leaf = torch.randn(case.R, case.V, generator=g, dtype=case.dtype, device=dev)
        self.master = self.leaf.clone() if master else None
        self.leaf.requires_grad_(True)
        self.target = torch.randint(0, case.V, (case.R,), generator=g, device=dev)
        self.seq_ids = torch.randperm(case.num_samples, generator=g, device=dev)[:case.B]
        # Row -> position of its sequence in the batch (for the naive per-sample means).
        self.group = torch.arange(case.B, device=dev).repeat_interleave(case.seq_len)

    def logits(self) -> torch.Tensor:
        """What the loss sees: the leaf, or a view of it (a non-leaf, like an LM head's output,
        whose gradient autograd hands over instead of copying)."""
        return self.leaf if self.case.plain_leaf else self.leaf.view(self.case.R, self.case.V)

    def reset(self) -> None:
        """Outside the timed region: restore the logits (in-place methods overwrite them) and
        drop the previous gradient."""
        self.leaf.grad = None
        if self.master is not None:
            with torch.no_grad():
                self.leaf.copy_(self.master)


# ------------------------------------------------------------------------------------ methods
class Method:
    """One way of computing the training loss. ``fwd`` returns the scalar loss; ``bwd`` runs
    backward; neither reads a value back to the host."""

    note = ""
    bytes_factor: Optional[float] = 3.0  # logits-sized passes the step must make at least

    def __init__(self, case: Case, inp: Inputs):
        self.case, self.inp = case, inp

    def fwd(self) -> torch.Tensor:
        raise NotImplementedError

    def bwd(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reset(self) -> None:
        """Outside the timed region: drop what the previous step left behind (beyond Inputs)."""

    def state_bytes(self) -> int:
        return 0


class TorchCE(Method):
    def fwd(self):
        return F.cross_entropy(self.inp.logits(), self.inp.target)


class NaiveRecord(Method):
    """What a user writes today: per-token losses, per-sample means, a T x N float32 matrix."""

    note = "T x N matrix"

    def __init__(self, case, inp):
        super().__init__(case, inp)
        self.L = torch.full((case.epochs, case.num_samples), float("nan"), dtype=torch.float32, device=case.device)
        self.step = 0

    def fwd(self):
        inp = self.inp
        rows = F.cross_entropy(inp.logits(), inp.target, reduction="none")
        with torch.no_grad():
            sums = torch.zeros(self.case.B, dtype=torch.float32, device=rows.device)
            sums.index_add_(0, inp.group, rows.detach().float())
            counts = torch.bincount(inp.group, minlength=self.case.B)
            self.L[self.step % self.case.epochs].index_copy_(0, inp.seq_ids, sums / counts)
        self.step += 1
        return rows.mean()

    def state_bytes(self):
        return self.L.numel() * self.L.element_size()


class Carto(Method):
    inplace = False
    record = True
    cartography = False  # the opt-in cartography group (p(y) and argmax sums, +34 bytes per sample)

    def __init__(self, case, inp):
        super().__init__(case, inp)
        from gdc_ext import CartoLoss, CartoState

        kw = {"cartography": True} if self.cartography else {}
        self.state = CartoState(case.num_samples, burn_in=2, eps=case.eps, device=case.device, **kw) \
            if self.record else None
        self.loss = CartoLoss(state=self.state, inplace_grad=self.inplace)

    def fwd(self):
        if self.record:
            return self.loss(self.inp.logits(), self.inp.target, self.inp.seq_ids)
        return self.loss(self.inp.logits(), self.inp.target)

    def state_bytes(self):
        return self.state.nbytes() if self.state is not None else 0


class CartoInplace(Carto):
    inplace = True
    note = "grad written over logits"


class CartoNoRecord(Carto):
    record = False


class CartoCartography(Carto):
    cartography = True
    note = "cartography=True (+34 B/sample)"


class TorchCompile(Method):
    note = "compile time excluded (warmup)"

    def __init__(self, case, inp):
        super().__init__(case, inp)
        self.fn = torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)

    def fwd(self):
        return self.fn(self.inp.logits(), self.inp.target)


class Liger(Method):
    note = "Liger-Kernel; grad written over logits"

    def __init__(self, case, inp):
        super().__init__(case, inp)
        from liger_kernel.transformers import LigerCrossEntropyLoss

        self.loss = LigerCrossEntropyLoss()

    def fwd(self):
        return self.loss(self.inp.logits(), self.inp.target)


class CCE(Method):
    """Apple's Cut Cross-Entropy takes hidden states and classifier weights, so it is timed on
    the equivalent [R, D] x [V, D] problem: its time includes the classifier matmul (forward and
    both weight/input gradients) that the other methods leave out."""

    bytes_factor = None

    def __init__(self, case, inp):
        super().__init__(case, inp)
        from cut_cross_entropy import linear_cross_entropy

        self.f = linear_cross_entropy
        self.note = f"fuses the classifier matmul (D={case.hidden}): not comparable 1:1"
        g = torch.Generator(device=case.device).manual_seed(1)
        D = case.hidden
        self.e = (torch.randn(case.R, D, generator=g, device=case.device) / math.sqrt(D)).to(case.dtype).requires_grad_()
        self.c = torch.randn(case.V, D, generator=g, device=case.device, dtype=case.dtype).requires_grad_()

    def reset(self):
        self.e.grad = None
        self.c.grad = None

    def fwd(self):
        return self.f(self.e, self.c, self.inp.target)


CLASSES: dict[str, Callable[[Case, Inputs], Method]] = {
    "torch_ce": TorchCE, "naive_record": NaiveRecord, "carto": Carto, "carto_inplace": CartoInplace,
    "carto_norecord": CartoNoRecord, "carto_cartography": CartoCartography, "torch_compile": TorchCompile,
    "liger": Liger, "cce": CCE,
}


# ------------------------------------------------------------------------------------ timing
class Timer:
    """Wall-clock marks: perf_counter on CPU; CUDA events on CUDA (no synchronisation until
    ``read``, which runs outside the timed region)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def read(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(m: Method, timer: Optional[Timer] = None) -> None:
    if timer:
        timer.mark()
    loss = m.fwd()
    if timer:
        timer.mark()
    m.bwd(loss)
    if timer:
        timer.mark()


def time_methods(methods: dict[str, Method], inp: Inputs, device, warmup: int, repeats: int, bar) -> dict:
    """Round-robin over the methods (so load drift on a shared machine hits all alike);
    returns {name: {"fwd": [...], "bwd": [...], "total": [...]}} in seconds."""
    out = {name: {"fwd": [], "bwd": [], "total": []} for name in methods}
    for it in range(warmup + repeats):
        for name, m in methods.items():
            inp.reset()
            m.reset()
            sync(device)
            timer = Timer(device)
            one_step(m, timer)
            fwd, bwd = timer.read()  # synchronises on CUDA, after the timed region
            if it >= warmup:
                out[name]["fwd"].append(fwd)
                out[name]["bwd"].append(bwd)
                out[name]["total"].append(fwd + bwd)
            bar.update(1)
    inp.reset()
    return out


def copy_bandwidth(x: torch.Tensor, repeats: int) -> dict:
    """Bytes/s of a device-to-device copy (read + write), the reference for achieved bandwidth.
    ``alloc`` times torch.empty_like(x).copy_(x) (on CPU that pays first-touch page faults, as
    every freshly allocated gradient does); ``prealloc`` copies into an existing buffer."""
    dev = x.device
    nbytes = 2 * x.numel() * x.element_size()
    res = {}
    for kind in ("alloc", "prealloc"):
        y = torch.empty_like(x) if kind == "prealloc" else None
        if y is not None:
            y.copy_(x)
        ts = []
        for i in range(repeats + 1):
            sync(dev)
            t = Timer(dev)
            t.mark()
            if y is None:
                z = torch.empty_like(x).copy_(x)
            else:
                y.copy_(x)
            t.mark()
            (dt,) = t.read()
            z = None  # noqa: F841  (freed outside the timed region)
            if i:
                ts.append(dt)
        res[kind] = nbytes / statistics.median(ts)
        del y
    res["reference"] = max(res["alloc"], res["prealloc"])
    return res


# ------------------------------------------------------------------------------------ memory
def peak_cuda(m: Method, inp: Inputs) -> int:
    inp.reset()
    m.reset()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one_step(m)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def maxrss_bytes() -> int:
    """The process's RSS high-water mark. getrusage's ru_maxrss (KiB on Linux) also counts the
    parent's peak at the fork/exec that started this process (the kernel folds the old address
    space's high-water mark into it at exec), so a worker started by a large benchmark process
    would read the parent's peak; VmHWM is this address space's own mark, and clear_refs resets
    it. ru_maxrss is the fallback where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict) -> dict:
    """Runs in a fresh process: measures the high-water mark of one forward + backward above a
    baseline taken once the inputs (and the method's persistent state) are allocated and touched."""
    torch.set_num_threads(spec["threads"])
    import gdc_ext  # noqa: F401

    case = Case(R=spec["R"], V=spec["V"], dtype=DTYPES[spec["dtype"]], device=torch.device("cpu"),
                seq_len=spec["seq_len"], num_samples=spec["num_samples"], epochs=spec["epochs"], eps=spec["eps"],
                hidden=spec["hidden"], plain_leaf=spec["plain_leaf"])
    cls = CLASSES[spec["method"]]
    # A small step first, so thread pools and lazily initialised library state are not counted.
    small = Case(**{**case.__dict__, "R": case.seq_len, "num_samples": 4})
    small_inp = Inputs(small, master=False)
    one_step(cls(small, small_inp))
    del small_inp
    gc.collect()
    inp = Inputs(case, master=False)
    m = cls(case, inp)
    gc.collect()
    hwm_reset = reset_hwm()
    base = maxrss_bytes()
    one_step(m)
    peak = maxrss_bytes()
    alias = inp.leaf.grad is not None and inp.leaf.grad.data_ptr() == inp.leaf.data_ptr()
    return {"peak_extra_bytes": peak - base, "baseline_bytes": base, "grad_aliases_logits": alias,
            "hwm_reset": hwm_reset}


def reset_hwm() -> bool:
    """Resets the process's high-water mark to its current RSS (Linux >= 4.0), so that peaks
    reached earlier (importing torch, say) cannot hide the step's. ru_maxrss follows it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_cpu(name: str, case: Case, threads: int) -> dict:
    spec = {"method": name, "R": case.R, "V": case.V, "dtype": str(case.dtype).split(".")[-1],
            "seq_len": case.seq_len, "num_samples": case.num_samples, "epochs": case.epochs, "eps": case.eps,
            "hidden": case.hidden, "plain_leaf": case.plain_leaf, "threads": threads}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ end_epoch
def bench_end_epoch(sizes: list[int], device: torch.device, repeats: int, bar) -> list[dict]:
    from gdc_ext import CartoState

    rows = []
    for N in sizes:
        per_sample = 16 * 2 + 8 + 4 + 2  # acc (+ its refill source), fstats, istats, forgets (K = 1): compact default
        need = N * per_sample
        free = (torch.cuda.mem_get_info()[0] if device.type == "cuda" else _mem_available())
        if need > 0.8 * free:
            rows.append({"N": N, "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
            bar.update(repeats + 1)
            continue
        state = CartoState(N, burn_in=2, eps=0.1, device=device)
        g = torch.Generator(device="cpu").manual_seed(0)
        src = torch.empty(N, state.acc.shape[1], dtype=torch.float64)  # loss sum, token count
        src[:, 0] = torch.rand(N, generator=g, dtype=torch.float64) * 5
        src[:, 1] = 1.0
        src = src.to(device)
        ts = []
        for i in range(repeats + 1):
            state.acc.copy_(src)
            sync(device)
            t = Timer(device)
            t.mark()
            state.end_epoch()
            t.mark()
            (dt,) = t.read()
            if i:
                ts.append(dt)
            bar.update(1)
        med = statistics.median(ts)
        moved = 2 * (state.acc[0].nbytes + state.fstats[0].nbytes + state.istats[0].nbytes + state.forgets[0].nbytes)
        rows.append({"N": N, "median_s": med, "times_s": ts, "ns_per_sample": med / N * 1e9,
                     "bytes_moved": moved * N, "GBps": moved * N / med / 1e9, "state_bytes": state.nbytes()})
        del state, src
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 40


# ------------------------------------------------------------------------------------ environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "git_commit": git_commit(),
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "loadavg_start": os.getloadavg()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    try:
        import gdc_ext

        env["gdc_ext"] = gdc_ext.__version__
    except ImportError:
        pass
    return env


# ------------------------------------------------------------------------------------ reports
def fmt(x, spec=".2f", none="–"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Loss benchmark: {env['device_name']}", "",
             f"torch {env['torch']}, {env['threads']} threads, gdc_ext commit `{env['git_commit'][:12]}`, "
             f"{result['args']['repeats']} repeats (median), {result['args']['warmup']} warmup; "
             f"load average {env['loadavg_start'][0]:.1f} -> {env.get('loadavg_end', [float('nan')])[0]:.1f} "
             f"on {env['cpu_count']} CPUs.", "",
             "| shape | dtype | method | fwd+bwd ms | fwd ms | bwd ms | time / CE | speedup vs CE | "
             "peak extra MiB | extra / logits | GB/s | % copy BW | state MiB | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in result["cases"]:
        shape = f"{c['R']}x{c['V']}"
        for r in c["rows"]:
            if "skipped" in r:
                lines.append(f"| {shape} | {c['dtype']} | {r['method']} | – | – | – | – | – | – | – | – | – | – | "
                             f"skipped: {r['skipped']} |")
                continue
            mem = r.get("peak_extra_bytes")
            lines.append(
                f"| {shape} | {c['dtype']} | {r['method']} | {fmt(r['median_s'] * 1e3, '.1f')} | "
                f"{fmt(r['fwd_median_s'] * 1e3, '.1f')} | {fmt(r['bwd_median_s'] * 1e3, '.1f')} | "
                f"{fmt(r.get('time_ratio'))} | {fmt(r.get('speedup'))} | "
                f"{fmt(None if mem is None else mem / 2**20, '.0f')} | {fmt(r.get('mem_ratio'))} | "
                f"{fmt(r.get('GBps'), '.1f')} | {fmt(None if r.get('copy_bw_frac') is None else 100 * r['copy_bw_frac'], '.0f')} | "
                f"{fmt(r['state_bytes'] / 2**20, '.1f')} | {r.get('note', '')} |")
        cb = c.get("copy_bw")
        if cb:
            lines.append("")
            lines.append(f"{shape} {c['dtype']}: logits {c['logits_bytes'] / 2**20:.0f} MiB; copy bandwidth "
                         f"{cb['alloc'] / 1e9:.1f} GB/s (empty_like().copy_), {cb['prealloc'] / 1e9:.1f} GB/s "
                         f"(into an existing buffer); N = {c['num_samples']} samples, T = {c['epochs']} epochs.")
            lines.append("")
    if result.get("end_epoch"):
        lines += ["", "## end_epoch", "", "| N | median ms | ns / sample | GB/s | state MiB |", "|---:|---:|---:|---:|---:|"]
        for r in result["end_epoch"]:
            if "skipped" in r:
                lines.append(f"| {r['N']:.0e} | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {r['N']:.0e} | {r['median_s'] * 1e3:.2f} | {r['ns_per_sample']:.2f} | "
                             f"{r['GBps']:.1f} | {r['state_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    names = [n for n in METHODS if any(r["method"] == n and "skipped" not in r for c in cases for r in c["rows"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * max(4, len(names) * len(cases))), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(1, len(cases))
    panels = (("speedup", "speedup vs F.cross_entropy (fwd+bwd; higher is better)", 1.5, "target 1.5x"),
              ("mem_ratio", "peak extra memory / logits bytes (lower is better)", 0.1, "target 0.1x"))
    for ax, (key, title, target, tlabel) in zip(axes, panels):
        for ci, c in enumerate(cases):
            by = {r["method"]: r for r in c["rows"] if "skipped" not in r}
            ys = [i + (ci - (len(cases) - 1) / 2) * height for i in range(len(names))]
            vals = [by[n].get(key) if n in by else None for n in names]
            vals = [float("nan") if v is None else v for v in vals]
            bars = ax.barh(ys, vals, height=height * 0.9, color=colors(ci),
                           label=f"{c['R']}x{c['V']} {c['dtype']}")
            for b, v in zip(bars, vals):
                if not math.isnan(v):
                    ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.2f}", va="center", fontsize=9)
        ax.axvline(1.0, color="grey", lw=1)
        ax.axvline(target, color="red", lw=1, ls="--", label=tlabel)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.18)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    env = result["environment"]
    fig.suptitle(f"gdc_ext loss benchmark: {env['device_name']}, torch {env['torch']}, {env['threads']} threads",
                 fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def replace_file(path: str, content) -> None:
    """Writes ``content`` (a str, or a function that writes a given path) to a temporary file
    beside ``path`` and renames it over ``path``: a reader never sees half a file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{name}")  # keeps the extension savefig reads
    if isinstance(content, str):
        with open(tmp, "w") as fh:
            fh.write(content)
    else:
        content(tmp)
    os.replace(tmp, path)


def write_outputs(result: dict, out: str) -> None:
    """results.json, results.md and (with cases) results.png. Called after every case, so a run
    stopped by a time limit (a lent GPU machine's call) keeps what it measured."""
    replace_file(os.path.join(out, "results.json"), json.dumps(result, indent=1))
    replace_file(os.path.join(out, "results.md"), markdown(result))
    if result["cases"]:
        replace_file(os.path.join(out, "results.png"), lambda tmp: plot(result, tmp))


def parse_shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"--shapes: expected RxV such as 4096x32000, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--shapes", nargs="+", type=parse_shape, help=f"RxV (default CPU {' '.join(CPU_SHAPES)}; "
                   f"CUDA {' '.join(CUDA_SHAPES)})")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default CPU float32; CUDA bfloat16 float32")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--seq-len", type=int, default=512, help="rows per sample (one id per sequence)")
    p.add_argument("--num-samples", type=int, default=100_000, help="N, dataset size for CartoState / naive matrix")
    p.add_argument("--epochs", type=int, default=10, help="T, rows of the naive T x N loss matrix")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=4096, help="D for Cut Cross-Entropy's equivalent problem")
    p.add_argument("--plain-leaf", action="store_true",
                   help="pass the leaf itself as logits (default: a view of it, like an LM head's output)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--end-epoch", nargs="*", type=float, default=None, metavar="N",
                   help="also time CartoState.end_epoch() (sizes default CPU 1e6 1e7; CUDA 1e6 1e7 1e8)")
    p.add_argument("--end-epoch-only", action="store_true", help="run only the end_epoch section")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device-name>/)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from tqdm import tqdm

    import gdc_ext  # noqa: F401  (fails early if the extension is not built)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    shapes = args.shapes or [parse_shape(s) for s in (CUDA_SHAPES if cuda else CPU_SHAPES)]
    dtypes = args.dtypes or (["bfloat16", "float32"] if cuda else ["float32"])
    env = environment(device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   slug(("" if cuda else "cpu-") + env["device_name"]))
    os.makedirs(out, exist_ok=True)
    ee_sizes = None
    if args.end_epoch is not None or args.end_epoch_only:
        ee_sizes = [int(n) for n in (args.end_epoch or ([1e6, 1e7, 1e8] if cuda else [1e6, 1e7]))]

    result = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "cases": []}
    result["args"]["shapes"] = [f"{r}x{v}" for r, v in shapes]
    result["args"]["dtypes"] = dtypes
    cases = [] if args.end_epoch_only else [(R, V, dt) for R, V in shapes for dt in dtypes]
    total = len(cases) * len(args.methods) * ((args.warmup + args.repeats) + (0 if args.no_memory else 1))
    total += 0 if ee_sizes is None else len(ee_sizes) * (args.repeats + 1)
    bar = tqdm(total=total, desc="bench", unit="step")

    # end_epoch first: it is quick, and a run stopped by a time limit still has it.
    if ee_sizes is not None:
        bar.set_description("end_epoch")
        result["end_epoch"] = bench_end_epoch(ee_sizes, device, args.repeats, bar)
        write_outputs(result, out)
    for R, V, dt in cases:
        if R % args.seq_len:
            raise SystemExit(f"--shapes: rows {R} must be a multiple of --seq-len {args.seq_len}")
        case = Case(R=R, V=V, dtype=DTYPES[dt], device=device, seq_len=args.seq_len, num_samples=args.num_samples,
                    epochs=args.epochs, eps=args.eps, hidden=args.hidden, plain_leaf=args.plain_leaf)
        bar.set_description(f"{R}x{V} {dt}")
        inp = Inputs(case)
        methods, rows = {}, {}
        for name in args.methods:
            if name in CUDA_ONLY and not cuda:
                rows[name] = {"method": name, "skipped": "CUDA only"}
                bar.update(args.warmup + args.repeats + (0 if args.no_memory else 1))
                continue
            try:
                methods[name] = CLASSES[name](case, inp)
            except Exception as e:  # a missing or broken peer must not stop the benchmark
                rows[name] = {"method": name, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                bar.update(args.warmup + args.repeats + (0 if args.no_memory else 1))
        # A peer that imports but fails on this shape/dtype is dropped after one try.
        for name in list(methods):
            try:
                inp.reset()
                methods[name].reset()
                one_step(methods[name])
                sync(device)
            except Exception as e:
                rows[name] = {"method": name, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                del methods[name]
                bar.update(args.warmup + args.repeats + (0 if args.no_memory else 1))
        times = time_methods(methods, inp, device, args.warmup, args.repeats, bar)
        copy_bw = copy_bandwidth(inp.master, args.repeats)
        for name, m in methods.items():
            t = times[name]
            r = {"method": name, "median_s": statistics.median(t["total"]), "fwd_median_s": statistics.median(t["fwd"]),
                 "bwd_median_s": statistics.median(t["bwd"]), "min_s": min(t["total"]), "times_s": t["total"],
                 "fwd_s": t["fwd"], "bwd_s": t["bwd"], "state_bytes": m.state_bytes(), "note": m.note}
            if m.bytes_factor is not None:
                r["bytes_model"] = m.bytes_factor * case.logits_bytes
                r["GBps"] = r["bytes_model"] / r["median_s"] / 1e9
                r["copy_bw_frac"] = r["bytes_model"] / r["median_s"] / copy_bw["reference"]
            rows[name] = r
        if not args.no_memory:
            for name, m in methods.items():
                bar.set_description(f"{R}x{V} {dt} memory {name}")
                try:
                    if cuda:
                        rows[name]["peak_extra_bytes"] = peak_cuda(m, inp)
                    else:
                        w = peak_cpu(name, case, torch.get_num_threads())
                        rows[name]["peak_extra_bytes"] = w["peak_extra_bytes"]
                        rows[name]["grad_aliases_logits"] = w["grad_aliases_logits"]
                        rows[name]["hwm_reset"] = w["hwm_reset"]
                    rows[name]["mem_ratio"] = rows[name]["peak_extra_bytes"] / case.logits_bytes
                except Exception as e:
                    rows[name]["memory_error"] = str(e)[:300]
                bar.update(1)
        ce = rows.get("torch_ce", {})
        for r in rows.values():
            if "skipped" in r or "median_s" not in ce:
                continue
            r["time_ratio"] = r["median_s"] / ce["median_s"]
            r["speedup"] = ce["median_s"] / r["median_s"]
            if r.get("peak_extra_bytes") is not None and ce.get("peak_extra_bytes"):
                r["mem_vs_ce"] = r["peak_extra_bytes"] / ce["peak_extra_bytes"]
        result["cases"].append({"R": R, "V": V, "dtype": dt, "logits_bytes": case.logits_bytes,
                                "num_samples": case.num_samples, "epochs": case.epochs, "seq_len": case.seq_len,
                                "plain_leaf": case.plain_leaf, "copy_bw": copy_bw,
                                "rows": [rows[n] for n in args.methods if n in rows]})
        write_outputs(result, out)
        del methods, inp
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    bar.close()
    env["loadavg_end"] = os.getloadavg()  # other work on the machine skews CPU timings

    write_outputs(result, out)
    print(markdown(result))
    print(f"wrote {out}/results.{{json,md" + (",png}" if result["cases"] else "}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
