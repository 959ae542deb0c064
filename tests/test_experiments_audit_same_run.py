"""The audit kit's table against the reproduction's own metric code on the kit's planted canaries, in
the same run (issue 22's target "the audit kit's table on its planted canaries agrees with the
reproduction's"): the kit's AUROC / recall (gdc_ext.audit) equal paper.scores.detection_metrics
on the same values, positives and negatives, up to the documented tie rule of recall; settings E /
E' record both (paper.counterfactual.run_audit_job, columns repro_*) and the report compares them."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdc_ext import audit
from paper.counterfactual import CF_CONFIGS, _edge_tied, run_family
from paper.report_counterfactual import SAME_TOL, same_run_verdict, summarize_audit
from paper.scores import RECALL_PS, detection_metrics

AUDIT = ("audit", "audit_b")


@settings(max_examples=60, deadline=None)
@given(n_neg=st.integers(1, 40), n_pos=st.integers(1, 20), levels=st.integers(2, 1000), seed=st.integers(0, 2**31))
def test_kit_metrics_equal_the_reproductions(n_neg, n_pos, levels, seed):
    """Same values, positives, negatives: the two AUROCs are equal (ties half in both, NaN lowest),
    and the recalls are equal wherever the budget's edge is not inside a run of tied values."""
    rng = np.random.default_rng(seed)
    n = n_neg + n_pos
    v = rng.integers(0, levels, n).astype(np.float64)  # few levels: ties; many: mostly distinct
    v[rng.random(n) < 0.1] = np.nan                   # unscored samples rank lowest in both
    pos = np.zeros(n, dtype=bool)
    pos[rng.choice(n, n_pos, replace=False)] = True
    own = detection_metrics(v, pos, ~pos)
    kit_auroc = audit.auroc(v[pos], v[~pos])
    assert kit_auroc == pytest.approx(own["auroc"], abs=1e-12)
    for q in RECALL_PS:
        kit = audit.recall_at(v, np.flatnonzero(pos), q)
        if not _edge_tied(v, q):
            assert kit == pytest.approx(own[f"recall@{q:.0%}"], abs=1e-12), q


def test_edge_tied_known_answers():
    v = np.array([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, np.nan, -1.0, 2.0])  # N = 10
    assert not _edge_tied(v, 0.1)        # top 1: 5
    assert not _edge_tied(v, 0.2)        # top 2: 5, 4
    assert _edge_tied(v, 0.3)            # one slot left for three 3.0s
    assert not _edge_tied(v, 0.5)        # top 5: all three 3.0s fit
    assert not _edge_tied(v, 0.0) and not _edge_tied(v, 1.0)
    assert _edge_tied(np.zeros(10), 0.1)  # every value tied (m_i = 0 everywhere)
    assert _edge_tied(np.array([1.0] + [np.nan] * 9), 0.2)  # NaNs tie among themselves at the edge


def test_same_run_verdict_rules():
    k = {"mean": 0.9, "half": 0.01}
    assert same_run_verdict([(0.9, 0.9), (0.8, 0.8 + SAME_TOL / 2)], k, k) == "equal"
    assert same_run_verdict([(0.1, 0.0), (0.5, 0.5)], k, k, tied=[True, False]) == "tie rule"
    assert same_run_verdict([(0.1, 0.0)], k, {"mean": 0.9, "half": 0.02}, tied=[False]) == "agree"
    assert same_run_verdict([(0.9, 0.5)], k, {"mean": 0.5, "half": 0.01}) == "differ (kit higher)"
    assert same_run_verdict([(float("nan"), 0.5)], k, k) == "n/a"
    assert same_run_verdict([], k, k) == "n/a"


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory):
    cfg = CF_CONFIGS["smoke"]
    cfg = dataclasses.replace(cfg, settings=[s for s in cfg.settings if s.name in AUDIT])
    out = str(tmp_path_factory.mktemp("audit_same_run"))
    return out, run_family(cfg, out, workers=1, progress=False)


def test_audit_rows_carry_the_reproductions_metrics(audit_rows):
    _, rows = audit_rows
    assert rows and {r["setting"] for r in rows} == set(AUDIT)
    for r in rows:
        assert r["repro_auroc"] == pytest.approx(r["auroc"], abs=SAME_TOL), (r["setting"], r["seed"], r["score"])
        for q in ("1%", "5%", "10%"):
            if not r[f"repro_edge_tied@{q}"]:
                assert r[f"repro_recall@{q}"] == pytest.approx(r[f"recall@{q}"], abs=SAME_TOL), (r["score"], q)


def test_audit_summary_states_the_same_run_verdicts(audit_rows):
    from paper.report_counterfactual import audit_section

    out, rows = audit_rows
    for setting in AUDIT:
        a = summarize_audit(rows, out, setting=setting)
        assert a["same_run_measured"] == list(a["scores"])
        for n, v in a["scores"].items():
            assert v["same_run"]["auroc"]["verdict"] == "equal", (setting, n)
            assert v["same_run"]["recall"]["verdict"] in ("equal", "tie rule"), (setting, n)
        assert a["same_run_equal"] == list(a["scores"]) and a["same_run_agree"] == list(a["scores"])
        text = "\n".join(audit_section(a))
        assert "The target's comparison, on the same run" in text
        assert f"agrees with the reproduction's code on {len(a['scores'])} of {len(a['scores'])} scores" in text
