"""`gdc` over Hugging Face checkpoint folders and training output folders, `select --json`, and the
line that says which ids `select --prune` wrote (issue 20, item 5)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gdc_ext
from gdc_ext import cli
from gdc_ext.integrations.files import CHECKPOINT_PREFIX, STATE_FILE

N = 40


def _state(epochs: int, seed: int = 0) -> gdc_ext.CartoState:
    s = gdc_ext.CartoState(N, burn_in=1, eps=[0.5, 1.0])
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        s.record(torch.rand(N, generator=g) * 3, torch.arange(N))
        s.end_epoch()
    return s


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """A training output folder as the Trainer leaves it: checkpoint-<step> folders, numbered so that
    the last by step (12) is not the last by name (9); checkpoint-20 has no CartoState (a stock
    Trainer's, or an interrupted save); a stray file among them."""
    out = tmp_path_factory.mktemp("run")
    for step, epochs in ((3, 2), (9, 3), (12, 4)):
        folder = out / f"{CHECKPOINT_PREFIX}-{step}"
        folder.mkdir()
        _state(epochs, seed=step).save(folder / STATE_FILE)
    (out / f"{CHECKPOINT_PREFIX}-20").mkdir()
    (out / "config.json").write_text("{}")
    return out


def _report(path, capsys):
    assert cli.main(["report", str(path), "--json"]) == 0, capsys.readouterr().err
    got = capsys.readouterr()
    return json.loads(got.out), got.err


def test_checkpoint_folder_reads_its_state(output_dir, capsys):
    out, err = _report(output_dir / f"{CHECKPOINT_PREFIX}-9", capsys)
    assert out["epochs"] == 3 and out["num_samples"] == N
    assert err == ""  # the folder names its state: nothing to say


def test_output_folder_reads_the_last_checkpoint_by_step(output_dir, capsys):
    out, err = _report(output_dir, capsys)
    assert out["epochs"] == 4  # checkpoint-12, not checkpoint-9 (last by name) nor checkpoint-20 (no state)
    expect = _state(4, seed=12).scores()
    assert out["tau_d"] == pytest.approx(expect.quadrants(by=gdc_ext.DEFAULT_SCORE).tau_d)
    line, = err.splitlines()
    assert os.path.join(str(output_dir), f"{CHECKPOINT_PREFIX}-12", STATE_FILE) in line
    assert f"{CHECKPOINT_PREFIX}-20" in line and "skipped" in line


def test_plot_and_select_take_folders(output_dir, tmp_path, capsys):
    png = tmp_path / "m.png"
    assert cli.main(["plot", str(output_dir), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f"{CHECKPOINT_PREFIX}-12" in capsys.readouterr().err
    assert cli.main(["select", str(output_dir / f"{CHECKPOINT_PREFIX}-3"), "--prune", "0.1"]) == 0
    kept = [int(x) for x in capsys.readouterr().out.split()]
    assert kept == gdc_ext.prune(_state(2, seed=3).scores(), 0.1, by=gdc_ext.DEFAULT_SCORE).tolist()


def test_folders_without_a_state_are_one_error_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    stock = tmp_path / "stock"
    (stock / f"{CHECKPOINT_PREFIX}-5").mkdir(parents=True)
    for folder, says in ((empty, f"nor {CHECKPOINT_PREFIX}-N subfolders"), (stock, "none of its 1")):
        for cmd in (["report", str(folder)], ["select", str(folder), "--quadrant", "2"]):
            assert cli.main(cmd) == 2
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert STATE_FILE in err and says in err and str(folder) in err


def test_state_file_name_is_shared_with_hf():
    """The CLI's name is the one the Trainer integration writes, and the Trainer's folder prefix."""
    hf = pytest.importorskip("gdc_ext.integrations.hf")  # needs transformers
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    assert hf.STATE_FILE == STATE_FILE == "gdc_carto_state.safetensors"
    assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR


def test_cli_reads_a_folder_without_importing_transformers(output_dir):
    code = ("import sys\n"
            "from gdc_ext import cli\n"
            f"assert cli.main(['report', {str(output_dir)!r}, '--json']) == 0\n"
            "print('TRANSFORMERS_LOADED', 'transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "TRANSFORMERS_LOADED False"


def test_select_json(output_dir, tmp_path, capsys):
    path = str(output_dir / f"{CHECKPOINT_PREFIX}-12")
    scores = _state(4, seed=12).scores()
    assert cli.main(["select", path, "--prune", "0.25", "--by", "gain", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    kept = gdc_ext.prune(scores, 0.25, by="gain").tolist()
    assert got["ids"] == kept and got["n"] == len(kept) == N - 10 and got["num_samples"] == N
    sel = got["selection"]
    assert sel["prune"] == 0.25 and sel["by"] == "gain" and sel["ids_are"] == "kept"
    assert sel["kept"] == N - 10 and sel["removed"] == 10 and sel["eps"] == 0.5 and sel["seed"] == 0
    assert got["state_file"].endswith(STATE_FILE)
    out = tmp_path / "removed.json"
    assert cli.main(["select", path, "--prune", "0.25", "--by", "gain", "--removed", "--json", "-o", str(out)]) == 0
    got = json.loads(out.read_text())
    assert sorted(got["ids"] + kept) == list(range(N)) and got["selection"]["ids_are"] == "removed"
    assert cli.main(["select", path, "--quadrant", "2", "--json", "--alpha-m", "0.5"]) == 0
    got = json.loads(capsys.readouterr().out)
    q = scores.quadrants(0.75, 0.5, by=gdc_ext.DEFAULT_SCORE)
    assert got["ids"] == torch.nonzero(q.codes == 2).flatten().tolist()
    assert got["selection"]["quadrant"] == 2 and got["selection"]["tau_m"] == pytest.approx(q.tau_m)
    assert got["selection"]["alpha_m"] == 0.5


def test_select_prune_says_which_ids_it_wrote(output_dir, tmp_path, capsys):
    path = str(output_dir / f"{CHECKPOINT_PREFIX}-12")
    assert cli.main(["select", path, "--prune", "0.1"]) == 0
    got = capsys.readouterr()
    assert len(got.out.split()) == N - 4
    assert "kept 36 ids (removed 4" in got.err and "--removed" in got.err
    ids = tmp_path / "ids.txt"
    assert cli.main(["select", path, "--prune", "0.1", "--removed", "-o", str(ids)]) == 0
    err = capsys.readouterr().err
    assert len(ids.read_text().split()) == 4
    assert "removed 4 ids (kept 36)" in err and str(ids) in err
    assert cli.main(["select", path, "--quadrant", "1"]) == 0
    assert "ids in quadrant 1" in capsys.readouterr().err
    # --removed means nothing with --quadrant: refused instead of silently ignored
    assert cli.main(["select", path, "--quadrant", "1", "--removed"]) == 2
    assert "--removed goes with --prune" in capsys.readouterr().err


def test_select_help_says_prune_writes_the_kept_ids(capsys):
    with pytest.raises(SystemExit):
        cli.main(["select", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "KEPT after pruning" in text and "--removed" in text and "--json" in text
    assert "checkpoint folder" in text


def test_python_dash_m_cli_runs(output_dir):
    r = subprocess.run([sys.executable, "-m", "gdc_ext.cli", "select", str(output_dir), "--quadrant", "0", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["selection"]["quadrant"] == 0


def test_a_real_trainer_output_folder(tmp_path, capsys):
    """The folders a CartoTrainer run really leaves (save_strategy="epoch": checkpoint-3, checkpoint-6)."""
    transformers = pytest.importorskip("transformers")
    from gdc_ext.integrations.hf import CartoCollator, CartoTrainer
    from helpers import TokenData, lm_batch

    n, length, vocab = 12, 8, 64
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="epoch",
                                          logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                                          disable_tqdm=True)
    state = gdc_ext.CartoState(n, burn_in=1, eps=3.0)
    CartoTrainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=TokenData(n, length, vocab),
                 data_collator=CartoCollator(lm_batch), state=state).train()
    capsys.readouterr()  # the Trainer prints its metrics
    assert sorted(os.listdir(tmp_path)) == [f"{CHECKPOINT_PREFIX}-3", f"{CHECKPOINT_PREFIX}-6"]
    out, err = _report(tmp_path, capsys)
    assert out["epochs"] == 2 and out["num_samples"] == n
    assert f"{CHECKPOINT_PREFIX}-6" in err
    out, _ = _report(tmp_path / f"{CHECKPOINT_PREFIX}-3", capsys)
    assert out["epochs"] == 1
