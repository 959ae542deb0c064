"""The demo's full loop on a tiny configuration (the default run is `make demo`)."""
import math

from examples import demo


def test_demo_smoke(tmp_path, capsys):
    png, state = tmp_path / "map.png", tmp_path / "s.safetensors"
    r = demo.main(["--samples", "120", "--val", "20", "--seq-len", "12", "--burn-in", "1", "--label-after", "2",
                   "--epochs", "3", "--hidden", "32", "--dim", "16", "--out", str(png), "--state", str(state)])
    out = capsys.readouterr().out
    assert "hotspot-memorized" in out and "with interventions" in out and "canaries:" in out
    assert png.stat().st_size > 10_000 and state.stat().st_size > 0
    for k in ("before", "plain", "after"):
        assert math.isfinite(r[k]["val_ppl"]) and r[k]["val_ppl"] > 1.0
    assert r["n_canary"] == 6
    # detection of the canaries, every score side by side, AUROC in [0, 1]
    table = out[out.index("detection of the canaries"):].splitlines()[2:9]
    assert [line.split()[0] for line in table] == ["memorization", "loss", "gain", "last", "excess", "excess", "random"]
    for line in table:
        auroc = float(line.split()[-2])
        assert 0.0 <= auroc <= 1.0


def test_demo_excess_uses_the_unigram_reference(tmp_path, capsys):
    demo.main(["--samples", "80", "--val", "10", "--seq-len", "10", "--burn-in", "1", "--label-after", "2",
               "--epochs", "3", "--hidden", "16", "--dim", "8", "--out", "", "--state", "", "--by", "excess"])
    assert "prune top 5% by excess" in capsys.readouterr().out
