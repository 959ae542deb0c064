"""The cartography group's selections (issue 19): the by= scores, Swayamdipta et al.'s three regions
(against the NumPy reference's selection rule), the data map of kind="cartography", and the CLI's
`gdc plot --kind cartography`, `gdc select --region` and `gdc report` on a saved state; clear
errors for a state recorded without the group."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import gdc_ext
from gdc_ext import cli, reference
from gdc_ext.cartography import NEEDS_GROUP, REGIONS, cartography_regions, score_values
from gdc_ext.plot import data_map

N = 120


def _train(n=N, cartography=True, epochs=6, seed=0):
    """A small noisy-label classifier's state: 5 Gaussian classes, 10% flipped labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.3, (5, 4))
    y = rng.integers(0, 5, n)
    x = torch.from_numpy((centers[y] + rng.normal(0, 1, (n, 4))).astype(np.float32))
    flipped = rng.random(n) < 0.1
    y[flipped] = (y[flipped] + rng.integers(1, 5, int(flipped.sum()))) % 5
    y = torch.from_numpy(y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    state = gdc_ext.CartoState(n, burn_in=2, eps=1.0, cartography=cartography)
    loss_fn = gdc_ext.CartoLoss(state=state)
    for _ in range(epochs):
        for b in torch.randperm(n).split(16):
            opt.zero_grad()
            loss_fn(model(x[b]), y[b], b).backward()
            opt.step()
        state.end_epoch()
    return state, flipped


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("carto")
    state, flipped = _train()
    state.save(d / "carto.gdc")
    plain, _ = _train(cartography=False)
    plain.save(d / "plain.gdc")
    return d, state.scores(), flipped


def test_scores_of_the_group(saved):
    _, s, flipped = saved
    conf, var = s.confidence.numpy(), s.variability.numpy()
    np.testing.assert_array_equal(score_values(s, "confidence").numpy(), conf)
    np.testing.assert_array_equal(score_values(s, "hard_to_learn").numpy(), -conf)
    np.testing.assert_array_equal(score_values(s, "variability").numpy(), var)
    np.testing.assert_array_equal(score_values(s, "accuracy_last").numpy(), s.accuracy_last.numpy())
    f = score_values(s, "forgetting").numpy()
    never = s.never_learnt.numpy()
    assert never.any() and np.all(np.isinf(f[never])) and np.all(f[~never] == s.forgetting.numpy()[~never])
    # never-learnt samples come first, as Toneva et al. rank them
    first = gdc_ext.selection_order(torch.from_numpy(f)).numpy()[:int(never.sum())]
    assert set(first.tolist()) == set(np.flatnonzero(never).tolist())
    # the hard-to-learn order finds the flipped labels (their paper's use)
    kept = gdc_ext.prune(s, float(flipped.mean()), by="hard_to_learn").numpy()
    removed = np.setdiff1d(np.arange(N), kept)
    assert flipped[removed].mean() > 0.5
    cols = gdc_ext.cartography.score_columns(s)
    assert {f"score_{by}" for by in NEEDS_GROUP} <= set(cols) and cols["never_learnt"].dtype == bool


@given(conf=st.lists(st.sampled_from([np.nan, 0.1, 0.2, 0.5, 0.9, 0.95]), min_size=1, max_size=30),
       seed=st.integers(0, 1000), fraction=st.sampled_from([0.0, 0.1, 0.33, 0.5, 1.0]))
def test_regions_equal_the_reference_rule(conf, seed, fraction):
    """cartography_regions (partial sorts) selects what the reference's plain sort selects, ties
    (many here) by lower id, unobserved samples in no region."""
    conf = np.array(conf)
    var = np.where(np.isnan(conf), np.nan, np.random.default_rng(seed).choice([0.0, 0.1, 0.3], len(conf)))

    class S:  # the two columns the regions read
        confidence = torch.from_numpy(conf)
        variability = torch.from_numpy(var)

    got = cartography_regions(S, fraction)
    want = reference.cartography_regions(conf, var, fraction)
    for name in REGIONS:
        assert got[name].tolist() == want[name].tolist(), name
        assert len(got[name]) == round(fraction * int((~np.isnan(conf)).sum()))


def test_state_without_the_group_says_how_to_enable_it(saved):
    d, _, _ = saved
    plain = gdc_ext.CartoState.load(d / "plain.gdc").scores()
    for by in NEEDS_GROUP:
        with pytest.raises(ValueError, match="cartography=True"):
            score_values(plain, by)
    with pytest.raises(ValueError, match="cartography=True"):
        cartography_regions(plain)
    with pytest.raises(ValueError, match="cartography=True"):
        data_map(plain, kind="cartography")
    assert not any(f"score_{by}" in c for by in NEEDS_GROUP for c in gdc_ext.cartography.score_columns(plain))
    with pytest.raises(ValueError, match=r"memorization='hard_to_learn' needs the cartography statistics: "
                                         r"Cartographer\(\.\.\., cartography=True\)"):
        gdc_ext.Cartographer(num_samples=10, burn_in=2, eps=1.0, memorization="hard_to_learn")
    gdc_ext.Cartographer(num_samples=10, burn_in=2, eps=1.0, memorization="hard_to_learn", cartography=True)


def test_cli_select_region(saved, capsys):
    d, s, _ = saved
    regions = cartography_regions(s)
    for name in REGIONS:
        assert cli.main(["select", str(d / "carto.gdc"), "--region", name, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["ids"] == regions[name].tolist() and out["selection"]["region"] == name
        assert len(out["ids"]) == round(0.33 * N)
    assert cli.main(["select", str(d / "carto.gdc"), "--region", "ambiguous", "--region-fraction", "0.1"]) == 0
    captured = capsys.readouterr()
    assert [int(x) for x in captured.out.split()] == cartography_regions(s, 0.1)["ambiguous"].tolist()
    assert "12 ids in the ambiguous region of 120" in captured.err


def test_cli_plot_and_report(saved, capsys, tmp_path):
    d, s, _ = saved
    assert cli.main(["plot", str(d / "carto.gdc"), "--kind", "cartography", "-o", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
    assert cli.main(["report", str(d / "carto.gdc"), "--json", "--by", "hard_to_learn"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by"] == "hard_to_learn"
    assert out["cartography"]["never_learnt"] == int(s.never_learnt.sum())
    assert {k: v["n"] for k, v in out["cartography"]["regions"].items()} == {r: round(0.33 * N) for r in REGIONS}
    assert cli.main(["report", str(d / "carto.gdc")]) == 0
    assert "hard-to-learn" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["select", "{plain}", "--region", "hard-to-learn"],
                                  ["plot", "{plain}", "--kind", "cartography", "-o", "{tmp}/m.png"],
                                  ["report", "{plain}", "--by", "forgetting"],
                                  ["select", "{plain}", "--prune", "0.1", "--by", "confidence"]])
def test_cli_refuses_the_group_scores_of_a_state_without_it(saved, capsys, tmp_path, argv):
    d, _, _ = saved
    argv = [a.format(plain=d / "plain.gdc", tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cartography=True" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_region_refuses_by(saved, capsys):
    d, _, _ = saved
    assert cli.main(["select", str(d / "carto.gdc"), "--region", "ambiguous", "--by", "gain"]) == 2
    assert "--by / --reference are for --quadrant and --prune" in capsys.readouterr().err
    assert cli.main(["select", str(d / "carto.gdc"), "--region", "ambiguous", "--removed"]) == 2
