"""The counterfactual family of the reproduction (paper/counterfactual.py, paper/report_counterfactual.py):
its smoke config end to end (every score on every setting, then the RESULTS.md section, figure and JSON),
and its generators on known answers. No optional package needed (the text settings use the embedded
paragraphs at smoke size)."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from paper.counterfactual import CF_CONFIGS, mixture_data, score_names
from paper.report_counterfactual import MARK_BEGIN, MARK_END, splice_section

SETTINGS = {"demo": {"memorized"}, "canary": {"canary"}, "noisy": {"flipped"},
            "secrets": {"extractable", "extractable_vs_easy", "injected"},
            "secrets_ft": {"extractable", "extractable_vs_easy", "injected"}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from paper.run import CONFIGS, run

    out = str(tmp_path_factory.mktemp("cf") / "out")
    cfg = dataclasses.replace(CONFIGS["smoke"], experiments=[])  # `--config smoke --only counterfactual`
    return out, run(cfg, out, progress=False)


def test_every_score_on_every_setting(smoke):
    _, rows = smoke
    assert rows and all(r["experiment"] == "counterfactual" and r["method"] == "cf_detect" for r in rows)
    seeds = set(CF_CONFIGS["smoke"].seeds)
    assert {r["setting"] for r in rows} == set(SETTINGS)
    for setting, targets in SETTINGS.items():
        for target in targets:
            for seed in seeds:
                sel = [r for r in rows if r["setting"] == setting and r["target"] == target and r["seed"] == seed]
                assert sorted(r["score"] for r in sel) == sorted(score_names()), (setting, target, seed)
    for r in rows:
        if r["positives"] and r["negatives"]:
            assert 0.0 <= r["auroc"] <= 1.0, r
            assert all(0.0 <= r[k] <= 1.0 for k in r if k.startswith("recall@"))
        else:  # a text seed where greedy decoding extracted no secret: no positives, AUROC undefined
            assert r["setting"] in ("secrets", "secrets_ft") and r["target"] != "injected" and math.isnan(r["auroc"])
        assert r["job_seconds"] > 0
    # every label but extraction has positives by construction
    assert all(r["positives"] > 0 for r in rows if r["target"] in ("memorized", "canary", "flipped", "injected"))


def test_demo_fair_label_blind_spot_and_reference(smoke):
    """The demo corpus's fair label (canaries + noise strings vs learnable Markov sequences): the
    last loss ranks the memorized samples *below* the learnable ones (they are harder), while a
    cross-fit reference, the loss under a model that never saw the sample, finds them."""
    _, rows = smoke

    def mean(score):
        return float(np.mean([r["auroc"] for r in rows if r["setting"] == "demo" and r["score"] == score]))

    assert mean("last") < 0.5
    assert mean("excess@crossfit") > 0.5
    assert mean("excess@crossfit") > mean("last") + 0.3


def test_report_section_json_and_splice(smoke, tmp_path):
    from paper.report import make_report

    out, _ = smoke
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results of the full run\n\nkept text\n")
    text = make_report(out, docs_dir=str(docs))  # only counterfactual rows: rewrites only its section
    assert "## Every score on every setting, with its worst case" in text
    page = (docs / "RESULTS.md").read_text()
    assert page.startswith("# Results of the full run\n\nkept text\n") and page.count(MARK_BEGIN) == 1
    make_report(out, docs_dir=str(docs))  # a second run replaces the section, does not add one
    assert (docs / "RESULTS.md").read_text().count(MARK_BEGIN) == 1
    assert os.path.getsize(docs / "fig_counterfactual.png") > 0
    summary = json.load(open(docs / "counterfactual_summary.json"))
    assert set(summary["scores"]) == set(score_names())
    assert len(summary["columns"]) == sum(len(t) for t in SETTINGS.values())
    for name, v in summary["scores"].items():
        finite = [p["mean"] for p in v["per_column"].values() if p["mean"] is not None]  # strict JSON: NaN is null
        assert v["worst"]["mean"] == min(finite), name  # the worst case is the lowest mean
        assert f"**{v['worst']['mean']:.2f}**" in text  # the section states it
    assert summary["picks"]["in_run"]["best"] in ("last", "gain", "memorization", "loss")
    assert set(summary["picks"]["with_reference"]) >= {"crossfit", "independent", "initial"}


def test_splice_section():
    sec = f"{MARK_BEGIN}\nnew\n{MARK_END}\n"
    assert splice_section("head\n", sec) == f"head\n\n{MARK_BEGIN}\nnew\n{MARK_END}\n"
    old = f"head\n\n{MARK_BEGIN}\nold\n{MARK_END}\ntail\n"
    assert splice_section(old, sec) == f"head\n\n{MARK_BEGIN}\nnew\n{MARK_END}\ntail\n"


def test_mixture_data_flips_exactly_and_keeps_the_source():
    x, y, flipped, clean = mixture_data(3, 4, n=500, classes=5, dim=6, sep=1.0, flip=0.1)
    assert flipped.sum() == 50 and x.shape == (500, 6)
    assert (y.numpy()[flipped] != clean.numpy()[flipped]).all() and (y.numpy()[~flipped] == clean.numpy()[~flipped]).all()
    # same source, another draw: other points around the same class means
    x2, _, _, clean2 = mixture_data(3, 5, n=500, classes=5, dim=6, sep=1.0, flip=0.1)
    assert not np.allclose(x.numpy(), x2.numpy())
    x3, _, _, clean3 = mixture_data(9, 5, n=500, classes=5, dim=6, sep=1.0, flip=0.1)  # another source

    def means(x_, c_):
        return np.stack([x_.numpy()[c_.numpy() == c].mean(0) for c in range(5)])
    m1, m2, m3 = means(x, clean), means(x2, clean2), means(x3, clean3)
    assert np.abs(m1 - m2).max() < 0.5 < np.abs(m1 - m3).max()


def test_synthetic_corpus_chain_seed_is_an_independent_draw_of_the_same_chain():
    from paper.data import synthetic_corpus

    kw = dict(n_ordinary=300, seq_len=16, canary_reps=(1,), canaries_per_rep=1, inject_reps=(1,), injected_per_rep=1,
              n_valid=5, n_nonmembers=5, n_members=5)

    def bigrams(c):
        t = c.train[c.group == 0].numpy()
        return {(a, b) for row in t for a, b in zip(row[:-1], row[1:])}

    a = synthetic_corpus(0, **kw)
    assert (synthetic_corpus(0, chain_seed=None, **kw).train == a.train).all()  # the default is unchanged
    same = synthetic_corpus(7, chain_seed=0, **kw)
    other = synthetic_corpus(7, **kw)
    assert not (same.train[:50] == a.train[:50]).all()
    ja = len(bigrams(a) & bigrams(same)) / len(bigrams(a) | bigrams(same))
    jo = len(bigrams(a) & bigrams(other)) / len(bigrams(a) | bigrams(other))
    assert ja > 0.5 > jo
