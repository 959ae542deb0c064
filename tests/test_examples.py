"""Smoke tests of examples/: they run (tiny settings), print sane numbers, and have a --help."""
import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
from helpers import HANG_GUARD_S

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"gdc_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_DIFFUSION = ["--rows", "100", "--dup-rows", "5", "--copies", "8", "--epochs", "60", "--draws", "4",
                  "--width", "128", "--burn-in", "5"]


@pytest.mark.parametrize("seed", [0, 1])
def test_diffusion_tabular_runs_and_finds_duplicates_by_last_loss(seed, capsys):
    r = _load("diffusion_tabular").main(TINY_DIFFUSION + ["--seed", str(seed)])
    out = capsys.readouterr().out
    assert "AUROC" in out and r["samples"] == 100 + 5 * 7 and r["duplicated_samples"] == 40
    assert len(r["auroc"]) == 4 and all(0.0 <= v <= 1.0 for v in r["auroc"].values())
    # Robust across seeds (checked on seeds 0-5 at these settings: 0.57-0.72): copies of a
    # duplicated row end with a lower loss than the other rows.
    assert r["auroc"]["-last loss"] > 0.5


def test_auroc_helper():
    auroc = _load("diffusion_tabular").auroc
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


def test_nanogpt_runs_and_records_every_document(capsys):
    r = _load("nanogpt").main(["--epochs", "6", "--block", "32", "--n-layer", "1", "--n-embd", "32", "--repeats", "3",
                               "--top", "5"])
    out = capsys.readouterr().out
    assert "memorization candidates" in out
    assert r["documents"] == 36 + 3 and len(r["top"]) == 5
    assert all(0.0 <= t["memorization"] <= 1.0 and math.isfinite(t["difficulty"]) for t in r["top"])
    assert r["observed_every_epoch"]  # packed per-token ids reach every document every epoch
    assert math.isfinite(r["final_loss"])


def test_nanogpt_packing_gives_each_target_its_documents_id():
    m = _load("nanogpt")
    docs = ["ab", "cde", "f"]
    stoi = {c: i for i, c in enumerate(sorted(set("".join(docs) + "\n")))}
    import torch

    x, y, ids = m.pack(docs, stoi, torch.tensor([2, 0, 1]), block=4)
    # stream "f\nab\ncde\n" with owners 2 2 0 0 0 1 1 1 1; targets are tokens 1..
    owners = [2, 0, 0, 0, 1, 1, 1, 1]
    assert ids.reshape(-1)[:len(owners)].tolist() == owners
    assert ids.reshape(-1)[len(owners):].tolist() == [-1] * (ids.numel() - len(owners))
    assert (y.reshape(-1)[len(owners):] == -100).all()


@pytest.mark.parametrize("name", ["diffusion_tabular", "nanogpt"])
def test_examples_have_help(name):
    out = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0 and "--epochs" in out.stdout and "--seed" in out.stdout
