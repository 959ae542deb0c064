"""`gdc`: the command line over a saved CartoState (``CartoState.save(path)``).

    gdc report STATE [--alpha-d A] [--alpha-m A] [--eps-index K] [--top-k K] [--json]
    gdc plot   STATE -o map.png [--alpha-d A] [--alpha-m A] [--eps-index K] [--jitter J]
    gdc select STATE (--quadrant Q | --prune FRACTION [--by memorization|loss|random|...] [--seed S]) [-o ids.txt]

A missing, corrupted or foreign state file, or a bad argument, prints one line on stderr and
exits with status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

__all__ = ["main"]


class _UsageError(Exception):
    pass


def _load(path: str):
    from gdc_ext.state import CartoState

    try:
        return CartoState.load(path)
    except FileNotFoundError:
        raise _UsageError(f"no state file at {path!r}") from None
    except (ValueError, OSError) as e:
        raise _UsageError(f"cannot read state file {path!r}: {e}") from None


def _eps(scores, eps_index: int) -> float:
    """The threshold --eps-index names (a usage error names the tracked ones)."""
    from gdc_ext.cartography import resolve_eps

    try:
        return resolve_eps(scores, eps_index=eps_index)
    except ValueError as e:
        raise _UsageError(f"--eps-index: {e}") from None


def _report(args) -> int:
    from gdc_ext.cartography import QUADRANT_NAMES, score_values, selection_order

    scores = _load(args.state).scores()
    eps = _eps(scores, args.eps_index)
    m = scores.memorization_at(eps).numpy()
    forgets = scores.forgets_at(eps).numpy()
    d = scores.difficulty.numpy()
    q = scores.quadrants(args.alpha_d, args.alpha_m, eps=eps)
    codes = q.codes.numpy()
    order = selection_order(score_values(scores, "memorization", eps=eps), scores.difficulty).numpy()
    hot = [int(i) for i in order if codes[i] == 2][:args.top_k]
    rows = []
    for code in (0, 1, 2, 3, -1):
        sel = codes == code
        n = int(sel.sum())
        rows.append({"code": code, "quadrant": QUADRANT_NAMES[code], "n": n,
                     "share": n / len(codes),
                     "mean_d": float(np.mean(d[sel])) if n and code != -1 else None,
                     "mean_m": float(np.mean(m[sel])) if n and code != -1 else None})
    out = {"num_samples": len(codes), "epochs": scores.epoch, "burn_in": scores.burn_in,
           "eps": eps, "eps_index": args.eps_index, "alpha_d": args.alpha_d,
           "alpha_m": args.alpha_m, "tau_d": q.tau_d, "tau_m": q.tau_m, "quadrants": rows,
           "top_hotspots": [{"id": i, "memorization": float(m[i]), "difficulty": float(d[i]),
                             "forgets": int(forgets[i]),
                             "transitions": int(scores.transitions[i])} for i in hot]}
    if args.json:
        print(json.dumps(_finite(out), indent=2, allow_nan=False))
        return 0
    print(f"state: {args.state}")
    print(f"N = {out['num_samples']}, epochs = {out['epochs']}, burn-in = {out['burn_in']}, eps = {out['eps']:g} nats")
    print(f"tau_d = {q.tau_d:.4f} (alpha_d = {args.alpha_d}), tau_m = {q.tau_m:.4f} (alpha_m = {args.alpha_m})\n")
    print(f"{'code':>4}  {'quadrant':<18}{'n':>8}{'share':>8}{'mean d':>9}{'mean m':>9}")
    for r in rows:
        md = "" if r["mean_d"] is None else f"{r['mean_d']:.3f}"
        mm = "" if r["mean_m"] is None else f"{r['mean_m']:.3f}"
        print(f"{r['code']:>4}  {r['quadrant']:<18}{r['n']:>8}{r['share']:>8.1%}{md:>9}{mm:>9}")
    print(f"\ntop {len(hot)} hotspot-memorized ids (highest m, ties by higher d):")
    for h in out["top_hotspots"]:
        print(f"  {h['id']:>8}  m = {h['memorization']:.3f} ({h['forgets']}/{h['transitions']})  "
              f"d = {h['difficulty']:.3f}")
    return 0


def _finite(x):
    """JSON has no NaN: thresholds of a state without scored samples become null."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from gdc_ext.plot import data_map

    scores = _load(args.state).scores()
    eps = _eps(scores, args.eps_index)
    try:
        data_map(scores, alpha_d=args.alpha_d, alpha_m=args.alpha_m, eps=eps, jitter=args.jitter,
                 path=args.output, title=args.title)
    except (ValueError, OSError) as e:
        raise _UsageError(str(e)) from None
    print(f"wrote {args.output}")
    return 0


def _select(args) -> int:
    from gdc_ext.cartography import prune

    scores = _load(args.state).scores()
    eps = _eps(scores, args.eps_index)
    if args.quadrant is not None:
        q = scores.quadrants(args.alpha_d, args.alpha_m, eps=eps)
        ids = np.flatnonzero(q.codes.numpy() == args.quadrant)
        what = f"quadrant {args.quadrant}"
    else:
        try:
            kept = prune(scores, args.prune, by=args.by, seed=args.seed, eps=eps).numpy()
        except ValueError as e:
            raise _UsageError(str(e)) from None
        if args.removed:
            ids = np.setdiff1d(np.arange(len(scores.difficulty)), kept)
            what = f"removed by pruning {args.prune:g} by {args.by}"
        else:
            ids, what = kept, f"kept after pruning {args.prune:g} by {args.by}"
    text = "".join(f"{int(i)}\n" for i in ids)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w") as fh:
                fh.write(text)
        except OSError as e:
            raise _UsageError(f"cannot write {args.output!r}: {e}") from None
        print(f"wrote {len(ids)} ids ({what}) to {args.output}", file=sys.stderr)
    return 0


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def _parser() -> argparse.ArgumentParser:
    from gdc_ext.cartography import PRUNE_BY

    p = argparse.ArgumentParser(prog="gdc", description="Generative Data Cartography over a saved CartoState.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("state", help="state file written by CartoState.save()")
        sp.add_argument("--alpha-d", type=_fraction, default=0.75, help="difficulty percentile rate (default 0.75)")
        sp.add_argument("--alpha-m", type=_fraction, default=0.75, help="memorization percentile rate (default 0.75)")
        sp.add_argument("--eps-index", type=int, default=0, help="which tracked eps to use (default 0)")

    r = sub.add_parser("report", help="quadrant counts, thresholds and top hotspot ids")
    common(r)
    r.add_argument("--top-k", type=int, default=10, help="hotspot ids to list (default 10)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=_report)

    pl = sub.add_parser("plot", help="write the data map (PNG)")
    common(pl)
    pl.add_argument("-o", "--output", required=True, help="image path, e.g. map.png")
    pl.add_argument("--jitter", type=float, default=0.01, help="vertical jitter as a fraction of the m range")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=_plot)

    s = sub.add_parser("select", help="write sample ids, one per line")
    common(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--quadrant", type=int, choices=[-1, 0, 1, 2, 3], help="ids in this quadrant")
    g.add_argument("--prune", type=_fraction, metavar="FRACTION", help="ids kept after pruning this fraction")
    s.add_argument("--by", choices=list(PRUNE_BY), default="memorization",
                   help="pruning score (default memorization; loss and random are the baselines)")
    s.add_argument("--seed", type=int, default=0, help="seed of --by random")
    s.add_argument("--removed", action="store_true", help="with --prune: write the removed ids instead")
    s.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    s.set_defaults(func=_select)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gdc`` script; returns the exit status (0 ok, 2 usage or file error)."""
    args = _parser().parse_args(argv)
    if getattr(args, "top_k", 0) < 0:
        print("gdc: error: --top-k must be >= 0", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except _UsageError as e:
        print(f"gdc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
