"""`gdc` CLI over a saved state, and the data map figure."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gdc_ext
from gdc_ext import cli

N = 40


@pytest.fixture(scope="module")
def state_file(tmp_path_factory):
    """A state with a real history: some samples learnt, some forgotten, some never learnt."""
    g = torch.Generator().manual_seed(0)
    state = gdc_ext.CartoState(N, burn_in=2, eps=[1.0, 2.0])
    loss_fn = gdc_ext.CartoLoss(state=state)
    level = torch.rand(N, generator=g) * 6
    for _ in range(5):
        flip = torch.rand(N, generator=g) < 0.3
        lv = torch.where(flip, 6 - level, level)
        logits = torch.zeros(N, 3, 8)
        logits[:, :, 0] = lv[:, None]
        loss_fn(logits.reshape(-1, 8).requires_grad_(), torch.zeros(N * 3, dtype=torch.long), torch.arange(N))
        state.end_epoch()
    path = tmp_path_factory.mktemp("state") / "carto.safetensors"
    state.save(path)
    return str(path), state.scores()


def test_report_json_matches_library(state_file, capsys):
    path, scores = state_file
    assert cli.main(["report", path, "--json", "--alpha-m", "0.5", "--eps-index", "0", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    q = scores.quadrants(0.75, 0.5, eps_index=0)
    assert out["tau_d"] == pytest.approx(q.tau_d) and out["tau_m"] == pytest.approx(q.tau_m)
    assert {r["quadrant"]: r["n"] for r in out["quadrants"]} == q.counts()
    hot = [h["id"] for h in out["top_hotspots"]]
    assert 0 < len(hot) <= 3 and all(int(q.codes[i]) == 2 for i in hot)
    m = scores.memorization_at(1.0)
    assert [h["memorization"] for h in out["top_hotspots"]] == sorted((float(m[i]) for i in hot), reverse=True)
    assert float(m[hot[0]]) == float(m[q.codes == 2].max())


def test_report_table(state_file, capsys):
    path, _ = state_file
    assert cli.main(["report", path]) == 0
    out = capsys.readouterr().out
    assert "hotspot-memorized" in out and "tau_d" in out and f"N = {N}" in out


def test_select_quadrant_and_prune(state_file, tmp_path, capsys):
    path, scores = state_file
    out = tmp_path / "ids.txt"
    assert cli.main(["select", path, "--quadrant", "2", "-o", str(out)]) == 0
    ids = [int(x) for x in out.read_text().split()]
    assert ids == torch.nonzero(scores.quadrants().codes == 2).flatten().tolist()
    for by in ("memorization", "loss", "random"):
        assert cli.main(["select", path, "--prune", "0.1", "--by", by, "-o", str(out)]) == 0
        kept = [int(x) for x in out.read_text().split()]
        assert kept == gdc_ext.prune(scores, 0.1, by=by).tolist() and len(kept) == N - 4
    assert cli.main(["select", path, "--prune", "0.1", "--removed"]) == 0
    removed = [int(x) for x in capsys.readouterr().out.split()]
    assert sorted(removed + gdc_ext.prune(scores, 0.1).tolist()) == list(range(N))


def test_errors_exit_2_without_traceback(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no state file" in err and "Traceback" not in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    for cmd in (["report", str(bad)], ["plot", str(bad), "-o", str(tmp_path / "x.png")],
                ["select", str(bad), "--quadrant", "0"]):
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err
        assert "cannot read state file" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors also exit 2
        cli.main(["select", str(bad)])
    assert e.value.code == 2


def test_eps_index_out_of_range(state_file, capsys):
    path, _ = state_file
    assert cli.main(["report", path, "--eps-index", "5"]) == 2
    assert "--eps-index" in capsys.readouterr().err


def test_plot_command(state_file, tmp_path):
    path, _ = state_file
    png = tmp_path / "map.png"
    assert cli.main(["plot", path, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_installed_script(state_file, tmp_path):
    path, _ = state_file  # one subprocess (each costs a torch import): a report over a real state file
    gdc = os.path.join(os.path.dirname(sys.executable), "gdc")
    r = subprocess.run([gdc, "report", path, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_samples"] == N


def test_cli_does_not_import_the_reference(state_file):
    """The NumPy reference is the tests' oracle: the CLI computes with the library only."""
    path, _ = state_file
    code = ("import sys\n"
            "from gdc_ext import cli\n"
            f"assert cli.main(['report', {path!r}, '--json']) == 0\n"
            f"assert cli.main(['select', {path!r}, '--prune', '0.1', '-o', '-']) == 0\n"
            "print('REFERENCE_LOADED', 'gdc_ext.reference' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "REFERENCE_LOADED False"


def test_data_map_figure(state_file, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from gdc_ext.plot import data_map

    _, scores = state_file
    fig = data_map(scores, highlight=[0, 1], path=tmp_path / "m.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    counts = scores.quadrants().counts()
    for code, name in gdc_ext.QUADRANT_NAMES.items():
        if code >= 0:
            assert f"{code} {name} (n={counts[name]})" in labels
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 2  # tau_d and tau_m
    assert len(fig.axes) == 3 and fig.axes[1].get_yscale() == "log"
    with pytest.raises(ValueError, match="highlight"):
        data_map(scores, highlight=[N])
    with pytest.raises(ValueError, match="jitter"):
        data_map(scores, jitter=-1)
