"""The README's speed rows from a benchmark run, so the README quotes the committed files exactly.

    python bench/readme_table.py bench/results/nvidia-h200                 # loss bench, bf16 8192x128256
    python bench/readme_table.py bench/results/cpu-amd-epyc --case 4096x32000:float32

Prints two Markdown tables: bench/loss_bench.py's methods for one case (default: the issue's
target cell, bfloat16 [8192 x 128256], when the run has it, else the first case) and, when the
folder holds linear_ce.json, bench/linear_ce_bench.py's methods for each of its cases. Reads only
results.json / linear_ce.json; prints nothing it did not find there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

LOSS_NAMES = {
    "torch_ce": "`F.cross_entropy`",
    "naive_record": 'naive recording (`reduction="none"` + T x N matrix)',
    "carto": "`CartoLoss` recording",
    "carto_inplace": "`CartoLoss` recording, `inplace_grad=True`",
    "carto_norecord": "`CartoLoss` without a state",
    "torch_compile": "`torch.compile(F.cross_entropy)`",
    "liger": "Liger-Kernel `LigerCrossEntropyLoss`",
    "cce": "Cut Cross-Entropy (fuses the classifier matmul)",
}
LINEAR_NAMES = {
    "gdc_flce": "`gdc_ext.linear_cross_entropy`",
    "carto_inplace": "matmul + `CartoLoss(inplace_grad=True)`",
    "torch_ce": "matmul + `F.cross_entropy`",
    "torch_chunked": "`F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`",
    "liger": "Liger-Kernel fused linear cross-entropy",
    "cce": "Cut Cross-Entropy",
}
RECORDS = {"naive_record", "carto", "carto_inplace", "gdc_flce"}


def _ms(s):
    return "–" if s is None else f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"


def _x(v, spec=".2f"):
    return "–" if v is None else f"{v:{spec}}x"


def loss_table(result: dict, case: str | None) -> str:
    cases = result["cases"]
    if not cases:
        raise SystemExit("results.json holds no cases")
    want = case or "8192x128256:bfloat16"
    pick = [c for c in cases if f"{c['R']}x{c['V']}:{c['dtype']}" == want]
    if not pick and case:
        have = ", ".join(f"{c['R']}x{c['V']}:{c['dtype']}" for c in cases)
        raise SystemExit(f"--case: {case!r} is not in results.json (it has {have})")
    c = pick[0] if pick else cases[0]
    env = result["environment"]
    lines = [f"{env.get('device_name', '?')}, {c['dtype']} logits [{c['R']}, {c['V']}] "
             f"({c['logits_bytes'] / 2 ** 20:.0f} MiB), torch {env.get('torch', '?')}, commit "
             f"{env.get('git_commit', '?')}:", "",
             "| method | records | fwd+bwd | speedup vs `F.cross_entropy` | peak extra memory / logits | % copy bandwidth |",
             "|---|---|---:|---:|---:|---:|"]
    for r in c["rows"]:
        name = LOSS_NAMES.get(r["method"], r["method"])
        if "skipped" in r:
            lines.append(f"| {name} | | skipped: {r['skipped']} | | | |")
            continue
        bw = r.get("copy_bw_frac")
        lines.append(f"| {name} | {'yes' if r['method'] in RECORDS else 'no'} | {_ms(r['median_s'])} | "
                     f"{_x(r.get('speedup'))} | {_x(r.get('mem_ratio'))} | {'–' if bw is None else f'{bw:.0%}'} |")
    ee = [f"N = {e['N']:.0e}: {_ms(e['median_s'])}" for e in result.get("end_epoch", []) if "median_s" in e]
    if ee:
        lines += ["", "`end_epoch` (one fold of the epoch's accumulators): " + ", ".join(ee) + "."]
    return "\n".join(lines)


def linear_table(result: dict) -> str:
    out = []
    for c in result["cases"]:
        out += [f"[{c['R']} x {c['H']}] x [{c['V']} x {c['H']}], {c['dtype']} ({c['device']}):", "",
                "| method | records | fwd+bwd | peak extra memory |", "|---|---|---:|---:|"]
        for r in c["rows"]:
            name = LINEAR_NAMES.get(r["method"], r["method"])
            if "skipped" in r:
                out.append(f"| {name} | | skipped: {r['skipped']} | |")
                continue
            mem = r.get("peak_extra_bytes")
            out.append(f"| {name} | {'yes' if r['method'] in RECORDS else 'no'} | {_ms(r['median_s'])} | "
                       f"{'–' if mem is None else f'{mem / 2 ** 20:.0f} MiB'} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a bench/results/<device>/ folder")
    p.add_argument("--case", default=None, help="RxV:dtype of the loss table (default 8192x128256:bfloat16)")
    args = p.parse_args(argv)
    loss = os.path.join(args.folder, "results.json")
    linear = os.path.join(args.folder, "linear_ce.json")
    if not os.path.exists(loss) and not os.path.exists(linear):
        raise SystemExit(f"folder: {args.folder!r} holds neither results.json nor linear_ce.json")
    if os.path.exists(loss):
        with open(loss) as fh:
            print(loss_table(json.load(fh), args.case))
        print()
    if os.path.exists(linear):
        with open(linear) as fh:
            print(linear_table(json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
