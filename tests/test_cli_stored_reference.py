"""`gdc report / plot / select` with a reference stored in the state file (issue 22: "references are
saved with the state"): used without --reference (the first saved, or --stored-reference NAME),
named on stderr and in the output; --reference FILE overrides it (and says so); --no-reference
ignores it; a damaged stored reference is a one-line error naming the file; checkpoint folders
whose state file a Cartographer wrote score with its reference."""
import json

import numpy as np
import pytest
import torch

import gdc_ext
from gdc_ext import cli
from gdc_ext._state_file import write_state_file
from gdc_ext.integrations.files import CHECKPOINT_PREFIX, STATE_FILE

N = 40


def _state(seed=0):
    s = gdc_ext.CartoState(N, burn_in=1, eps=[0.5, 1.0])
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        s.record(torch.rand(N, generator=g) * 3, torch.arange(N))
        s.end_epoch()
    return s


REF = np.random.default_rng(1).uniform(0.5, 4.0, N)
OTHER = np.random.default_rng(2).uniform(0.5, 4.0, N)


@pytest.fixture()
def files(tmp_path):
    s = _state()
    stored = tmp_path / "stored.safetensors"
    s.save(stored, references={"crossfit": REF, "initial": OTHER})
    plain = tmp_path / "plain.safetensors"
    s.save(plain)
    np.save(tmp_path / "ref.npy", REF)
    np.save(tmp_path / "other.npy", OTHER)
    return tmp_path, stored, plain


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def _report(argv, capsys):
    code, out, err = _run(["report", *argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out), err


def test_report_uses_the_first_stored_reference(files, capsys):
    tmp, stored, plain = files
    got, err = _report([stored], capsys)
    want, err_file = _report([plain, "--reference", tmp / "ref.npy"], capsys)
    assert got["by"] == gdc_ext.cartography.DEFAULT_REFERENCE_SCORE == want["by"]
    assert got["reference_stored"] == "crossfit" and got["reference"] == f"'crossfit' stored in {stored}"
    assert err.strip() == (f"gdc report: using the reference 'crossfit' stored in {stored} (--reference FILE "
                           f"overrides it, --no-reference ignores it)")
    # the same numbers as the same values given as a file
    for key in ("tau_d", "tau_m", "quadrants", "top_candidates", "top_hotspots"):
        assert got[key] == want[key], key
    assert err_file == "" and want["reference"] == str(tmp / "ref.npy") and want["reference_stored"] is None


def test_stored_reference_by_name(files, capsys):
    tmp, stored, _ = files
    got, err = _report([stored, "--stored-reference", "initial"], capsys)
    want, _ = _report([stored, "--reference", tmp / "other.npy"], capsys)
    assert got["reference_stored"] == "initial" and "'initial' stored in" in err
    assert got["top_candidates"] == want["top_candidates"]
    code, out, err = _run(["select", stored, "--prune", "0.1", "--stored-reference", "nope"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (f"gdc select: error: --stored-reference 'nope': {str(stored)!r} stores no reference of "
                           f"that name (it stores: 'crossfit', 'initial')")


def test_reference_file_overrides_and_says_so(files, capsys):
    tmp, stored, _ = files
    got, err = _report([stored, "--reference", tmp / "other.npy"], capsys)
    assert got["reference"] == str(tmp / "other.npy") and got["reference_stored"] is None
    assert err.strip() == (f"gdc report: --reference {tmp / 'other.npy'} overrides the reference(s) 'crossfit', "
                           f"'initial' stored in {stored}")


def test_no_reference_ignores_the_stored_ones(files, capsys):
    _, stored, plain = files
    got, err = _report([stored, "--no-reference"], capsys)
    want, _ = _report([plain], capsys)
    assert got["by"] == gdc_ext.DEFAULT_SCORE and got["reference"] is None and err == ""
    assert got["top_candidates"] == want["top_candidates"]
    code, _, err = _run(["report", stored, "--no-reference", "--by", "excess"], capsys)
    assert code == 2 and "--by excess needs --reference FILE" in err and "stored in the state file" in err


def test_reference_options_are_exclusive(files, capsys):
    tmp, stored, _ = files
    with pytest.raises(SystemExit):
        cli.main(["report", str(stored), "--reference", str(tmp / "ref.npy"), "--no-reference"])
    assert "not allowed with" in capsys.readouterr().err


def test_text_report_names_the_reference(files, capsys):
    _, stored, _ = files
    code, out, _ = _run(["report", stored, "--top", "2"], capsys)
    assert code == 0
    assert f"reference 'crossfit' stored in {stored}" in out.splitlines()[2]


def test_select_and_plot_use_it(files, capsys):
    tmp, stored, plain = files
    code, out, err = _run(["select", stored, "--prune", "0.2", "--json"], capsys)
    assert code == 0 and "'crossfit' stored in" in err
    sel = json.loads(out)
    code, out2, _ = _run(["select", plain, "--prune", "0.2", "--json", "--reference", tmp / "ref.npy"], capsys)
    assert sel["ids"] == json.loads(out2)["ids"]
    assert sel["selection"]["reference_stored"] == "crossfit" and sel["selection"]["by"] == "excess"
    pytest.importorskip("matplotlib")
    code, out, err = _run(["plot", stored, "-o", tmp / "map.png"], capsys)
    assert code == 0 and (tmp / "map.png").is_file() and "'crossfit' stored in" in err


def test_relative_excess_refuses_a_negative_stored_reference(tmp_path, capsys):
    s = _state()
    neg = REF.copy()
    neg[3] = -0.5
    path = tmp_path / "s.safetensors"
    s.save(path, references={"r": neg})
    code, _, err = _run(["report", path, "--by", "relative_excess"], capsys)
    assert code == 2 and f"--reference 'r' stored in {path}" in err and "negative" in err


def test_damaged_stored_reference_is_a_clear_error(tmp_path, capsys):
    """A faulty writer's file (valid checksum, a NaN in the reference): one line naming the file and
    the reference, pointing at --reference / --no-reference; with --no-reference the state reads."""
    s = _state()
    meta = dict(s._meta(), references=["crossfit"])
    ref = torch.from_numpy(REF.copy())
    ref[7] = float("nan")
    tensors = {n: t.contiguous() for n, t in s.tensors().items()}
    tensors["reference/crossfit"] = ref
    path = tmp_path / "s.safetensors"
    write_state_file(str(path), tensors, json.dumps(meta))
    code, out, err = _run(["report", path], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"cannot read the references stored in {str(path)!r}" in err
    assert "stored reference 'crossfit' is damaged" in err and "--no-reference ignores them" in err
    code, _, _ = _run(["report", path, "--no-reference"], capsys)
    assert code == 0


def test_checkpoint_folders_score_with_the_cartographers_reference(tmp_path, capsys):
    """A training output folder whose checkpoints a Cartographer wrote: its reference is in the
    state file (save_state; the Hugging Face writer calls the same), the last checkpoint is read."""
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference=REF)
    g = torch.Generator().manual_seed(0)
    for step in (2, 5):
        carto.state.record(torch.rand(N, generator=g) * 3, torch.arange(N))
        carto.end_epoch()
        folder = tmp_path / f"{CHECKPOINT_PREFIX}-{step}"
        folder.mkdir()
        carto.save_state(folder / STATE_FILE)
    got, err = _report([tmp_path], capsys)
    chosen = tmp_path / f"{CHECKPOINT_PREFIX}-5" / STATE_FILE
    assert got["reference_stored"] == "given" and got["epochs"] == 2
    assert err.splitlines()[0].startswith(f"gdc: reading {chosen}")
    assert err.splitlines()[1].startswith(f"gdc report: using the reference 'given' stored in {chosen}")


def test_cartotrainer_checkpoints_carry_the_initial_reference(tmp_path, capsys):
    """A real CartoTrainer run with Cartographer(reference="initial") saving checkpoints: `gdc
    report OUTPUT_DIR` reads the last checkpoint's state file and scores with the base model's
    reference, the values the Cartographer measured."""
    transformers = pytest.importorskip("transformers")
    from gdc_ext.integrations.hf import CartoCollator, CartoTrainer
    from helpers import TokenData, lm_batch

    n, length, vocab = 12, 8, 64
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32,
                                                                 n_layer=1, n_head=2, bos_token_id=0,
                                                                 eos_token_id=0))
    carto = gdc_ext.Cartographer(n, burn_in=2, eps=4.0, alpha_d=0.5, alpha_m=0.5, reference="initial")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="epoch",
                                          logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                                          disable_tqdm=True)
    CartoTrainer(model=model, args=args, train_dataset=TokenData(n, length, vocab),
                 data_collator=CartoCollator(lm_batch), cartographer=carto).train()
    capsys.readouterr()  # the Trainer's own prints
    got, err = _report([tmp_path], capsys)
    assert got["reference_stored"] == "initial" and got["by"] == gdc_ext.cartography.DEFAULT_REFERENCE_SCORE
    assert f"{CHECKPOINT_PREFIX}-6" in err.splitlines()[0] and "'initial' stored in" in err.splitlines()[1]
    stored = gdc_ext.CartoState.load_references(tmp_path / f"{CHECKPOINT_PREFIX}-6" / STATE_FILE)
    assert torch.equal(stored["initial"], carto.reference)
