"""The counterfactual family of the reproduction (paper/counterfactual.py, paper/report_counterfactual.py):
its smoke config end to end (every score on every setting, then the RESULTS.md section, figure and JSON;
the audit kit's own report, settings E / E', and its agreement table with setting B;
``--settings`` re-running some settings into a previous run), and its generators on known answers.
No optional package needed (the text settings use the embedded paragraphs at smoke size)."""
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
AUDIT = ("audit", "audit_b")  # E (the kit's defaults), E' (the kit given B's canary format)
KIT_SCORES = {"last", "gain", "memorization", "loss", "random", "excess@crossfit", "relative_excess@crossfit"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from paper.run import CONFIGS, run

    out = str(tmp_path_factory.mktemp("cf") / "out")
    cfg = dataclasses.replace(CONFIGS["smoke"], experiments=[])  # `--config smoke --only counterfactual`
    return out, run(cfg, out, progress=False)


def test_every_score_on_every_setting(smoke):
    _, all_rows = smoke
    assert all_rows and all(r["experiment"] == "counterfactual" for r in all_rows)
    assert {r["setting"] for r in all_rows if r["method"] == "cf_audit"} == set(AUDIT)
    rows = [r for r in all_rows if r["method"] == "cf_detect"]
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


def _setting(name):
    return next(st for st in CF_CONFIGS["smoke"].settings if st.name == name)


def test_audit_kit_settings_are_b_with_the_kits_canaries(smoke):
    """E / E': setting B's corpus without its canaries, noise strings and injected copies, the same
    model trained the same way, and rows that are the kit's own report (saved beside them)."""
    out, rows = smoke
    b = _setting("canary")
    reps = tuple(b.data["canary_reps"])
    for name in AUDIT:
        st = _setting(name)
        assert (st.model, st.epochs, st.burn_in, st.lr, st.batch, st.eps_grid) == \
            (b.model, b.epochs, b.burn_in, b.lr, b.batch, b.eps_grid)
        assert st.data == {**b.data, "canary_reps": (), "noise_frac": 0.0, "inject_reps": ()}
        assert st.audit["reps"] == reps and st.audit["num_canaries_per_rep"] == b.data["canaries_per_rep"]
        for seed in CF_CONFIGS["smoke"].seeds:
            sel = [r for r in rows if r["setting"] == name and r["seed"] == seed]
            targets = {"planted"} | {f"planted_r{r}" for r in reps}
            assert {r["target"] for r in sel} == targets
            for t in targets:
                assert {r["score"] for r in sel if r["target"] == t} == KIT_SCORES, (name, seed, t)
            rep = json.load(open(os.path.join(out, f"{name}_seed{seed}.json")))
            for r in sel:
                v = rep["scores"][r["by"]]
                if r["target"] != "planted":
                    v = v["by_reps"][r["target"][len("planted_r"):]]
                assert r["auroc"] == v["auroc"] and r["recall@10%"] == v["recall"]["10%"]
                assert r["negatives"] == b.data["n_ordinary"]  # B's negatives: the ordinary sequences
                assert r["method"] == "cf_audit" and r["compare"] == "canary"
            assert {r["positives"] for r in sel if r["target"] == "planted"} == {b.data["canaries_per_rep"] * sum(reps)}
            r0 = sel[0]
            for kind in ("inserted", "twin"):
                assert 0.0 <= r0[f"extracted_{kind}"] <= 1.0
                assert math.isfinite(r0[f"exposure_{kind}"]) and r0[f"exposure_{kind}"] <= r0["exposure_max_bits"] + 1e-9
            can = json.load(open(os.path.join(out, f"{name}_canaries_seed{seed}.json")))
            if name == "audit_b":  # B's format: <10 11 name name 12> and digit secrets
                assert can["alphabet"] == list(range(10))
                assert all(c["prefix"][:2] == [10, 11] and c["prefix"][4] == 12 and 13 <= min(c["prefix"][2:4])
                           and max(c["prefix"][2:4]) <= 52 for c in can["canaries"])
            else:  # the kit's defaults: drawn from the data's tokens (the Markov words, ids 53..)
                assert min(can["alphabet"]) >= 53 and all(min(c["prefix"]) >= 53 for c in can["canaries"])


def _nan(d):
    return {k: (float("nan") if v is None else v) for k, v in d.items()}


def test_audit_agreement_table_is_generated(smoke, tmp_path):
    from paper.report import make_report
    from paper.report_counterfactual import audit_verdict

    out, rows = smoke
    docs = tmp_path / "docs"
    text = make_report(out, docs_dir=str(docs))
    summary = json.load(open(docs / "counterfactual_summary.json"))
    assert [a["setting"] for a in summary["audit"]] == list(AUDIT)
    assert "### E audit kit: the audit kit's own report" in text and "### E' audit kit, B's canary format" in text
    b = _setting("canary")
    reps = b.data["canary_reps"]
    for a in summary["audit"]:
        assert (a["compare"], a["compare_target"]) == ("canary", "canary") and set(a["scores"]) == KIT_SCORES
        assert a["agree"] == [n for n, v in a["scores"].items() if v["verdict"] == "agree"]
        assert a["differ"] == [n for n, v in a["scores"].items() if v["verdict"].startswith("differ")]
        for n, v in a["scores"].items():
            # the reproduction's column is B's entry of the main table; the verdict follows the rule
            assert v["repro"]["mean"] == summary["scores"][n]["per_column"]["canary/canary"]["mean"]
            assert v["verdict"] == audit_verdict(_nan(v["kit"]["planted"]), _nan(v["repro"]))
            assert f"- {v['label']}: **{v['verdict']}**" in text
            # B per r, from its saved scores and regenerated corpus: the positives of every r together
            # are B's label, so the per-r AUROCs weighted by their positives give B's AUROC exactly
            assert set(v["repro_by_reps"]) == {str(r) for r in reps}
            for seed, auc in v["repro"]["per_seed"].items():
                w = {r: b.data["canaries_per_rep"] * r for r in reps}
                mix = sum(w[r] * v["repro_by_reps"][str(r)]["per_seed"][seed] for r in reps) / sum(w.values())
                assert mix == pytest.approx(auc, abs=1e-12), (n, seed)
    page = (docs / "RESULTS.md").read_text()
    assert page.index(MARK_BEGIN) < page.index("### E audit kit") < page.index(MARK_END)


def test_audit_verdict_is_interval_overlap():
    from paper.report_counterfactual import audit_verdict

    nan = float("nan")
    assert audit_verdict({"mean": 0.90, "half": 0.05}, {"mean": 0.98, "half": 0.04}) == "agree"
    assert audit_verdict({"mean": 0.83, "half": 0.02}, {"mean": 0.98, "half": 0.01}) == "differ (kit lower)"
    assert audit_verdict({"mean": 0.78, "half": 0.07}, {"mean": 0.41, "half": 0.07}) == "differ (kit higher)"
    assert audit_verdict({"mean": 1.0, "half": 0.0}, {"mean": 0.999, "half": 0.001}) == "agree"  # touching
    assert audit_verdict({"mean": 0.5, "half": nan}, {"mean": 0.5, "half": 0.1}) == "agree"  # one seed: a point
    assert audit_verdict({"mean": 0.7, "half": nan}, {"mean": 0.5, "half": 0.1}) == "differ (kit higher)"
    assert audit_verdict({"mean": nan, "half": nan}, {"mean": 0.5, "half": 0.1}) == "n/a"


def test_settings_reruns_only_those_into_the_previous_run(smoke, tmp_path):
    """``--settings audit``: only E runs; the other settings' rows, config entries and wall time of
    the previous run stay (also when its timing.json predates the recorded parts)."""
    import shutil

    from paper.run import main

    out, _ = smoke
    prev = tmp_path / "prev"
    shutil.copytree(out, prev)

    def load():
        return [json.loads(line) for line in open(prev / "rows.jsonl")]
    before = load()
    timing = json.load(open(prev / "timing.json"))
    old_part = timing.pop("counterfactual_parts")[0]  # as written before parts were recorded
    json.dump(timing, open(prev / "timing.json", "w"))
    main(["--config", "smoke", "--only", "counterfactual", "--settings", "audit", "--out", str(prev), "--no-report"])
    after = load()
    assert [r for r in after if r["setting"] != "audit"] == [r for r in before if r["setting"] != "audit"]

    def keys(rows):
        return sorted((r["seed"], r["target"], r["score"]) for r in rows if r["setting"] == "audit")
    assert keys(after) == keys(before) and len(after) == len(before)
    t = json.load(open(prev / "timing.json"))
    parts = t["counterfactual_parts"]
    assert [sorted(p["settings"]) for p in parts] == [sorted(n for n in old_part["settings"] if n != "audit"), ["audit"]]
    assert parts[0]["seconds"] == old_part["seconds"] and t["counterfactual_seconds"] == pytest.approx(
        sum(p["seconds"] for p in parts))
    conf = json.load(open(prev / "config.json"))
    assert sorted(st["name"] for st in conf["counterfactual"]["settings"]) == \
        sorted(st.name for st in CF_CONFIGS["smoke"].settings)
    for bad in (["--settings", "nope"], ["--only", "canary", "--settings", "audit"]):
        with pytest.raises(SystemExit):
            main(["--config", "smoke", "--out", str(tmp_path / "x"), "--no-report"] + bad)
