"""Detection scores, selection, detection metrics, duplicate counts and goldfish masks of the
reproduction (paper/scores.py, paper/goldfish.py), on hand-made inputs with known answers."""
import math

import numpy as np
import pytest
import torch

from paper.goldfish import apply_target_mask, goldfish_mask
from paper.scores import (auroc, detection_metrics, duplicate_counts, excess, gain, neg_last, recall_at, score_table,
                          select_top)


def _S(d, last, m, forgets=None):
    """A real gdc_ext.Scores with the given difficulty, last loss and memorization [N, K]."""
    import gdc_ext

    d = torch.tensor(d, dtype=torch.float64)
    m = torch.tensor(m, dtype=torch.float64)
    m = m[:, None] if m.dim() == 1 else m
    n, k = m.shape
    f = torch.zeros(n, k, dtype=torch.int32) if forgets is None else torch.as_tensor(forgets).reshape(n, k)
    return gdc_ext.Scores(difficulty=d, memorization_by_eps=m, forgets_by_eps=f,
                          transitions=torch.ones(n, dtype=torch.int32), observed=torch.ones(n, dtype=torch.int32),
                          last_loss=torch.tensor(last, dtype=torch.float64), min_loss=None, loss_mean=None,
                          loss_std=None, grad_energy=None, eps=tuple(float(e) for e in range(1, k + 1)), epoch=1,
                          burn_in=1)


def test_auroc_known_answers():
    pos = np.array([True, True, False, False])
    assert auroc([4, 3, 2, 1], pos) == 1.0
    assert auroc([1, 2, 3, 4], pos) == 0.0
    assert auroc([1, 1, 1, 1], pos) == 0.5
    assert auroc([3, 1, 2, 0], pos) == 0.75  # 3 of 4 pairs ordered right
    # unscored (NaN) counts below every scored sample
    assert auroc([np.nan, 5, 1, 2], pos) == 0.5
    # explicit negatives: the unlisted sample (index 2) is left out
    assert auroc([4, 0, 9, 1], pos, negative=np.array([False, False, False, True])) == 0.5
    assert math.isnan(auroc([1, 2], np.array([True, True])))


def test_select_top_and_recall():
    v = np.array([0.5, np.nan, 3.0, 3.0, 1.0, 2.0])
    assert select_top(v, 0.4).tolist() == [2, 3]  # round(0.4 * N=6) = 2, as gdc_ext.prune
    # ties broken by the tie-break (higher first), then lower id
    assert select_top(v, 0.2, tiebreak=np.array([0, 0, 1, 2, 0, 0])).tolist() == [3]
    assert select_top(v, 0.2).tolist() == [2]
    assert select_top(v, 1.0).tolist() == [0, 1, 2, 3, 4, 5]  # unscored (NaN) last, chosen only when all are
    assert select_top(v, 0.0).tolist() == []
    with pytest.raises(ValueError, match="fraction"):
        select_top(v, 1.5)
    pos = np.array([False, False, True, False, False, True])
    assert recall_at(select_top(v, 0.4), pos) == 0.5
    m = detection_metrics(v, pos, ps=(0.2, 0.4, 0.6))
    assert m["recall@20%"] == 0.5 and m["recall@40%"] == 0.5 and m["recall@60%"] == 1.0
    assert m["auroc"] == pytest.approx(auroc(v, pos))


def test_selection_matches_library_prune():
    """Where the library's prune() has the same criterion, the reproduction's selection agrees."""
    import gdc_ext

    rng = np.random.default_rng(3)
    N = 200
    d = rng.random(N)
    d[rng.random(N) < 0.05] = np.nan
    m = np.round(rng.random((N, 3)) * 4) / 4  # many ties
    s = _S(d, rng.random(N), m)
    for j in range(3):
        for p in (0.05, 0.1, 0.33):
            removed = select_top(m[:, j], p, tiebreak=d, scored=~np.isnan(d))
            kept = gdc_ext.prune(s, p, by="memorization", eps_index=j).numpy()
            assert np.array_equal(np.setdiff1d(np.arange(N), kept), removed)
            removed = select_top(d, p)
            kept = gdc_ext.prune(s, p, by="loss").numpy()
            assert np.array_equal(np.setdiff1d(np.arange(N), kept), removed)


def test_scores_definitions():
    s = _S([2.0, 1.0, np.nan], [0.5, 1.5, np.nan], [[0.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    assert np.allclose(gain(s)[:2], [1.5, -0.5]) and np.isnan(gain(s)[2])
    assert np.allclose(excess(s, [3.0, 3.0, 3.0])[:2], [2.5, 1.5])
    assert np.allclose(neg_last(s)[:2], [-0.5, -1.5])
    with pytest.raises(ValueError, match="reference"):
        excess(s, [1.0, 2.0])
    t = score_table(s, (0.1, 0.2), 1, {"unigram": np.array([3.0, 3.0, 3.0])}, np.array([0.0, 1.0, 1.0]), seed=0)
    assert t["m"].tolist() == [1.0, 0.0, 0.0] and t["m@0.1"].tolist() == [0.0, 0.5, 0.0]
    assert {"d", "gain", "-last", "excess_unigram", "ref_unigram", "duplicates", "random"} <= set(t)
    assert np.isnan(t["random"][2]) and np.isfinite(t["random"][:2]).all()


def test_duplicate_counts():
    x = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [2, 1]])
    assert duplicate_counts(x).tolist() == [2, 0, 2, 2, 0]
    with pytest.raises(ValueError, match="train"):
        duplicate_counts(np.zeros(3))


def test_goldfish_mask_rate_and_determinism():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 500, (2000, 33), generator=g)
    for k in (2, 4, 8):
        rate = goldfish_mask(x, k=k, h=4).float().mean().item()
        assert abs(rate - 1 / k) < 4 * math.sqrt((1 / k) * (1 - 1 / k) / x[:, 1:].numel())
    m = goldfish_mask(x, k=4, h=4)
    assert m.shape == (2000, 32) and m.dtype == torch.bool
    assert torch.equal(m, goldfish_mask(x, k=4, h=4))  # deterministic
    assert not torch.equal(m, goldfish_mask(x, k=4, h=4, seed=1))  # the seed picks another hash
    # the mask of a target depends only on the h tokens before it: a copy gets the same mask, and
    # a change at position j moves only the targets whose context contains j
    y = x.clone()
    y[1] = x[0]
    my = goldfish_mask(y, k=4, h=4)
    assert torch.equal(my[1], my[0])
    z = x.clone()
    z[0, 10] += 1
    diff = (goldfish_mask(z, k=4, h=4)[0] != m[0]).nonzero().flatten().tolist()
    assert all(10 <= t <= 13 for t in diff)  # targets 11..14 (indices 10..13 of the mask)
    assert goldfish_mask(x, k=1).all()
    with pytest.raises(ValueError, match="k"):
        goldfish_mask(x, k=0)
    with pytest.raises(ValueError, match="tokens"):
        goldfish_mask(torch.zeros(5, dtype=torch.long))
    t = apply_target_mask(x[:2, 1:], m[:2])
    assert (t[m[:2]] == -100).all() and torch.equal(t[~m[:2]], x[:2, 1:][~m[:2]])


def test_verdicts():
    from paper.report import detection_verdict, intervention_verdict

    assert "finds" in detection_verdict(0.9, 0.05)
    assert detection_verdict(0.52, 0.05) == "no better than chance"
    assert "below" in detection_verdict(0.3, 0.05)
    assert "cuts" in intervention_verdict(-0.5, 0.2, 0.6, "extraction")
    assert intervention_verdict(-0.5, 0.6, 0.6, "extraction") == "no significant change"
    assert intervention_verdict(-0.5, 0.2, 0.0, "extraction").startswith("not tested")


def test_detection_and_intervention_sections_on_synthetic_rows(tmp_path):
    """The report sections read the rows, not a pasted run: a score that separates perfectly gets
    'finds', one at chance does not; a method that halves extraction on every seed 'cuts' it."""
    from paper.report_detection import detection_section, intervention_section

    rows = []
    rng = np.random.default_rng(0)
    for s in range(5):
        base = {"experiment": "canary", "seed": s, "protocol": "whole-run", "corpus": "c"}
        for score, a in (("gain", 0.95 + 0.01 * rng.random()), ("m", 0.5 + 0.02 * rng.standard_normal())):
            rows.append({**base, "method": "detect", "target": "canary", "score": score, "positives": 10, "auroc": a,
                         "recall@1%": 0.1, "recall@2%": 0.2, "recall@5%": 0.5, "recall@10%": 0.9})
        common = {"pruned_weight": 0.1, "canaries_hit": 0.5, "injected_hit": 0.0, "exposure": 10.0,
                  "mia_loss_auc": 0.7, "perplexity": 10.0}
        rows.append({**base, **common, "method": "none", "fraction": 0.0, "extraction": 0.6 + 0.02 * s})
        rows.append({**base, **common, "method": "gain", "fraction": 0.1, "extraction": 0.3 + 0.01 * s})
        rows.append({**base, **common, "method": "random", "fraction": 0.1, "extraction": 0.6 + 0.02 * s})
    text = "\n".join(detection_section(rows, {}, str(tmp_path)))
    assert "| gain d_i - last_i | 0.95" in text and "**finds memorized samples** |" in text
    m_line = [ln for ln in text.splitlines() if ln.startswith("| m_i (fixed")][0]
    assert m_line.endswith("no better than chance |")
    assert "Best model-based score (n = 5 seeds): **gain d_i - last_i**" in text
    text = "\n".join(intervention_section(rows, {"goldfish_k": 4, "goldfish_h": 4, "flag_by": "excess"}))
    gain_line = [ln for ln in text.splitlines() if ln.startswith("| prune top-p by gain")][0]
    assert "-50.0%" in gain_line and "**cuts extraction**" in gain_line
    rnd = [ln for ln in text.splitlines() if ln.startswith("| prune p at random")][0]
    assert "no significant change" in rnd
    assert "Statistical power" in text


def test_extraction_eval_mixed_prefix_lengths():
    """Real-text canary names tokenize to different lengths: extraction must not stack them."""
    from types import SimpleNamespace

    from paper.data import Canary
    from paper.run import _extraction_eval

    table = torch.arange(12)
    table[10], table[3], table[1], table[4] = 3, 1, 4, 1  # after 10: 3 1 4 1 ...

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.full((*x.shape, 12), -20.0)
            return out.scatter(2, table[x][..., None], 20.0)

    canaries = [Canary(torch.tensor([7, 10]), torch.tensor([3, 1, 4]), 1, [0]),
                Canary(torch.tensor([7, 8, 10]), torch.tensor([3, 1, 5]), 2, [1])]
    corpus = SimpleNamespace(canaries=canaries, valid=torch.tensor([[10, 3, 1, 4]]))
    out = _extraction_eval(Oracle(), corpus)
    assert out["extraction"] == 0.5 and out["extraction_r1"] == 1.0 and out["extraction_r2"] == 0.0
