"""State benchmark: the sharded state (gdc_ext.ShardedCartoState) at scale, against today's
replicated CartoState where that still fits.

Rows (each with ``num_samples`` and ``world_size``):

- ``sharded``: one shard per rank of N samples over W gloo processes (W = 1: one process, no
  torch.distributed): bytes per sample per rank, ``end_epoch``, ``scores()``, quadrants and
  ``prune(0.05)`` on the shards (exact global thresholds / ties), one sampler epoch
  (``ShardedCartoSampler``: the draw, then the epoch's ids in order), a sharded checkpoint's save
  and load, the peak RSS of each phase above its start, per rank (the slowest rank's time);
- ``replicated``: today's code in one process (CartoState, its Scores, ``gdc_ext.prune``,
  ``Scores.quadrants``, ``CartoSampler`` listed, ``CartoState.save`` / ``load``), phases skipped
  where the machine's free memory is short;
- ``routing``: 2 gloo ranks, a CartoLoss step on [8192, 32000] float32 logits, 8192 rows from 16
  samples (ids per sequence), recording into a CartoState (no routing) and into a
  ShardedCartoState (routing every call, ``flush_every=1``; and ``flush_every=None``, exchanged at
  end_epoch), plus the routing alone (per-call accumulator, remap, header all-gather,
  all_to_all) and its bytes.

Every phase runs in a fresh process (subprocess, then forked gloo ranks) so peaks are its own.
Outputs: ``state.json``, ``state.md`` and ``state.png`` in ``bench/results/<device>/`` (or --out).

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/state_bench.py --sizes 1e6 1e7 1e8 --distributed 2e8:4
    .venv/bin/python bench/state_bench.py --sizes 1e5 --distributed 4e5:4 --routing-n 100000 --quick
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from loss_bench import git_commit, maxrss_bytes, replace_file, reset_hwm, slug  # noqa: E402

BURN_IN = 2
EPOCHS = 3
CHUNK = 1 << 22  # ids per record() call when filling a shard


# ------------------------------------------------------------------------------------ helpers
def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 40


class Phase:
    """Times a phase and measures its RSS high-water mark above the RSS at its start."""

    def __init__(self, row: dict, name: str, barrier=None):
        self.row, self.name, self.barrier = row, name, barrier

    def __enter__(self):
        gc.collect()
        if self.barrier:
            self.barrier()
        reset_hwm()
        self.rss0 = rss_bytes()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.row[f"{self.name}_s"] = time.perf_counter() - self.t0
            self.row[f"{self.name}_extra_bytes"] = maxrss_bytes() - self.rss0
            self.row["peak_rss_bytes"] = max(self.row.get("peak_rss_bytes", 0), maxrss_bytes())
        return False


def fill(local, epoch: int, seed: int, first_id: int) -> None:
    """Records one synthetic epoch into a CartoState of n samples (rows = its local ids): a mean
    token loss per sample, drawn from a per-id generator, in chunks (CartoState.record)."""
    n = local.num_samples
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + first_id)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        losses = torch.rand(hi - lo, generator=g, dtype=torch.float64) * (5.0 - epoch)
        local.record(losses, torch.arange(lo, hi), counts=16.0)


# ------------------------------------------------------------------------------------ sharded rows
def sharded_rank(rank: int, world: int, spec: dict) -> dict:
    """One rank's measurements of the sharded state (W = 1: no torch.distributed)."""
    from gdc_ext import ShardedCartoSampler, ShardedCartoState
    from gdc_ext.sharded_checkpoint import load_sharded, save_sharded

    torch.set_num_threads(spec["threads"])
    barrier = torch.distributed.barrier if world > 1 else None
    N = spec["num_samples"]
    row = {"rank": rank}
    with Phase(row, "build", barrier):
        state = ShardedCartoState(N, BURN_IN, 0.1, extras=spec["extras"], flush_every=None)
    n = state.num_local
    row["num_local"] = n
    for e in range(EPOCHS):
        fill(state.local, e, 0, state.start)  # a rank records its own ids (as ShardedCartoSampler's draws are)
        if e < EPOCHS - 1:
            state.end_epoch()
    with Phase(row, "end_epoch", barrier):
        state.end_epoch()
    row["state_bytes"] = state.nbytes()
    row["bytes_per_sample"] = state.nbytes() / n
    with Phase(row, "scores", barrier):
        sc = state.scores()
    with Phase(row, "quadrants", barrier):
        q = sc.quadrants(0.75, 0.75, by="gain")
    with Phase(row, "prune", barrier):
        kept = sc.prune(0.05, by="gain")
    row["kept"] = int(kept.numel())
    row["counts"] = {str(k): int(v) for k, v in zip(*np.unique(q.codes.numpy(), return_counts=True))}
    del kept, sc
    with Phase(row, "sampler_draw", barrier):
        sampler = ShardedCartoSampler(state, q, gamma=2.0, seed=0)
        sampler.set_epoch(1)
    with Phase(row, "sampler_ids", barrier):
        ids = sampler.epoch_ids()
    row["sampler_len"] = len(sampler)
    del ids
    t0 = time.perf_counter()
    it = iter(sampler)
    for _ in range(min(len(sampler), 1_000_000)):
        next(it)
    row["sampler_iter_per_id_s"] = (time.perf_counter() - t0) / max(1, min(len(sampler), 1_000_000))
    del sampler, q
    folder = spec["folder"]
    with Phase(row, "save", barrier):
        save_sharded(state, folder)
    del state
    with Phase(row, "load", barrier):
        again = load_sharded(folder)
    row["load_peak_over_state"] = row["load_extra_bytes"] / row["state_bytes"]
    del again
    return row


def _rank_entry(rank, world, spec, store, out):
    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=3600))
    try:
        res = spec_runner(spec["kind"])(rank, world, spec)
    finally:
        torch.distributed.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)


def spec_runner(kind: str):
    return {"sharded": sharded_rank, "routing": routing_rank}[kind]


def run_world(spec: dict) -> list:
    """The ranks' results of ``spec`` in ``spec["world_size"]`` gloo processes forked from here."""
    world = spec["world_size"]
    if world == 1 and spec["kind"] == "sharded":
        return [sharded_rank(0, 1, spec)]
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="gdc-bench-")
    try:
        mp.start_processes(_rank_entry, args=(world, spec, os.path.join(tmp, "store"), tmp), nprocs=world,
                           join=True, start_method="fork")
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarise_sharded(ranks: list, spec: dict) -> dict:
    """One row: the slowest rank's times, the largest rank's bytes."""
    row = {"kind": "sharded", "num_samples": spec["num_samples"], "world_size": spec["world_size"],
           "extras": spec["extras"], "ranks": ranks}
    for key in ranks[0]:
        if key.endswith("_s") or key.endswith("_bytes") or key in ("bytes_per_sample", "load_peak_over_state",
                                                                    "num_local", "sampler_len"):
            row[key] = max(r[key] for r in ranks)
    row["kept"] = sum(r["kept"] for r in ranks)
    n = row["num_local"]
    for phase in ("quadrants", "prune", "sampler_draw", "sampler_ids", "load", "scores"):
        row[f"{phase}_extra_per_sample"] = row[f"{phase}_extra_bytes"] / n
    row["sampler_epoch_s"] = row["sampler_draw_s"] + row["sampler_ids_s"]
    return row


# ------------------------------------------------------------------------------------ replicated (today)
def replicated_row(spec: dict) -> dict:
    """Today's code on N samples in one process, phase by phase while memory allows."""
    import gdc_ext
    from gdc_ext import CartoSampler, CartoState

    torch.set_num_threads(spec["threads"])
    N = spec["num_samples"]
    row = {"kind": "replicated", "num_samples": N, "world_size": 1, "extras": spec["extras"], "skipped": []}
    with Phase(row, "build"):
        state = CartoState(N, BURN_IN, 0.1, extras=spec["extras"])
    for e in range(EPOCHS):
        fill(state, e, 0, 0)
        if e < EPOCHS - 1:
            state.end_epoch()
    with Phase(row, "end_epoch"):
        state.end_epoch()
    row["state_bytes"] = state.nbytes()
    row["bytes_per_sample"] = state.nbytes() / N
    need = {"scores": 80, "quadrants": 120, "prune": 150, "sampler": 120}  # bytes per sample, measured at 1e7
    sc = q = None
    for phase in ("scores", "quadrants", "prune", "sampler"):
        if need[phase] * N > 0.8 * mem_available() or (phase != "scores" and sc is None) \
                or (phase == "sampler" and q is None):
            row["skipped"].append(phase)
            continue
        if phase == "scores":
            with Phase(row, "scores"):
                sc = state.scores()
        elif phase == "quadrants":
            with Phase(row, "quadrants"):
                q = sc.quadrants(0.75, 0.75, by="gain")
        elif phase == "prune":
            with Phase(row, "prune"):
                kept = gdc_ext.prune(sc, 0.05, by="gain")
            row["kept"] = int(kept.numel())
            del kept
        else:
            sampler = CartoSampler(q, gamma=2.0, seed=0)
            with Phase(row, "sampler_epoch"):
                sampler.set_epoch(1)
                ids = list(sampler)
            row["sampler_len"] = len(ids)
            del ids, sampler
    del sc, q
    path = os.path.join(spec["folder"], "state.safetensors")
    os.makedirs(spec["folder"], exist_ok=True)
    with Phase(row, "save"):
        state.save(path)
    del state
    with Phase(row, "load"):
        again = CartoState.load(path)
    row["load_peak_over_state"] = row["load_extra_bytes"] / row["state_bytes"]
    del again
    for phase in ("quadrants", "prune", "sampler_epoch", "load", "scores"):
        if f"{phase}_extra_bytes" in row:
            row[f"{phase}_extra_per_sample"] = row[f"{phase}_extra_bytes"] / N
    return row


# ------------------------------------------------------------------------------------ routing
def routing_rank(rank: int, world: int, spec: dict) -> dict:
    """A CartoLoss step of [rows, vocab] float32 logits recording into a CartoState, a sharded state
    routing every call, and one routing at end_epoch; then the routing alone."""
    from gdc_ext import CartoLoss, CartoState, ShardedCartoState
    from gdc_ext.sharded import owner_of

    torch.set_num_threads(spec["threads"])
    dist = torch.distributed
    N, R, V, S = spec["num_samples"], spec["rows"], spec["vocab"], spec["samples"]
    g = torch.Generator().manual_seed(rank)
    logits = torch.randn(R, V, generator=g).requires_grad_()
    target = torch.randint(0, V, (R,), generator=g)
    states = {"carto": CartoState(N, BURN_IN, 0.1), "sharded": ShardedCartoState(N, BURN_IN, 0.1),
              "sharded_at_end": ShardedCartoState(N, BURN_IN, 0.1, flush_every=None)}
    losses = {k: CartoLoss(state=s) for k, s in states.items()}
    times = {k: [] for k in states}
    for step in range(spec["warmup"] + spec["repeats"]):
        ids = torch.randint(0, N, (S,), generator=g)  # 16 samples of R / 16 rows, ids per sequence
        for name, fn in losses.items():
            logits.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            fn(logits, target, ids).backward()
            dt = time.perf_counter() - t0
            if step >= spec["warmup"]:
                times[name].append(dt)
    row = {"rank": rank, "step_s": {k: statistics.median(v) for k, v in times.items()},
           "step_times_s": times}
    # end_epoch of the at-end state: the exchange of what the steps left pending
    pending = states["sharded_at_end"].nbytes() - states["sharded_at_end"].local.nbytes()
    dist.barrier()
    t0 = time.perf_counter()
    states["sharded_at_end"].end_epoch()
    row["at_end_exchange_s"] = time.perf_counter() - t0
    row["at_end_pending_bytes"] = pending
    # the routing alone: the same call recorded by CartoState.record and by the sharded record()
    per_row = torch.rand(R, generator=g, dtype=torch.float64)
    plain, sharded = CartoState(N, BURN_IN, 0.1), ShardedCartoState(N, BURN_IN, 0.1)
    alone = {"carto_record": [], "sharded_record": []}
    sent = []
    for step in range(spec["warmup"] + 3 * spec["repeats"]):
        ids = torch.randint(0, N, (S,), generator=g).repeat_interleave(R // S)
        remote = torch.unique(ids)
        remote = remote[owner_of(remote, N, world) != rank]
        for name, s in (("carto_record", plain), ("sharded_record", sharded)):
            dist.barrier()
            t0 = time.perf_counter()
            s.record(per_row, ids)
            dt = time.perf_counter() - t0
            if step >= spec["warmup"]:
                alone[name].append(dt)
        sent.append(int(remote.numel()) * (8 + 8 * sharded.local.acc.shape[1]))
    row["record_s"] = {k: statistics.median(v) for k, v in alone.items()}
    row["routing_s"] = row["record_s"]["sharded_record"] - row["record_s"]["carto_record"]
    row["routed_payload_bytes"] = statistics.mean(sent)
    row["header_bytes"] = world * (16 + world) * 8  # gathered int64 header (received by every rank)
    # who owns an id: contiguous ranges (used) against id % W, for one call's 8192 ids
    ids = torch.randint(0, N, (R,), generator=g)
    for name, fn in (("owner_contiguous_s", lambda: (owner_of(ids, N, world), ids - 0)),
                     ("owner_modulo_s", lambda: (ids % world, ids // world))):
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        row[name] = statistics.median(ts)
    return row


def summarise_routing(ranks: list, spec: dict) -> dict:
    r0 = ranks[0]
    step = {k: max(r["step_s"][k] for r in ranks) for k in r0["step_s"]}
    routing = max(r["routing_s"] for r in ranks)
    return {"kind": "routing", "num_samples": spec["num_samples"], "world_size": spec["world_size"],
            "rows": spec["rows"], "vocab": spec["vocab"], "samples": spec["samples"], "step_s": step,
            "step_overhead": {k: step[k] / step["carto"] - 1 for k in step},
            "routing_s": routing, "routing_fraction_of_step": routing / step["carto"],
            "record_s": r0["record_s"], "routed_payload_bytes": max(r["routed_payload_bytes"] for r in ranks),
            "header_bytes": r0["header_bytes"], "at_end_exchange_s": max(r["at_end_exchange_s"] for r in ranks),
            "at_end_pending_bytes": max(r["at_end_pending_bytes"] for r in ranks),
            "owner_contiguous_s": r0["owner_contiguous_s"], "owner_modulo_s": r0["owner_modulo_s"], "ranks": ranks}


# ------------------------------------------------------------------------------------ sampler alone
def sampler_row(spec: dict) -> dict:
    """ShardedCartoSampler over N ids in one process, without a state (quadrant codes drawn at
    random: 60 % easy, 20 % hard, 10 % memorized, 10 % outliers): its construction, a later
    epoch's set_epoch, the whole epoch's ids in order, and __iter__ per id; with gamma = 2 (integer
    multiplicities: the draw list is built once) and gamma = 1.5 (a Bernoulli draw per hard id)."""
    from types import SimpleNamespace

    from gdc_ext import CartoSampler, Quadrants, ShardedCartoSampler

    torch.set_num_threads(spec["threads"])
    N = spec["num_samples"]
    g = np.random.default_rng(0)
    codes = torch.from_numpy(g.choice(np.array([0, 1, 2, 3], dtype=np.int8), N, p=[0.6, 0.2, 0.1, 0.1]))
    shard = SimpleNamespace(start=0, num_local=N, num_samples=N, process_group=None)
    row = {"kind": "sampler", "num_samples": N, "world_size": 1}
    for gamma in (2.0, 1.5):
        key = "int" if gamma == 2.0 else "frac"
        with Phase(row, f"{key}_build"):
            sampler = ShardedCartoSampler(shard, Quadrants(codes, 0.0, 0.0), gamma=gamma, seed=0)
        with Phase(row, f"{key}_set_epoch"):
            sampler.set_epoch(1)
        with Phase(row, f"{key}_epoch_ids"):
            ids = sampler.epoch_ids()
        row[f"{key}_len"] = int(ids.size)
        del ids
        t0 = time.perf_counter()
        it = iter(sampler)
        for _ in range(min(len(sampler), 1_000_000)):
            next(it)
        row[f"{key}_iter_per_id_s"] = (time.perf_counter() - t0) / min(len(sampler), 1_000_000)
        del sampler, it
    if spec.get("replicated", True) and 60 * N < 0.8 * mem_available():
        old = CartoSampler(Quadrants(codes, 0.0, 0.0), gamma=2.0, seed=0)
        with Phase(row, "today_epoch"):
            old.set_epoch(1)
            listed = list(old)
        row["today_len"] = len(listed)
        del listed, old
    return row


# ------------------------------------------------------------------------------------ process plumbing
def worker(spec: dict) -> dict:
    if spec["kind"] == "replicated":
        return replicated_row(spec)
    if spec["kind"] == "sampler":
        return sampler_row(spec)
    ranks = run_world(spec)
    return summarise_sharded(ranks, spec) if spec["kind"] == "sharded" else summarise_routing(ranks, spec)


def in_subprocess(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        return {"kind": spec["kind"], "num_samples": spec["num_samples"], "world_size": spec["world_size"],
                "error": p.stderr.strip()[-800:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def estimate_bytes(spec: dict) -> int:
    """The whole worker's expected peak (all ranks), to skip a row that cannot fit: per rank the
    compact state (30 B / sample, 52 with the extras) and ~45 B / sample of Scores columns and a
    phase's temporaries (measured: 1e8 over 4 ranks peaked at 1.9 GiB per rank, 65 B / sample
    above the process), plus ~350 MiB per process."""
    state = 52 if spec["extras"] else 30
    if spec["kind"] == "sharded":
        return int(spec["num_samples"] * (state + 45)) + spec["world_size"] * (350 << 20)
    if spec["kind"] == "sampler":
        return int(spec["num_samples"] * 21) + (350 << 20)
    if spec["kind"] == "replicated":  # its later phases check the memory left themselves
        return int(spec["num_samples"] * (state + 8)) + (350 << 20)
    return spec["world_size"] * (3 * spec["rows"] * spec["vocab"] * 4 + (600 << 20)) + 3 * spec["num_samples"] * 200


# ------------------------------------------------------------------------------------ report
def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# State benchmark: {env['device_name']}", "",
             f"torch {env['torch']}, {env['threads']} thread(s) per process, gdc_ext commit `{env['git_commit'][:12]}`; "
             f"load average {env['loadavg_start'][0]:.1f} -> {env.get('loadavg_end', [float('nan')])[0]:.1f} on "
             f"{env['cpu_count']} CPUs, {env['mem_total_gib']:.0f} GiB RAM shared with other jobs. Times are one run "
             f"(the slowest rank); memory is each phase's RSS high-water mark above its start, per rank.", "",
             "| kind | N | W | B / sample / rank | end_epoch s | scores s | quadrants s | prune(0.05) s | "
             "prune extra B / sample | sampler epoch s | save s | load s | load peak / state | peak RSS GiB / rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["kind"] in ("routing", "sampler"):
            continue
        if "error" in r or "skipped_all" in r:
            lines.append(f"| {r['kind']} | {r['num_samples']:.0e} | {r['world_size']} | "
                         f"{r.get('error', r.get('skipped_all', ''))[:120]} |" + " |" * 10)
            continue
        get = r.get
        lines.append(
            f"| {r['kind']}{'' if r['extras'] else ' (no extras)'} | {r['num_samples']:.0e} | {r['world_size']} | "
            f"{fmt(get('bytes_per_sample'), '.1f')} | {fmt(get('end_epoch_s'), '.3f')} | {fmt(get('scores_s'), '.3f')} | "
            f"{fmt(get('quadrants_s'), '.3f')} | {fmt(get('prune_s'), '.3f')} | "
            f"{fmt(get('prune_extra_per_sample'), '.1f')} | {fmt(get('sampler_epoch_s'), '.3f')} | "
            f"{fmt(get('save_s'), '.2f')} | {fmt(get('load_s'), '.2f')} | {fmt(get('load_peak_over_state'), '.2f')} | "
            f"{fmt(get('peak_rss_bytes') and get('peak_rss_bytes') / 2**30, '.2f')} |")
    ratios = result.get("ratios")
    if ratios:
        lines += ["", "Sharded (W = 1) time / today's replicated CartoState, same N (lower is better; phases today's "
                      "code could not run here are left out):", "",
                  "| N | end_epoch | scores | quadrants | prune | sampler epoch | save | load | load peak |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for N, r in ratios.items():
            lines.append(f"| {float(N):.0e} | " + " | ".join(fmt(r.get(k)) for k in (
                "end_epoch", "scores", "quadrants", "prune", "sampler_epoch", "save", "load", "load_peak")) + " |")
    samplers = [r for r in result["rows"] if r["kind"] == "sampler" and "error" not in r and "skipped_all" not in r]
    if samplers:
        lines += ["", "## Sampler epoch (ShardedCartoSampler, one rank owning N ids; today's CartoSampler listed)", "",
                  "| N | multiplicities | construct s | set_epoch s | whole epoch's ids s | __iter__ ns / id | "
                  "today: set_epoch + list s |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in samplers:
            for key, label in (("int", "integer (gamma 2)"), ("frac", "fractional (gamma 1.5)")):
                lines.append(f"| {r['num_samples']:.0e} | {label} | {r[key + '_build_s']:.3f} | "
                             f"{r[key + '_set_epoch_s']:.3f} | {r[key + '_epoch_ids_s']:.2f} | "
                             f"{r[key + '_iter_per_id_s'] * 1e9:.0f} | "
                             f"{fmt(r.get('today_epoch_s') if key == 'int' else None)} |")
    for r in result["rows"]:
        if r["kind"] != "routing" or "error" in r:
            continue
        s = r["step_s"]
        lines += ["", f"## Routing: CartoLoss step on [{r['rows']}, {r['vocab']}] float32, {r['samples']} samples per "
                      f"call, {r['world_size']} gloo ranks, N = {r['num_samples']:.0e}", "",
                  "| recording into | step ms | vs CartoState |", "|---|---:|---:|"]
        for k, label in (("carto", "CartoState (no routing)"), ("sharded", "ShardedCartoState, routed every call"),
                         ("sharded_at_end", "ShardedCartoState, routed at end_epoch")):
            lines.append(f"| {label} | {s[k] * 1e3:.1f} | {r['step_overhead'][k] * 100:+.2f} % |")
        lines += ["", f"The routing alone (remap to the call's ids, header all-gather, all_to_all; sharded record() "
                      f"minus CartoState.record of the same {r['rows']} rows): {r['routing_s'] * 1e3:.2f} ms per call = "
                      f"{100 * r['routing_fraction_of_step']:.2f} % of the CartoState step; bytes sent per rank per call: "
                      f"{r['routed_payload_bytes']:.0f} (routed rows) + the header ({r['header_bytes']} bytes "
                      f"gathered). Routing at end_epoch instead: {r['at_end_exchange_s'] * 1e3:.1f} ms for the "
                      f"epoch's pending rows ({r['at_end_pending_bytes']} bytes held until then). Owner of the ids: "
                      f"{r['owner_contiguous_s'] * 1e6:.0f} us (contiguous ranges) vs {r['owner_modulo_s'] * 1e6:.0f} us "
                      f"(id % W), {r['rows']} ids."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["kind"] in ("sharded", "replicated") and "error" not in r
            and "skipped_all" not in r]
    phases = ("end_epoch_s", "quadrants_s", "prune_s", "sampler_epoch_s", "save_s", "load_s")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for kind, style in (("sharded", "-o"), ("replicated", "--s")):
        for i, ph in enumerate(phases):
            pts = sorted((r["num_samples"] / r["world_size"], r[ph]) for r in rows if r["kind"] == kind and ph in r)
            if pts:
                axes[0].plot(*zip(*pts), style, color=plt.get_cmap("tab10")(i), label=f"{ph[:-2]} ({kind})")
    axes[0].set(xscale="log", yscale="log", xlabel="samples per rank (N / W)", ylabel="seconds",
                title="phase time per rank (sharded: slowest rank)")
    axes[0].axhline(5, color="red", lw=0.8, ls=":")
    axes[0].legend(fontsize=7, ncol=2)
    for kind, style in (("sharded", "-o"), ("replicated", "--s")):
        for i, key in enumerate(("bytes_per_sample", "prune_extra_per_sample", "load_extra_per_sample")):
            pts = sorted((r["num_samples"] / r["world_size"], r[key]) for r in rows if r["kind"] == kind and key in r)
            if pts:
                axes[1].plot(*zip(*pts), style, color=plt.get_cmap("tab10")(i), label=f"{key} ({kind})")
    axes[1].set(xscale="log", xlabel="samples per rank (N / W)", ylabel="bytes per sample per rank",
                title="memory per sample per rank")
    axes[1].axhline(32, color="red", lw=0.8, ls=":", label="32 B target")
    axes[1].legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"gdc_ext state benchmark: {env['device_name']}, torch {env['torch']}", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ratios(rows: list) -> dict:
    out = {}
    for r in rows:
        if r["kind"] != "sharded" or r["world_size"] != 1 or "error" in r:
            continue
        old = next((o for o in rows if o["kind"] == "replicated" and o["num_samples"] == r["num_samples"]
                    and "error" not in o), None)
        if old is None:
            continue
        pairs = {"end_epoch": "end_epoch_s", "scores": "scores_s", "quadrants": "quadrants_s", "prune": "prune_s",
                 "sampler_epoch": "sampler_epoch_s", "save": "save_s", "load": "load_s",
                 "load_peak": "load_peak_over_state"}
        out[str(r["num_samples"])] = {k: r[v] / old[v] for k, v in pairs.items() if v in r and old.get(v)}
    return out


def write_outputs(result: dict, out: str) -> None:
    result["ratios"] = ratios(result["rows"])
    replace_file(os.path.join(out, "state.json"), json.dumps(result, indent=1))
    replace_file(os.path.join(out, "state.md"), markdown(result))
    if any(r["kind"] in ("sharded", "replicated") and "error" not in r and "skipped_all" not in r
           for r in result["rows"]):
        replace_file(os.path.join(out, "state.png"), lambda tmp: plot(result, tmp))


def device_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    return "AMD EPYC" if "EPYC" in name else name
    except OSError:
        pass
    return platform.processor() or "cpu"


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", type=float, default=[1e6, 1e7, 1e8], help="N of the one-process rows")
    p.add_argument("--distributed", nargs="*", default=["2e8:4"], metavar="N:W", help="sharded rows over W gloo ranks")
    p.add_argument("--routing-n", type=float, default=1e6, help="N of the routing rows (0: skip them)")
    p.add_argument("--sampler-sizes", nargs="*", type=float, default=[1e7, 1e8], help="N of the sampler-only rows")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed steps of the routing rows")
    p.add_argument("--no-extras", action="store_true", help="states without the extra statistics")
    p.add_argument("--no-replicated", action="store_true", help="skip today's code")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--quick", action="store_true", help="a smoke run (fewer routing steps)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/cpu-<cpu name>/)")
    p.add_argument("--tmp", default=None, help="folder for the checkpoints written (default: a temp folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from tqdm import tqdm

    import gdc_ext  # noqa: F401  (fails early if the extension is not built)

    out = args.out or os.path.join(HERE, "results", slug("cpu-" + device_name()))
    os.makedirs(out, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix="gdc-state-bench-", dir=args.tmp)
    env = {"device": "cpu", "device_name": device_name(), "torch": torch.__version__,
           "python": platform.python_version(), "threads": args.threads, "git_commit": git_commit(),
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "loadavg_start": os.getloadavg(), "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
           "mem_available_start_gib": mem_available() / 2**30, "gdc_ext": gdc_ext.__version__}
    extras = not args.no_extras
    specs = []
    for N in args.sizes:
        specs.append(dict(kind="sharded", num_samples=int(N), world_size=1, extras=extras))
        if not args.no_replicated:
            specs.append(dict(kind="replicated", num_samples=int(N), world_size=1, extras=extras))
    for item in args.distributed:
        m = re.fullmatch(r"([0-9.e+]+):(\d+)", item)
        if not m:
            raise SystemExit(f"--distributed: expected N:W such as 2e8:4, got {item!r}")
        specs.append(dict(kind="sharded", num_samples=int(float(m.group(1))), world_size=int(m.group(2)), extras=extras))
    for N in args.sampler_sizes:
        specs.append(dict(kind="sampler", num_samples=int(N), world_size=1, extras=False,
                          replicated=not args.no_replicated))
    if args.routing_n:
        specs.append(dict(kind="routing", num_samples=int(args.routing_n), world_size=2, extras=True, rows=args.rows,
                          vocab=args.vocab, samples=args.samples, warmup=1,
                          repeats=2 if args.quick else args.repeats))
    result = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": []}
    bar = tqdm(specs, desc="state bench", unit="row")
    without_extras = set()  # N whose sharded row had to drop the extras: its replicated row does too
    for i, spec in enumerate(bar):
        spec.update(threads=args.threads, folder=os.path.join(tmp_root, f"row{i}"))
        if spec["kind"] == "replicated" and spec["num_samples"] in without_extras:
            spec["extras"] = False
        bar.set_description(f"{spec['kind']} N={spec['num_samples']:.0e} W={spec['world_size']}")
        need, free = estimate_bytes(spec), mem_available()
        if need > 0.85 * free and spec["kind"] != "replicated":
            if spec.get("extras") and estimate_bytes(dict(spec, extras=False)) <= 0.85 * free:
                spec["extras"] = False  # the row still runs, without the extra statistics (noted in the table)
                if spec["world_size"] == 1:
                    without_extras.add(spec["num_samples"])
            else:
                result["rows"].append({"kind": spec["kind"], "num_samples": spec["num_samples"],
                                       "world_size": spec["world_size"], "extras": spec.get("extras"),
                                       "skipped_all": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
                write_outputs(result, out)
                continue
        if spec["kind"] == "replicated" and need > 0.85 * free:
            result["rows"].append({"kind": "replicated", "num_samples": spec["num_samples"], "world_size": 1,
                                   "extras": spec["extras"], "skipped_all": f"needs ~{need / 2**30:.1f} GiB, "
                                   f"{free / 2**30:.1f} GiB free"})
            write_outputs(result, out)
            continue
        row = in_subprocess(spec)
        row["loadavg_after"] = os.getloadavg()
        result["rows"].append(row)
        shutil.rmtree(spec["folder"], ignore_errors=True)
        write_outputs(result, out)
    env["loadavg_end"] = os.getloadavg()
    write_outputs(result, out)
    shutil.rmtree(tmp_root, ignore_errors=True)
    print(markdown(result))
    print(f"wrote {out}/state.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
