"""`gdc`: the command line over a saved CartoState (``CartoState.save(path)``).

    gdc report STATE [--by SCORE] [REF] [--alpha-d A] [--alpha-m A] [--eps-index K] [--top K]
                     [--json | --html PAGE] [--dataset PATH [--text-field text] [--id-field FIELD]]
    gdc plot   STATE -o map.png [--kind quadrants|cartography] [--by SCORE] [REF] [--alpha-d A]
                     [--alpha-m A] [--jitter J] [--region-fraction F]
    gdc select STATE (--quadrant Q | --prune FRACTION [--removed] | --region REGION [--region-fraction F])
                     [--by SCORE] [REF] [--seed S] [--json] [-o ids.txt]
    REF: --reference FILE | --stored-reference NAME | --no-reference

STATE is a state file, a Hugging Face checkpoint folder (holding gdc_carto_state.safetensors,
gdc_ext.integrations.files.STATE_FILE) or a training output folder: the checkpoint-<step> subfolder
with the highest step that holds a state is read, and named on stderr. ``select --prune`` writes
the KEPT ids (``--removed``: the removed ones); a line on stderr says which and how many.

SCORE is one of gdc_ext.cartography.SCORES (memorization, gain, excess, relative_excess, last, loss,
random; with a state recorded with cartography=True also confidence, hard_to_learn, variability,
forgetting, accuracy_last): the score of the memorized axis (report, plot, --quadrant) and of pruning. The default is
gdc_ext.cartography.DEFAULT_SCORE, or DEFAULT_REFERENCE_SCORE with a reference. FILE holds
one reference loss per sample (nats per token; the loss of a model that did not train on the
sample, e.g. from gdc_ext.reference_losses): a .npy array, a .pt tensor, or text with one float
per line. A reference stored in the state file (``CartoState.save(path, references={"crossfit":
ref})``; a Cartographer's Hugging Face checkpoints store its own) is used without --reference:
the first one saved, or --stored-reference NAME; a line on stderr names it, and the output says
which reference scored. --reference FILE overrides it; --no-reference ignores it.

For a state recorded with cartography=True: ``plot --kind cartography`` draws Swayamdipta et al.'s
data map (confidence vs variability coloured by correctness), ``select --region`` writes the ids
of one of their regions (easy-to-learn, ambiguous, hard-to-learn: the top --region-fraction, 0.33,
of the samples by confidence, variability, or lowest confidence), and ``report`` lists the regions.

A missing, corrupted or foreign state or reference file, a bad argument, or an I/O error (a full
disk, say) prints one line on stderr and exits with status 2 (no traceback). When the reader of
stdout goes away (``gdc report --json | head``), gdc exits quietly with status 1, as Python's
documentation recommends for a broken pipe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

__all__ = ["main"]


class _UsageError(Exception):
    pass


def _state_path(path: str) -> str:
    """The state file STATE names: the file itself; a Hugging Face checkpoint folder holding
    gdc's STATE_FILE; or a training output folder with checkpoint-<step> subfolders, whose last
    step holding a state is read (which one is said on stderr, since the folder does not name it).
    The file names come from gdc_ext.integrations.files, so that transformers is not imported."""
    import re

    from gdc_ext.integrations.files import CHECKPOINT_PREFIX, STATE_FILE

    if not os.path.isdir(path):
        return path
    inside = os.path.join(path, STATE_FILE)
    if os.path.isfile(inside):
        return inside
    steps = {}
    for name in os.listdir(path):
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", name)
        if m and os.path.isdir(os.path.join(path, name)):
            steps[int(m.group(1))] = name
    with_state = [s for s in steps if os.path.isfile(os.path.join(path, steps[s], STATE_FILE))]
    if not with_state:
        where = (f"none of its {len(steps)} {CHECKPOINT_PREFIX}-N folders holds one (a stock Trainer's?)" if steps
                 else f"nor {CHECKPOINT_PREFIX}-N subfolders")
        raise _UsageError(f"folder {path!r} holds no {STATE_FILE} ({where}); name a state file, a checkpoint folder "
                          f"or a training output folder")
    last = max(with_state)
    chosen = os.path.join(path, steps[last], STATE_FILE)
    # a later checkpoint without a state (an interrupted save, a stock Trainer's) is skipped, and said so
    newer = [steps[s] for s in sorted(steps) if s > last]
    skipped = f"; skipped the later {', '.join(newer)} (no {STATE_FILE})" if newer else ""
    print(f"gdc: reading {chosen} (the last of {len(with_state)} checkpoint(s) with a CartoState{skipped})",
          file=sys.stderr)
    return chosen


def _load(path: str):
    """The CartoState at ``path``: a state file, a checkpoint folder or a training output folder
    (see _state_path); usage errors name the path."""
    from gdc_ext.state import CartoState

    path = _state_path(path)
    try:
        return CartoState.load(path)
    except FileNotFoundError:
        raise _UsageError(f"no state file at {path!r}") from None
    except (ValueError, OSError) as e:
        raise _UsageError(f"cannot read state file {path!r}: {_one_line(e)}") from None
    except (MemoryError, RuntimeError) as e:
        # a crafted file whose sizes cannot be allocated (torch's CPU allocator raises RuntimeError)
        raise _UsageError(f"cannot read state file {path!r}: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    """An exception's message as one line (torch's and NumPy's can span several)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _eps(scores, eps_index: int) -> float:
    """The threshold --eps-index names (a usage error names the tracked ones)."""
    from gdc_ext.cartography import resolve_eps

    try:
        return resolve_eps(scores, eps_index=eps_index)
    except ValueError as e:
        raise _UsageError(f"--eps-index: {e}") from None


def _read_reference(path: str, num_samples: int):
    """The --reference file as a checked [N] float64 tensor (usage errors name the file)."""
    import os

    import torch

    from gdc_ext.state import check_reference

    if not os.path.isfile(path):
        raise _UsageError(f"--reference: no file at {path!r}")
    try:
        if path.endswith(".npy"):
            values = np.load(path, allow_pickle=False)
        elif path.endswith(".pt"):
            values = torch.load(path, map_location="cpu", weights_only=True)
        else:
            values = []
            with open(path) as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            values.append(float(line))
                        except ValueError:
                            raise ValueError(f"line {n} is not a float: {line.strip()[:40]!r}") from None
            values = np.array(values, dtype=np.float64)
    except Exception as e:  # numpy, torch and text parsing raise their own error types
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]  # one line: torch's are long
        raise _UsageError(f"--reference: cannot read {path!r} (.npy, .pt, or one float per line): {why}") from None
    try:
        return check_reference(values, num_samples)
    except ValueError as e:
        raise _UsageError(f"--reference {path!r}: {e}") from None


def _stored_reference(args, state_file: str):
    """(name, [N] tensor) of the reference stored in the state file (CartoState.save(path,
    references=...); a Cartographer's checkpoints store its own): --stored-reference NAME, else
    the first one saved; (None, None) when the file stores none or --no-reference. Usage errors
    name the file (a damaged reference) or the stored names (an unknown NAME)."""
    from gdc_ext.state import CartoState

    if args.no_reference:
        return None, None
    try:
        stored = CartoState.load_references(state_file)
    except (ValueError, OSError) as e:
        raise _UsageError(f"cannot read the references stored in {state_file!r}: {_one_line(e)} (--reference FILE "
                          f"overrides them, --no-reference ignores them)") from None
    if args.stored_reference is not None:
        if args.stored_reference not in stored:
            have = ", ".join(repr(n) for n in stored) or "none"
            raise _UsageError(f"--stored-reference {args.stored_reference!r}: {state_file!r} stores no reference of "
                              f"that name (it stores: {have})")
        return args.stored_reference, stored[args.stored_reference]
    if not stored:
        return None, None
    name = next(iter(stored))
    return name, stored[name]


def _choice(args, scores, state_file: str):
    """(by, reference, source) from --by, --reference and the references stored in the state
    file: --reference FILE, else the stored one (_stored_reference); ``source`` says which, for
    the output (the file's path, or "'NAME' stored in STATE_FILE"; None without a reference).
    --by defaults to DEFAULT_SCORE, or to DEFAULT_REFERENCE_SCORE with a reference; a calibrated
    score ("excess", "relative_excess") without one is a usage error."""
    from gdc_ext.cartography import DEFAULT_REFERENCE_SCORE, DEFAULT_SCORE, NEEDS_REFERENCE

    n = len(scores.difficulty)
    if args.reference is not None:
        reference, source, name = _read_reference(args.reference, n), args.reference, None
        from gdc_ext._state_references import stored_names

        over = stored_names(state_file)  # the header alone: said, not read
        if over:
            print(f"gdc {args.command}: --reference {args.reference} overrides the reference(s) "
                  f"{', '.join(repr(x) for x in over)} stored in {state_file}", file=sys.stderr)
    else:
        name, reference = _stored_reference(args, state_file)
        source = None if name is None else f"{name!r} stored in {state_file}"
        if name is not None:
            others = " (--reference FILE overrides it, --no-reference ignores it)"
            print(f"gdc {args.command}: using the reference {source}{others}", file=sys.stderr)
    args.reference_source, args.reference_stored = source, name
    by = args.by if args.by is not None else (DEFAULT_REFERENCE_SCORE if reference is not None else DEFAULT_SCORE)
    if by in NEEDS_REFERENCE and reference is None:
        raise _UsageError(f"--by {by} needs --reference FILE (one reference loss per sample, nats per token) or a "
                          f"reference stored in the state file (CartoState.save(path, references={{name: ref}}))")
    if by == "relative_excess":
        from gdc_ext.state import check_reference

        try:
            check_reference(reference, n, nonnegative=True)
        except ValueError as e:
            raise _UsageError(f"--reference {source}: {e}") from None
    return by, reference


def _top(args) -> int:
    """--top / --top-k: 50 rows when the text is shown (--dataset, --html), else 10."""
    k = getattr(args, "top_k", None)
    if k is None:
        return 50 if args.dataset is not None or args.html is not None else 10
    return k


def _texts(args, ids, num_samples: int):
    """The texts of ``ids`` from --dataset (None without it); usage errors name --dataset."""
    if args.dataset is None:
        return None
    from gdc_ext.texts import read_texts

    try:
        texts = read_texts(args.dataset, ids, text_field=args.text_field, id_field=args.id_field,
                           num_samples=num_samples)
        if ids and all(t is None for t in texts):
            print(f"gdc report: warning: no row of {args.dataset!r} carries any of the {len(ids)} sample ids shown "
                  f"in {args.id_field!r} (--id-field): is this the data the run trained on?", file=sys.stderr)
        return texts
    except ValueError as e:
        raise _UsageError(f"--dataset: {_one_line(e)}") from None
    except ImportError as e:  # a saved `datasets` folder or Parquet without the package
        raise _UsageError(f"--dataset {args.dataset!r}: {e} (pip install datasets)") from None


def _report(args) -> int:
    from gdc_ext.cartography import QUADRANT_NAMES, SCORE_LABELS, score_values, top_k

    if args.dataset is None and (args.text_field != "text" or args.id_field is not None):
        raise _UsageError("--text-field / --id-field need --dataset PATH")
    state_file = _state_path(args.state)  # a folder resolved once (and named on stderr once)
    scores = _load(state_file).scores()
    eps = _eps(scores, args.eps_index)
    by, reference = _choice(args, scores, state_file)
    k = _top(args)
    if args.html is not None:
        return _report_html(args, scores, eps, by, reference, k)
    score = score_values(scores, by, seed=args.seed, eps=eps, reference=reference).numpy()
    m = scores.memorization_at(eps).numpy()
    gain = scores.gain.numpy()
    forgets = scores.forgets_at(eps).numpy()
    d = scores.difficulty.numpy()
    last = scores.last_loss.numpy()
    q = scores.quadrants(args.alpha_d, args.alpha_m, eps=eps, by=by, reference=reference, seed=args.seed)
    codes = q.codes.numpy()
    excess = rel = None
    if reference is not None:
        excess = scores.excess(reference).numpy()
        rel = scores.relative_excess(reference).numpy() if bool((reference > 0).all()) else None
    # partial sorts (top_k): a report over N = 1e8 samples never sorts all of them
    top = [int(i) for i in top_k(score, k, scores.difficulty).numpy() if not np.isnan(score[i])]
    in_hot = np.where(codes == 2, score, np.nan)
    hot = [int(i) for i in top_k(in_hot, k, scores.difficulty).numpy() if not np.isnan(in_hot[i])]
    shown = sorted(set(top) | set(hot))
    texts = _texts(args, shown, len(codes))
    text_of = None if texts is None else dict(zip(shown, texts))
    rows = []
    for code in (0, 1, 2, 3, -1):
        sel = codes == code
        n = int(sel.sum())
        rows.append({"code": code, "quadrant": QUADRANT_NAMES[code], "n": n,
                     "share": n / len(codes),
                     "mean_d": float(np.mean(d[sel])) if n and code != -1 else None,
                     "mean_m": float(np.mean(score[sel])) if n and code != -1 else None})

    def row(i):
        r = {"id": i, "score": float(score[i]), "memorization": float(m[i]), "difficulty": float(d[i]),
             "last_loss": float(last[i]), "gain": float(gain[i]), "forgets": int(forgets[i]),
             "transitions": int(scores.transitions[i])}
        if excess is not None:
            r["excess"] = float(excess[i])
        if rel is not None:
            r["relative_excess"] = float(rel[i])
        if text_of is not None:
            from gdc_ext.texts import clip

            r["text"] = clip(text_of[i])  # None: no row carries this id (--id-field)
        return r

    carto = _cartography_summary(scores)
    out = {"num_samples": len(codes), "epochs": scores.epoch, "burn_in": scores.burn_in,
           "eps": eps, "eps_index": args.eps_index, "by": by, "score": SCORE_LABELS[by],
           "reference": args.reference_source, "reference_stored": args.reference_stored, "alpha_d": args.alpha_d,
           "alpha_m": args.alpha_m, "tau_d": q.tau_d, "tau_m": q.tau_m, "quadrants": rows,
           "top_candidates": [row(i) for i in top], "top_hotspots": [row(i) for i in hot]}
    if carto is not None:
        out["cartography"] = carto
    if args.dataset is not None:
        out.update(dataset=args.dataset, text_field=args.text_field, id_field=args.id_field)
    if args.json:
        print(json.dumps(_finite(out), indent=2, allow_nan=False))
        return 0
    print(f"state: {args.state}")
    print(f"N = {out['num_samples']}, epochs = {out['epochs']}, burn-in = {out['burn_in']}, eps = {out['eps']:g} nats")
    print(f"score (--by {by}): {SCORE_LABELS[by]}"
          + (f", reference {args.reference_source}" if args.reference_source else ""))
    print(f"tau_d = {q.tau_d:.4f} (alpha_d = {args.alpha_d}), tau_m = {q.tau_m:.4f} (alpha_m = {args.alpha_m}, "
          f"on the score)\n")
    print(f"{'code':>4}  {'quadrant':<18}{'n':>8}{'share':>8}{'mean d':>9}{'mean score':>12}")
    for r in rows:
        md = "" if r["mean_d"] is None else f"{r['mean_d']:.3f}"
        mm = "" if r["mean_m"] is None else f"{r['mean_m']:.3f}"
        print(f"{r['code']:>4}  {r['quadrant']:<18}{r['n']:>8}{r['share']:>8.1%}{md:>9}{mm:>12}")
    if carto is not None:
        print(f"\ncartography (top {carto['fraction']:.0%} each; never learnt: {carto['never_learnt']}, "
              f"forgetting events: {carto['forgetting_events']}):")
        print(f"  {'region':<16}{'n':>8}{'mean conf.':>12}{'mean var.':>11}{'mean correct.':>15}")
        for name, r in carto["regions"].items():
            vals = [("" if r[k] is None else f"{r[k]:.3f}") for k in ("mean_confidence", "mean_variability",
                                                                      "mean_correctness")]
            print(f"  {name:<16}{r['n']:>8}{vals[0]:>12}{vals[1]:>11}{vals[2]:>15}")
    where = "" if args.dataset is None else f", text from {args.dataset}"
    print(f"\ntop {len(top)} candidates by {by} (highest first, ties by higher d, then id{where}):")
    ref_head = (f"  {'excess':>7}" if excess is not None else "") + (f"  {'rel.exc':>7}" if rel is not None else "")
    head = (f"  {'id':>8}  {'score':>9}  {'d':>7}  {'last':>7}  {'gain':>7}{ref_head}  "
            f"{'m (forgets/transitions)':<24}  {'quadrant':<17}")
    print(head + ("  text" if texts is not None else ""))
    if texts is not None:
        import shutil

        from gdc_ext.texts import snippet

        width = max(30, shutil.get_terminal_size((140, 24)).columns - len(head) - 2)
    for h in out["top_candidates"]:
        mem = f"{h['memorization']:.3f} ({h['forgets']}/{h['transitions']})"
        refs = (f"  {h['excess']:>7.3f}" if excess is not None else "") + \
               (f"  {h['relative_excess']:>7.3f}" if rel is not None else "")
        line = (f"  {h['id']:>8}  {h['score']:>9.3f}  {h['difficulty']:>7.3f}  {h['last_loss']:>7.3f}  "
                f"{h['gain']:>7.3f}{refs}  {mem:<24}  {QUADRANT_NAMES[int(codes[h['id']])]:<17}")
        if texts is not None:
            t = text_of[h["id"]]
            line += "  " + ("(no row with this id)" if t is None else snippet(t, width))
        print(line.rstrip())
    return 0


def _cartography_summary(scores):
    """The regions and counts of a state with the cartography group, for report (None without)."""
    from gdc_ext.cartography import REGION_FRACTION, cartography_regions

    if not scores.has("confidence"):
        return None
    conf, var = scores.confidence.numpy(), scores.variability.numpy()
    corr = scores.correctness.numpy()
    regions = {}
    for name, ids in cartography_regions(scores).items():
        ids = ids.numpy()
        regions[name] = {"n": len(ids), **{f"mean_{k}": float(np.mean(v[ids])) if len(ids) else None
                                           for k, v in (("confidence", conf), ("variability", var),
                                                        ("correctness", corr))}}
    return {"fraction": REGION_FRACTION, "never_learnt": int(scores.never_learnt.sum()),
            "forgetting_events": int(scores.forgetting.sum()), "regions": regions}


def _report_html(args, scores, eps, by, reference, k) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from gdc_ext.cartography import score_values, top_k
    from gdc_ext.html_report import write_report

    score = score_values(scores, by, seed=args.seed, eps=eps, reference=reference).numpy()
    ids = [int(i) for i in top_k(score, k, scores.difficulty).numpy() if not np.isnan(score[i])]
    texts = _texts(args, ids, len(score))
    try:
        write_report(args.html, scores, by=by, reference=reference, alpha_d=args.alpha_d, alpha_m=args.alpha_m,
                     eps=eps, seed=args.seed, top=k, dataset=args.dataset, text_field=args.text_field,
                     id_field=args.id_field, texts=texts, source=args.state, reference_source=args.reference_source)
    except OSError as e:
        raise _UsageError(f"--html {args.html!r}: cannot write: {_one_line(e)}") from None
    print(f"wrote {args.html} ({len(ids)} samples in the table, by {by})")
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

    out = _plot_path(args.output)
    state_file = _state_path(args.state)
    scores = _load(state_file).scores()
    if args.kind == "cartography":
        if args.by is not None or args.reference is not None:
            raise _UsageError("--kind cartography draws confidence against variability: --by / --reference are for "
                              "--kind quadrants")
        _need_cartography(scores, "--kind cartography")
        try:
            data_map(scores, kind="cartography", fraction=args.region_fraction, path=out, title=args.title,
                     seed=args.seed)
        except (ValueError, OSError) as e:
            raise _UsageError(f"-o {out!r}: {_one_line(e)}") from None
        print(f"wrote {out}")
        return 0
    eps = _eps(scores, args.eps_index)
    by, reference = _choice(args, scores, state_file)
    try:
        data_map(scores, alpha_d=args.alpha_d, alpha_m=args.alpha_m, eps=eps, jitter=args.jitter,
                 path=out, title=args.title, by=by, reference=reference, seed=args.seed)
    except (ValueError, OSError) as e:
        raise _UsageError(f"-o {out!r}: {_one_line(e)}") from None
    print(f"wrote {out}")
    return 0


def _need_cartography(scores, what: str) -> None:
    """A usage error naming ``what`` when the state was recorded without the cartography group."""
    if not scores.has("confidence"):
        raise _UsageError(f"{what} needs a state recorded with the cartography statistics: "
                          f"CartoState(..., cartography=True) or Cartographer(..., cartography=True)")


def _plot_path(output: str) -> str:
    """The file ``gdc plot -o OUTPUT`` writes, so that the path printed is the one written:
    OUTPUT/data_map.png when OUTPUT is an existing folder (matplotlib would write OUTPUT.png
    beside it), OUTPUT.png when OUTPUT has no extension (as matplotlib's savefig names it),
    OUTPUT otherwise (its extension picks the format)."""
    if os.path.isdir(output):
        return os.path.join(output, "data_map.png")
    if output.endswith(("/", os.sep)):
        raise _UsageError(f"-o {output!r}: no such folder")
    if not os.path.splitext(output)[1]:
        return output + ".png"
    return output


def _select(args) -> int:
    from gdc_ext.cartography import SCORE_LABELS, prune

    if args.removed and args.prune is None:
        raise _UsageError("--removed goes with --prune (it writes the pruned ids instead of the kept ones)")
    state_file = _state_path(args.state)  # a folder resolved once (and named on stderr once)
    scores = _load(state_file).scores()
    if args.region is not None:
        return _select_region(args, scores, state_file)
    eps = _eps(scores, args.eps_index)
    by, reference = _choice(args, scores, state_file)
    n = len(scores.difficulty)
    selection = {"by": by, "score": SCORE_LABELS[by], "reference": args.reference_source,
                 "reference_stored": args.reference_stored, "eps": eps,
                 "eps_index": args.eps_index, "seed": args.seed}
    if args.quadrant is not None:
        q = scores.quadrants(args.alpha_d, args.alpha_m, eps=eps, by=by, reference=reference, seed=args.seed)
        ids = np.flatnonzero(q.codes.numpy() == args.quadrant)
        what = f"{len(ids)} ids in quadrant {args.quadrant} of {n} (memorized axis: {by})"
        selection.update(quadrant=args.quadrant, alpha_d=args.alpha_d, alpha_m=args.alpha_m,
                         tau_d=q.tau_d, tau_m=q.tau_m)
    else:
        try:
            kept = prune(scores, args.prune, by=by, seed=args.seed, eps=eps, reference=reference).numpy()
        except ValueError as e:
            raise _UsageError(str(e)) from None
        n_removed = n - len(kept)
        # which list is written is easy to mistake (the kept ids by default): always said on stderr
        if args.removed:
            ids = np.setdiff1d(np.arange(n), kept)
            what = (f"removed {len(ids)} ids (kept {len(kept)}): the top {args.prune * 100:g}% by {by}, "
                    f"as --removed asks")
        else:
            ids = kept
            what = (f"kept {len(kept)} ids (removed {n_removed}: the top {args.prune * 100:g}% by {by}; "
                    f"--removed writes those instead)")
        selection.update(prune=args.prune, ids_are="removed" if args.removed else "kept",
                         kept=len(kept), removed=n_removed)
    return _write_ids(args, state_file, n, selection, ids, what)


def _select_region(args, scores, state_file: str) -> int:
    from gdc_ext.cartography import cartography_regions

    if args.by is not None or args.reference is not None:
        raise _UsageError("--region selects by confidence or variability: --by / --reference are for --quadrant and "
                          "--prune")
    _need_cartography(scores, "--region")
    ids = cartography_regions(scores, args.region_fraction)[args.region].numpy()
    n = len(scores.difficulty)
    seen = int((~np.isnan(scores.confidence.numpy())).sum())
    metric = {"easy-to-learn": "highest confidence", "ambiguous": "highest variability",
              "hard-to-learn": "lowest confidence"}[args.region]
    what = (f"{len(ids)} ids in the {args.region} region of {n} (the top {args.region_fraction:.0%} of the {seen} "
            f"observed samples by {metric})")
    selection = {"region": args.region, "fraction": args.region_fraction, "metric": metric, "observed": seen}
    return _write_ids(args, state_file, n, selection, ids, what)


def _write_ids(args, state_file: str, n: int, selection: dict, ids, what: str) -> int:
    """Writes the selected ``ids`` (one per line, or JSON with the ``selection``) and the summary
    line ``what`` on stderr."""
    if args.json:
        out = {"state": args.state, "state_file": state_file, "num_samples": n, "selection": selection, "n": len(ids),
               "ids": [int(i) for i in ids]}
        text = json.dumps(_finite(out), allow_nan=False) + "\n"
    else:
        text = "".join(f"{int(i)}\n" for i in ids)
    if args.output in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()  # a closed pipe or a full disk shows before the summary line below
        print(f"gdc select: {what}", file=sys.stderr)
    else:
        try:
            with open(args.output, "w") as fh:
                fh.write(text)
        except OSError as e:
            raise _UsageError(f"cannot write {args.output!r}: {e}") from None
        print(f"gdc select: {what}; wrote {'JSON' if args.json else 'them'} to {args.output}", file=sys.stderr)
    return 0


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def _parser() -> argparse.ArgumentParser:
    from gdc_ext.cartography import DEFAULT_REFERENCE_SCORE, DEFAULT_SCORE, REGION_FRACTION, REGIONS, SCORES
    from gdc_ext.plot import KINDS

    p = argparse.ArgumentParser(prog="gdc", description="Generative Data Cartography over a saved CartoState.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("state", help="state file written by CartoState.save(), a Hugging Face checkpoint folder "
                                      "(holding gdc_carto_state.safetensors), or a training output folder (its "
                                      "last checkpoint-N with a state is read, named on stderr)")
        sp.add_argument("--alpha-d", type=_fraction, default=0.75, help="difficulty percentile rate (default 0.75)")
        sp.add_argument("--alpha-m", type=_fraction, default=0.75,
                        help="percentile rate of the memorized-axis score (default 0.75)")
        sp.add_argument("--eps-index", type=int, default=0, help="which tracked eps m uses (default 0)")
        sp.add_argument("--by", choices=list(SCORES), default=None,
                        help=f"score of the memorized axis and of pruning (default {DEFAULT_SCORE}, or "
                             f"{DEFAULT_REFERENCE_SCORE} with a reference: --reference or one stored in the state "
                             f"file; memorization is the paper's m)")
        ref = sp.add_mutually_exclusive_group()
        ref.add_argument("--reference", metavar="FILE", default=None,
                         help="per-sample reference losses (nats per token) of a model that did not train on the "
                              "samples (gdc_ext.reference_losses), for --by excess / relative_excess: .npy, .pt, or "
                              "one float per line; overrides a reference stored in the state file")
        ref.add_argument("--stored-reference", metavar="NAME", default=None,
                         help="which reference stored in the state file to use (CartoState.save(path, "
                              "references={NAME: ref}); default: the first one saved, if any)")
        ref.add_argument("--no-reference", action="store_true",
                         help="ignore the references stored in the state file")
        sp.add_argument("--seed", type=int, default=0, help="seed of --by random")

    r = sub.add_parser("report", help="quadrant counts, thresholds and the top candidates by the score "
                                      "(with their text: --dataset; as one HTML page: --html)")
    common(r)
    r.add_argument("--top-k", "--top", dest="top_k", type=int, default=argparse.SUPPRESS,
                   help="candidates to list (default 10; 50 with --dataset or --html)")
    fmt = r.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--html", metavar="PAGE", default=None,
                     help="write one self-contained HTML page (data maps, histograms, quadrant counts, a sortable "
                          "table of the top samples with their text) instead of printing the table")
    r.add_argument("--dataset", metavar="PATH", default=None,
                   help="the training data, to show each candidate's text: a folder written by Dataset.save_to_disk, "
                        ".parquet, .jsonl, or .txt (one sample per line); only the rows shown are read")
    r.add_argument("--text-field", default="text", help="the column holding the text (default text)")
    r.add_argument("--id-field", default=None,
                   help="the column holding each row's sample id (default: the sample id is the row index, and the "
                        "data must have as many rows as the state has samples)")
    r.set_defaults(func=_report)

    pl = sub.add_parser("plot", help="write the data map (PNG)")
    common(pl)
    pl.add_argument("-o", "--output", required=True, help="image path, e.g. map.png")
    pl.add_argument("--jitter", type=float, default=0.01, help="vertical jitter as a fraction of the score's range")
    pl.add_argument("--title", default=None)
    pl.add_argument("--kind", choices=list(KINDS), default="quadrants",
                    help="quadrants (default): difficulty vs the --by score; cartography: confidence vs variability "
                         "coloured by correctness with the three regions (a state recorded with cartography=True)")
    pl.add_argument("--region-fraction", type=_fraction, default=REGION_FRACTION,
                    help=f"--kind cartography: the size of each region (default {REGION_FRACTION})")
    pl.set_defaults(func=_plot)

    s = sub.add_parser("select", help="write sample ids, one per line (or JSON)",
                       description="Write sample ids, one per line: those in a quadrant (--quadrant), those "
                                   "KEPT after pruning (--prune; --removed writes the removed ones instead), or those "
                                   "in a data-cartography region (--region). "
                                   "A summary line on stderr says which, e.g. 'kept 950 ids (removed 50 ...)'.")
    common(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--quadrant", type=int, choices=[-1, 0, 1, 2, 3], help="ids in this quadrant")
    g.add_argument("--prune", type=_fraction, metavar="FRACTION",
                   help="writes the ids KEPT after removing round(FRACTION * N) samples, highest score first "
                        "(with --removed: the removed ones)")
    g.add_argument("--region", choices=list(REGIONS),
                   help="ids in one of Swayamdipta et al.'s regions (a state recorded with cartography=True): the top "
                        "--region-fraction of the samples by confidence (easy-to-learn), variability (ambiguous) or "
                        "lowest confidence (hard-to-learn)")
    s.add_argument("--region-fraction", type=_fraction, default=REGION_FRACTION,
                   help=f"with --region: the size of the region (default {REGION_FRACTION})")
    s.add_argument("--removed", action="store_true", help="with --prune: write the removed ids instead of the kept")
    s.add_argument("--json", action="store_true",
                   help='write one JSON object: {"ids": [...], "n", "num_samples", "state", "selection": '
                        '{the parameters: by, eps, seed, quadrant or prune, kept / removed counts, ...}}')
    s.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    s.set_defaults(func=_select)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gdc`` script; returns the exit status (0 ok, 2 usage, file or I/O error,
    1 when stdout's reader went away). Errors print one line on stderr, never a traceback; a
    bug of gdc itself (an AttributeError, KeyError, ...) is not caught and still shows one."""
    from gdc_ext._seed import SEED_LIMIT

    args = _parser().parse_args(argv)
    if getattr(args, "top_k", 0) < 0:
        print("gdc: error: --top-k must be >= 0", file=sys.stderr)
        return 2
    if not 0 <= args.seed < SEED_LIMIT:
        print(f"gdc {args.command}: error: --seed must be an int in [0, 2**63), got {args.seed}", file=sys.stderr)
        return 2
    try:
        status = args.func(args)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, inside the handlers, not at exit
        return status
    except _UsageError as e:
        print(f"gdc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _detach_stdout()
        return 1
    except OSError as e:  # writing the output (stdout on a full disk, say) or reading an input
        where = "cannot write to stdout: " if _stdout_broken() else ""
        print(f"gdc {args.command}: error: {where}{_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, MemoryError) as e:  # the library's argument checks (ArgumentError is a ValueError)
        print(f"gdc {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _stdout_broken() -> bool:
    """Whether stdout cannot take its pending output; if so it is pointed at devnull, so that the
    interpreter's own flush at exit does not fail again with an 'Exception ignored' traceback."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        _detach_stdout()
        return True


def _detach_stdout() -> None:
    """Python's recipe for a broken pipe (docs, signal module, "Note on SIGPIPE"): point the stdout
    file descriptor at devnull, so that the flush at exit neither fails nor prints anything."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
