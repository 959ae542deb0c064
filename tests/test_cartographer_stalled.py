"""The default Cartographer does not up-sample an ambiguous-hard sample whose loss did not fall over
the burn-in (gdc_ext.cartography.stalled: gain = d - last <= 0), the signature of a wrong label:
it removes it (stalled="remove"), or keeps it once ("keep"); "upsample" is the paper's Algorithm 1.
Measured on the noisy-label benchmark (tests/test_experiments_noisy_labels.py, docs/RESULTS.md)."""
import numpy as np
import pytest
import torch

import gdc_ext
from gdc_ext import Cartographer
from gdc_ext.cartography import multiplicities, quadrants, stalled


def _epoch(carto, losses):
    """One epoch in which sample i's loss is losses[i] (two classes: logits [0, z])."""
    for i, loss in enumerate(losses):
        z = float(np.log(np.expm1(loss)))  # softplus(z) = loss for target 0 with logits [0, z]
        carto.loss(torch.tensor([[0.0, z]], requires_grad=True), torch.tensor([0]), torch.tensor([i])).backward()


# samples 0-3 easy; 4 hard and learnt (loss falls); 5 hard and its loss rises (a wrong label);
# 6 hard and flat; 7 easy-ish
HISTORY = [[0.1, 0.1, 0.2, 0.1, 3.0, 2.0, 2.5, 0.6],
           [0.05, 0.1, 0.1, 0.1, 1.0, 3.0, 2.5, 0.5]]


@pytest.mark.parametrize("mode, mult6", [("remove", 0.0), ("keep", 1.0), ("upsample", 2.0)])
def test_stalled_ambiguous_hard_samples(mode, mult6):
    kw = {} if mode == "remove" else {"stalled": mode}
    carto = Cartographer(num_samples=8, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5, **kw)
    assert carto.stalled == mode and carto.config()["stalled"] == mode
    for losses in HISTORY:
        _epoch(carto, losses)
        carto.end_epoch()
    s = carto.state.scores()
    gain = s.gain.numpy()
    assert carto.stalled_mask.tolist() == (gain <= 0).tolist() == stalled(s).tolist()
    codes = carto.quadrants.codes.numpy()
    assert codes[4] == 3 and codes[5] == 1 and codes[6] == 1  # 4: high gain; 5, 6: hard, no gain
    m = carto.multiplicities().numpy()
    assert m[5] == m[6] == mult6  # loss rose (5) or stayed (6): stalled
    want = multiplicities(carto.quadrants, gamma=2.0, stalled=None if mode == "upsample" else stalled(s),
                          stalled_multiplicity={"remove": 0.0, "keep": 1.0, "upsample": 1.0}[mode])
    assert m.tolist() == want.tolist()
    # resume: the mask is saved with the labels
    sd = carto.state_dict()
    b = Cartographer(num_samples=8, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5, **kw)
    b.load_state_dict(sd)
    assert b.multiplicities().tolist() == m.tolist() and list(b.sampler()) == list(carto.sampler())


def test_a_checkpoint_from_before_the_option_resumes_with_the_papers_rule():
    carto = Cartographer(num_samples=8, burn_in=2, eps=1.0, stalled="upsample")
    for losses in HISTORY:
        _epoch(carto, losses)
        carto.end_epoch()
    old = carto.state_dict()
    del old["config"]["stalled"], old["stalled"]  # what a Cartographer before issue 19 saved
    Cartographer(num_samples=8, burn_in=2, eps=1.0, stalled="upsample").load_state_dict(old)
    with pytest.raises(ValueError, match="stalled is 'upsample' in the saved one but 'remove' here"):
        Cartographer(num_samples=8, burn_in=2, eps=1.0).load_state_dict(old)
    bad = carto.state_dict()
    bad["config"]["stalled"] = "remove"
    bad["stalled"] = None
    with pytest.raises(ValueError, match="stalled must be a bool tensor"):
        Cartographer(num_samples=8, burn_in=2, eps=1.0).load_state_dict(bad)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="stalled must be one of 'keep', 'remove', 'upsample'"):
        Cartographer(num_samples=8, burn_in=2, eps=1.0, stalled="drop")
    q = quadrants(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0]), 0.5, 0.5)
    with pytest.raises(ValueError, match="stalled must be a bool mask"):
        multiplicities(q, stalled=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="multiplicities must be >= 0"):
        multiplicities(q, stalled=torch.tensor([True, False, True]), stalled_multiplicity=-1.0)
    assert gdc_ext.cartography.stalled is stalled
