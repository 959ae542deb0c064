"""Cartographer: Algorithm 1 around a loop (burn-in, fixed labels, interventions, resume)."""
import collections

import pytest
import torch

import gdc_ext
from gdc_ext import Cartographer


def _epoch(carto, order, targets_by_epoch, V=5):
    """One epoch in which sample i's logits predict its target perfectly or not, as scripted:
    targets_by_epoch[i] True -> low loss, False -> high loss."""
    for i in order:
        good = targets_by_epoch[i]
        logits = torch.full((1, 2, V), -4.0)
        logits[..., 0] = 4.0 if good else -4.0
        logits.requires_grad_()
        target = torch.zeros(1, 2, dtype=torch.long)
        carto.loss(logits.reshape(-1, V), target.reshape(-1), torch.tensor([i])).backward()


def test_algorithm_1_phases_and_fixed_labels():
    N = 8
    # difficulty from epoch 1 alone, labels after epoch 3 (forget events over 2 transitions)
    # stalled="upsample": the paper's table, every ambiguous-hard sample up-sampled (the default removes
    # those whose loss did not fall, as sample 6's: tests/test_cartographer_stalled.py)
    carto = Cartographer(num_samples=N, burn_in=1, eps=1.0, alpha_d=0.5, alpha_m=0.5, gamma=3.0, alpha=0.25,
                         keep_outliers=False, seed=7, label_after=3, memorization="memorization", stalled="upsample")
    # 0-3 learnt every epoch (easy); 4-5 learnt, forgotten, relearnt (memorized); 6 never learnt
    # (hard); 7 hard in epoch 1 and forgotten later (noisy outlier).
    script = [
        [True, True, True, True, True, True, False, False],
        [True, True, True, True, False, False, False, True],
        [True, True, True, True, True, True, False, False],
    ]
    assert carto.loss.state is carto.state and not carto.intervening
    with pytest.raises(RuntimeError, match="no labels yet"):
        carto.sampler()
    started = []
    for e in range(3):
        _epoch(carto, range(N), script[e])
        started.append(carto.end_epoch())
    assert started == [False, False, True]
    q = carto.quadrants
    assert carto.intervening and q.codes.tolist() == [0, 0, 0, 0, 2, 2, 1, 3]
    w = carto.loss.sample_weight
    assert w.tolist() == [1, 1, 1, 1, 0.25, 0.25, 1, 1]
    assert carto.multiplicities().tolist() == [1, 1, 1, 1, 1, 1, 3, 0]
    s = carto.sampler()
    assert s is carto.sampler() and s.epoch == 3
    assert collections.Counter(s) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 3}
    first = list(s)
    _epoch(carto, list(s), [False] * N)  # everything forgotten now: labels must not move
    assert carto.end_epoch() is False
    assert carto.quadrants.codes.tolist() == q.codes.tolist()
    assert s.epoch == 4 and collections.Counter(s) == collections.Counter(first)  # integer multiplicities
    assert int(carto.state.scores().observed[7]) == 3  # removed outlier not seen in epoch 4


def test_default_score_labels_rote_learnt_samples():
    """The default memorized axis is DEFAULT_SCORE ("gain", the best worst case of the
    reproduction without a reference): samples that are hard during burn-in and learnt at the end
    (rote learning, no forget event) are the ones selected; "last" ties them with easy samples."""
    N = 8
    default = Cartographer(num_samples=N, burn_in=1, eps=1.0, alpha_d=0.5, alpha_m=0.5, label_after=3)
    assert default.memorization == gdc_ext.DEFAULT_SCORE == "gain" and default.config()["memorization"] == "gain"
    carto = Cartographer(num_samples=N, burn_in=1, eps=1.0, alpha_d=0.5, alpha_m=0.5, label_after=3,
                         memorization="last")
    # 0-3 easy throughout; 4-5 hard, hard, then learnt (rote); 6 never learnt; 7 learnt then lost
    script = [[True] * 4 + [False, False, False, True],
              [True] * 4 + [False, False, False, True],
              [True] * 4 + [True, True, False, False]]
    for e in range(3):
        _epoch(carto, range(N), script[e])
        carto.end_epoch()
        _epoch(default, range(N), script[e])
        default.end_epoch()
    # -last loss: 0-5 end equally low; only the tie-break by higher d puts the rote-learnt 4-5 first
    assert carto.prune(0.25).tolist() == [0, 1, 2, 3, 6, 7]
    # the default, gain: high and d high for 4-5: quadrant 3 (removed by the sampler), 6 hard without gain;
    # its loss never fell (stalled), so the default removes it too (stalled="upsample" would give it gamma)
    assert default.quadrants.codes.tolist() == [0, 0, 0, 0, 3, 3, 1, 0]
    assert default.multiplicities().tolist() == [1, 1, 1, 1, 0, 0, 0, 1]
    assert bool(default.stalled_mask[6]) and not default.stalled_mask[[4, 5]].any()
    assert default.prune(0.25).tolist() == [0, 1, 2, 3, 6, 7]
    assert torch.equal(default.prune(0.25), gdc_ext.prune(default.state.scores(), 0.25, by="gain"))
    # the paper's m_i finds no forget event in samples 4-5 (their loss only falls)
    assert default.state.scores().memorization_at()[[4, 5]].tolist() == [0.0, 0.0]


def test_excess_choice_and_state_dict_round_trip():
    N = 6
    ref = torch.linspace(1.0, 3.0, N, dtype=torch.float64)
    kw = dict(num_samples=N, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5, seed=1, memorization="excess",
              reference=ref.numpy())
    a = Cartographer(**kw)
    for e in range(2):
        _epoch(a, range(N), [(i + e) % 3 == 0 for i in range(N)])
        a.end_epoch()
    s = a.state.scores()
    expect = gdc_ext.quadrants(s.difficulty, s.excess(ref), 0.5, 0.5)
    assert a.quadrants.codes.tolist() == expect.codes.tolist()
    assert torch.equal(a.prune(0.5), gdc_ext.prune(s, 0.5, by="excess", reference=ref))
    sd = a.state_dict()
    assert sd["config"]["memorization"] == "excess" and torch.equal(sd["reference"], ref)
    b = Cartographer(**{**kw, "reference": ref})  # a tensor, the same values
    b.load_state_dict(sd)
    assert b.quadrants.codes.tolist() == a.quadrants.codes.tolist() and torch.equal(b.reference, a.reference)
    assert torch.equal(b.prune(0.5), a.prune(0.5)) and list(b.sampler()) == list(a.sampler())
    for other, match in ((dict(reference=ref + 1), "reference"), (dict(memorization="gain", reference=None),
                                                                  "memorization")):
        c = Cartographer(**{**kw, **other})
        with pytest.raises(ValueError, match=match):
            c.load_state_dict(sd)
        assert not c.intervening
    # a state_dict saved before the choice existed (no "memorization", no "reference") used m_i
    old = Cartographer(num_samples=N, burn_in=2, eps=1.0, memorization="memorization").state_dict()
    del old["config"]["memorization"], old["reference"]
    Cartographer(num_samples=N, burn_in=2, eps=1.0, memorization="memorization").load_state_dict(old)
    with pytest.raises(ValueError, match="memorization"):
        Cartographer(num_samples=N, burn_in=2, eps=1.0, memorization="gain").load_state_dict(old)


def test_state_dict_resume():
    N = 6
    kw = dict(num_samples=N, burn_in=2, eps=[0.5, 1.0], alpha_d=0.5, alpha_m=0.5, gamma=2.0, alpha=0.5, seed=1,
              eps_index=1)
    a = Cartographer(**kw)
    for e in range(2):
        _epoch(a, range(N), [(i + e) % 2 == 0 for i in range(N)])
        a.end_epoch()
    assert a.intervening
    sd = a.state_dict()
    b = Cartographer(**kw)
    b.load_state_dict(sd)
    assert b.intervening and b.quadrants.codes.tolist() == a.quadrants.codes.tolist()
    assert torch.equal(b.loss.sample_weight, a.loss.sample_weight)
    assert list(b.sampler()) == list(a.sampler())
    for name, t in a.state.tensors().items():
        assert torch.equal(t, b.state.tensors()[name])
    c = Cartographer(**{**kw, "gamma": 3.0})
    with pytest.raises(ValueError, match="gamma"):
        c.load_state_dict(sd)
    assert not c.intervening
    fresh = Cartographer(**kw)
    a.load_state_dict(fresh.state_dict())  # back to burn-in
    assert not a.intervening and a.loss.sample_weight is None


@pytest.mark.parametrize("kw, match", [
    (dict(gamma=1.0), "gamma"), (dict(alpha=1.0), "alpha"), (dict(alpha_d=2.0), "alpha_d"),
    (dict(alpha_m=-0.1), "alpha_m"), (dict(burn_in=1), "label_after"), (dict(label_after=1), "label_after"),
    (dict(eps_index=1), "eps_index"), (dict(seed=1.5), "seed"), (dict(num_samples=0), "num_samples"),
    (dict(eps=-1.0), "eps"), (dict(memorization="entropy"), "memorization must be one of"),
    (dict(memorization="excess"), "needs reference"), (dict(memorization="excess", reference=[1.0] * 3), "reference"),
    (dict(reference=[1.0, 2.0, float("nan"), 1.0]), "reference"),
])
def test_bad_arguments(kw, match):
    args = dict(num_samples=4, burn_in=2, eps=1.0)
    with pytest.raises(ValueError, match=match):
        Cartographer(**{**args, **kw})


def test_public_api_and_light_import():
    import subprocess
    import sys

    assert gdc_ext.Cartographer is Cartographer and gdc_ext.CartoSampler is not None
    code = ("import sys, gdc_ext; bad = [m for m in ('matplotlib', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
