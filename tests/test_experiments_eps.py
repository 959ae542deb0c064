"""Eps-sensitivity analysis of the canary experiment: the sweep rows from one record run (smoke size)
and the RESULTS.md section / figure drawn from them."""
import json
import math
import os


from paper.run import CONFIGS


def _synthetic_rows(grid=(0.5, 1.0, 2.0), seeds=(0, 1, 2), p=0.1):
    rows = []
    for s in seeds:
        base = {"experiment": "canary", "seed": s, "corpus": "synthetic", "eps": 2.0}
        rows.append({**base, "method": "none", "fraction": 0.0, "extraction": 0.5 + 0.01 * s})
        rows.append({**base, "method": "random", "fraction": p, "extraction": 0.45})
        for j, e in enumerate(grid):
            rows.append({**base, "method": "eps_sweep", "fraction": p, "eps": e, "eps_index": j, "eps_fixed": 2.0,
                         "is_fixed_eps": e == 2.0, "reused": e == 2.0, "pruned_weight": p, "forget_events": 10.0 * j,
                         "frac_m_positive": 0.1, "canary_copies_hit": 0.5 if e == 1.0 else 0.0,
                         "canaries_any_hit": 0.5, "canaries_all_hit": 0.25, "prune_set_canary_share": 0.3,
                         "extraction": (0.1 + 0.02 * s) if e == 1.0 else 0.5, "perplexity": 10.0})
    return rows


def test_eps_section_on_synthetic_rows(tmp_path):
    from paper.report import _eps_section

    cfg = {"experiments": [{"name": "canary", "eps_sweep": [0.1], "eps_grid": [0.5, 1.0, 2.0]}]}
    lines = _eps_section(_synthetic_rows(), cfg, str(tmp_path))
    text = "\n".join(lines)
    assert "## Sensitivity to the forget threshold eps" in text
    assert "post-hoc" in text and "eps = 2" in text
    assert "| 2 (fixed rule) |" in text
    assert "Best eps at p = 10%: 1 nats" in text
    assert os.path.getsize(tmp_path / "fig_eps_sensitivity.png") > 0
    # no sweep rows -> no section
    assert _eps_section([r for r in _synthetic_rows() if r["method"] != "eps_sweep"], cfg, str(tmp_path)) == []


def test_eps_sweep_rows_smoke():
    """One smoke-size canary record run, then the sweep with a cheap continued training (1 epoch)."""
    import dataclasses

    import torch

    from paper.models import build_model
    from paper.run import _build_corpus, _pick_eps, eps_sweep_rows
    from paper.train import TrainSpec, intervention_phase, record_phase

    torch.set_num_threads(1)
    exp = [e for e in CONFIGS["smoke"].experiments if e.name == "canary"][0]
    exp = dataclasses.replace(exp, eps_sweep=(0.2,), epochs=2, burn_in=1)
    corpus = _build_corpus(exp, 0)
    spec = TrainSpec(epochs=exp.epochs, burn_in=exp.burn_in, batch=exp.batch, lr=exp.lr, eps=tuple(exp.eps_grid))
    mk = lambda: build_model(exp.model, corpus.vocab_size, corpus.train.shape[1], **exp.dims)  # noqa: E731
    _, scores, snap, _ = record_phase(mk, corpus.train, spec, 0, progress=False)
    k = _pick_eps(scores)
    calls = []

    def train(keep, desc):
        calls.append(desc)
        return intervention_phase(mk, corpus.train, spec, snap, 0, keep=keep, progress=False)

    rows = eps_sweep_rows(exp, corpus, scores, k, train, {"experiment": "canary", "seed": 0}, seed=0)
    assert len(rows) == len(exp.eps_grid)
    assert 1 <= len(calls) <= len(exp.eps_grid)  # identical prune sets are trained once
    assert sum(r["is_fixed_eps"] for r in rows) == 1
    for r in rows:
        assert r["method"] == "eps_sweep" and r["fraction"] == 0.2
        for key in ("extraction", "perplexity", "canary_copies_hit", "canaries_all_hit", "prune_set_canary_share",
                    "forget_events", "frac_m_positive", "pruned_weight"):
            assert math.isfinite(r[key]), key
        assert 0.0 <= r["extraction"] <= 1.0 and 0.0 <= r["canary_copies_hit"] <= 1.0
        json.dumps(r)  # rows.jsonl-serialisable


def test_default_canary_has_sweep():
    """The default run has an eps sweep whose every fraction the report can compare: the sweep
    section reads the random, loss and fixed-rule m rows at the same p, so each sweep fraction must
    be one of the main fractions, those methods must run, and the eps grid must be a proper grid."""
    cfg = CONFIGS["default"]
    exps = {e.name: e for e in cfg.experiments}
    sweep = exps["canary"].eps_sweep
    assert len(sweep) >= 1
    assert set(sweep) <= set(cfg.fractions), "every sweep fraction needs its main-table baselines"
    assert {"memorization", "random", "loss"} <= set(cfg.methods)
    assert "whole-run" in cfg.protocols  # the sweep restarts from the whole-run protocol's checkpoint
    grid = list(exps["canary"].eps_grid)
    assert grid == sorted(set(grid)) and len(grid) >= 3
