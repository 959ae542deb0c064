"""`gdc` CLI over a saved state, and the data map figure."""
import json
import os
import subprocess
import sys

import numpy as np
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


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory, state_file):
    """The same per-sample reference in the three accepted formats, and bad files."""
    d = tmp_path_factory.mktemp("ref")
    ref = np.linspace(0.5, 4.0, N)
    np.save(d / "ref.npy", ref)
    torch.save(torch.from_numpy(ref), d / "ref.pt")
    (d / "ref.txt").write_text("".join(f"{float(v)!r}\n" for v in ref))
    np.save(d / "short.npy", ref[:-1])
    (d / "negative.txt").write_text("".join(f"{float(v)!r}\n" for v in ref[:-1]) + "-0.5\n")
    (d / "nan.txt").write_text("".join(f"{float(v)!r}\n" for v in ref[:-1]) + "nan\n")
    (d / "words.txt").write_text("1.0\nnot-a-number\n")
    np.save(d / "two_d.npy", ref.reshape(2, -1))
    (d / "bad.pt").write_bytes(b"not a torch file")
    torch.save({"ref": torch.from_numpy(ref)}, d / "dict.pt")
    return d, ref


def test_report_json_matches_library(state_file, capsys):
    path, scores = state_file
    assert cli.main(["report", path, "--json", "--alpha-m", "0.5", "--eps-index", "0", "--top-k", "3",
                     "--by", "memorization"]) == 0
    out = json.loads(capsys.readouterr().out)
    q = scores.quadrants(0.75, 0.5, eps_index=0)
    assert out["by"] == "memorization"
    assert out["tau_d"] == pytest.approx(q.tau_d) and out["tau_m"] == pytest.approx(q.tau_m)
    assert {r["quadrant"]: r["n"] for r in out["quadrants"]} == q.counts()
    hot = [h["id"] for h in out["top_hotspots"]]
    assert 0 < len(hot) <= 3 and all(int(q.codes[i]) == 2 for i in hot)
    m = scores.memorization_at(1.0)
    assert [h["memorization"] for h in out["top_hotspots"]] == sorted((float(m[i]) for i in hot), reverse=True)
    assert float(m[hot[0]]) == float(m[q.codes == 2].max())
    order = gdc_ext.selection_order(gdc_ext.score_values(scores, "memorization"), scores.difficulty)
    assert [h["id"] for h in out["top_candidates"]] == order[:3].tolist()


def test_report_default_score_and_top_candidates(state_file, reference_files, capsys):
    path, scores = state_file
    assert cli.main(["report", path, "--json", "--top-k", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by"] == gdc_ext.DEFAULT_SCORE
    default = gdc_ext.score_values(scores, gdc_ext.DEFAULT_SCORE)
    top = [h["id"] for h in out["top_candidates"]]
    assert top == gdc_ext.selection_order(default, scores.difficulty)[:5].tolist()
    assert [h["score"] for h in out["top_candidates"]] == pytest.approx(default[top].tolist())
    q = scores.quadrants(by=gdc_ext.DEFAULT_SCORE)
    assert {r["quadrant"]: r["n"] for r in out["quadrants"]} == q.counts() and out["tau_m"] == pytest.approx(q.tau_m)
    d, ref = reference_files
    assert cli.main(["report", path, "--json", "--top-k", "4", "--reference", str(d / "ref.npy")]) == 0
    out = json.loads(capsys.readouterr().out)  # a reference alone selects DEFAULT_REFERENCE_SCORE
    calibrated = gdc_ext.score_values(scores, gdc_ext.cartography.DEFAULT_REFERENCE_SCORE, reference=ref)
    assert out["by"] == gdc_ext.cartography.DEFAULT_REFERENCE_SCORE and [h["id"] for h in out["top_candidates"]] == \
        gdc_ext.selection_order(calibrated, scores.difficulty)[:4].tolist()
    assert cli.main(["report", path, "--by", "gain"]) == 0
    text = capsys.readouterr().out
    assert "top 10 candidates by gain" in text and "learning gain" in text


def test_report_table(state_file, capsys):
    path, _ = state_file
    assert cli.main(["report", path]) == 0
    out = capsys.readouterr().out
    assert "hotspot-memorized" in out and "tau_d" in out and f"N = {N}" in out


def test_select_quadrant_and_prune(state_file, reference_files, tmp_path, capsys):
    path, scores = state_file
    out = tmp_path / "ids.txt"
    assert cli.main(["select", path, "--quadrant", "2", "-o", str(out), "--by", "memorization"]) == 0
    ids = [int(x) for x in out.read_text().split()]
    assert ids == torch.nonzero(scores.quadrants().codes == 2).flatten().tolist()
    assert cli.main(["select", path, "--quadrant", "3", "-o", str(out)]) == 0  # default axis: DEFAULT_SCORE
    ids = [int(x) for x in out.read_text().split()]
    assert ids == torch.nonzero(scores.quadrants(by=gdc_ext.DEFAULT_SCORE).codes == 3).flatten().tolist()
    d, ref = reference_files
    for by in gdc_ext.cartography.available_scores(scores, ref):  # a state without cartography=True
        extra = ["--reference", str(d / "ref.txt")] if by in ("excess", "relative_excess") else []
        assert cli.main(["select", path, "--prune", "0.1", "--by", by, "-o", str(out), "--seed", "4"] + extra) == 0
        kept = [int(x) for x in out.read_text().split()]
        assert kept == gdc_ext.prune(scores, 0.1, by=by, reference=ref, seed=4).tolist() and len(kept) == N - 4
    assert cli.main(["select", path, "--prune", "0.1", "--removed"]) == 0
    removed = [int(x) for x in capsys.readouterr().out.split()]
    kept = gdc_ext.prune(scores, 0.1, by=gdc_ext.DEFAULT_SCORE).tolist()  # the CLI's default score
    assert sorted(removed + kept) == list(range(N)) and len(removed) == 4
    for name in ("ref.npy", "ref.pt", "ref.txt"):  # three formats, one answer
        assert cli.main(["select", path, "--prune", "0.25", "--reference", str(d / name)]) == 0
        got = [int(x) for x in capsys.readouterr().out.split()]
        assert got == gdc_ext.prune(scores, 0.25, by=gdc_ext.cartography.DEFAULT_REFERENCE_SCORE, reference=ref).tolist()


@pytest.mark.parametrize("args, message", [
    (["--by", "excess"], "--by excess needs --reference"),
    (["--by", "relative_excess"], "--by relative_excess needs --reference"),
    (["--by", "relative_excess", "--reference", "{d}/negative.txt"], "non-negative"),
    (["--reference", "{d}/missing.npy"], "--reference: no file at"),
    (["--reference", "{d}/short.npy"], "got 39 values"),
    (["--reference", "{d}/nan.txt"], "NaN/inf"),
    (["--reference", "{d}/words.txt"], "line 2 is not a float"),
    (["--reference", "{d}/two_d.npy"], "got shape"),
    (["--reference", "{d}/bad.pt"], "cannot read"),
    (["--reference", "{d}/dict.pt"], "reference must be"),
])
def test_bad_reference_exits_2(state_file, reference_files, tmp_path, capsys, args, message):
    path, _ = state_file
    d, _ = reference_files
    args = [a.format(d=d) for a in args]
    for cmd in (["select", path, "--prune", "0.1"], ["report", path], ["plot", path, "-o", str(tmp_path / "x.png")]):
        assert cli.main(cmd + args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        cli.main(["select", path, "--prune", "0.1", "--by", "entropy"])
    assert e.value.code == 2


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
    assert ax.get_ylabel().startswith("memorization m (forget rate, eps = 1 nats)")
    with pytest.raises(ValueError, match="highlight"):
        data_map(scores, highlight=[N])
    with pytest.raises(ValueError, match="jitter"):
        data_map(scores, jitter=-1)


def test_data_map_by_any_score(state_file, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gdc_ext.cartography import SCORE_LABELS
    from gdc_ext.plot import data_map

    _, scores = state_file
    ref = np.linspace(0.5, 4.0, N)
    for by in gdc_ext.cartography.available_scores(scores, ref):  # a state without cartography=True
        fig = data_map(scores, by=by, reference=ref, jitter=0)
        ax = fig.axes[0]
        if by != "memorization":
            assert ax.get_ylabel() == SCORE_LABELS[by] and fig.axes[1].get_xlabel().startswith(SCORE_LABELS[by])
        y = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])  # the plotted points
        expect = gdc_ext.score_values(scores, by, reference=ref).numpy()
        np.testing.assert_allclose(np.sort(y), np.sort(expect[~np.isnan(expect)]))
        q = scores.quadrants(by=by, reference=ref)
        assert [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"][-1] == q.tau_m
        plt.close(fig)
    with pytest.raises(ValueError, match="needs reference"):
        data_map(scores, by="excess")
    png = tmp_path / "gain.png"
    assert cli.main(["plot", state_file[0], "-o", str(png), "--by", "gain"]) == 0 and png.stat().st_size > 20_000
