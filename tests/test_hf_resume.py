"""CartoTrainer resume (issue 17, items 1, 8 and 9): exact from every checkpoint, strict about the gdc files.

Item 1: the Trainer writes a step checkpoint at an epoch's last step before it calls on_epoch_end;
resuming from such a checkpoint must not merge the epoch with the next one. Item 9: missing, partial,
damaged or mismatched gdc files raise unless CartoTrainer(..., carto_resume="fresh"). Item 8 (side
file): the metadata JSON carries a checksum verified on load.
"""
import functools
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import (META_FILE, STATE_FILE, CartoCollator, CartoTrainer,  # noqa: E402
                                     load_carto_checkpoint)
from helpers import TokenData, lm_batch  # noqa: E402

N, L, VOCAB = 12, 8, 64
EPOCHS = 3
_Data = functools.partial(TokenData, N, L, VOCAB)


def _gpt2():
    torch.manual_seed(0)
    # no dropout: the comparison is about the CartoState, not about HF's RNG bookkeeping
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                 eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _carto():
    # labels fixed at the end of epoch 2: epoch 3 trains with loss weights, so they are compared too
    return gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=3.5, alpha_d=0.5, alpha_m=0.5, label_after=2)


def _trainer(out, carto, callbacks=(), carto_resume=None, **kw):
    # The Trainer's defaults (save_strategy="steps", linear schedule) except what makes the tiny run
    # small and deterministic: batch 4 of 12 samples (3 batches an epoch), CPU, no reports.
    base = dict(output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    base.update(kw)
    return CartoTrainer(model=_gpt2(), args=transformers.TrainingArguments(**base), train_dataset=_Data(),
                        data_collator=CartoCollator(lm_batch), cartographer=carto, callbacks=list(callbacks),
                        **({} if carto_resume is None else {"carto_resume": carto_resume}))


def _snapshot(carto):
    """Everything a resume restores, as plain tensors: the state's tensors, labels, loss weights."""
    snap = {k: v.clone() for k, v in carto.state.tensors().items()}
    snap["codes"] = None if carto.quadrants is None else carto.quadrants.codes.clone()
    snap["tau"] = None if carto.quadrants is None else (carto.quadrants.tau_d, carto.quadrants.tau_m)
    snap["weights"] = None if carto.loss.sample_weight is None else carto.loss.sample_weight.clone()
    return snap


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k],
                               b[k].view(torch.uint8) if b[k].is_floating_point() else b[k]), k  # bit for bit
        else:
            assert a[k] == b[k], k


def _assert_scores_equal(a, b):
    for f in ("difficulty", "memorization", "forgets", "transitions", "observed", "last_loss", "min_loss",
              "loss_mean", "loss_std", "grad_energy"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0, equal_nan=True, msg=f)
    assert (a.eps, a.epoch, a.burn_in) == (b.eps, b.epoch, b.burn_in)


# ------------------------------------------------------------------------------------------------
# item 1: resuming from any checkpoint equals the uninterrupted run

_RUNS = {}


def _runs(tmp_path_factory, ga):
    """An uninterrupted run (no checkpoints) and the same run writing a checkpoint at every step
    (save_strategy "steps", the default, save_steps=1); made once per module and ``ga``. With
    gradient accumulation 2 an epoch of 3 batches is 2 optimizer steps, the last one of 1 batch."""
    if ga not in _RUNS:
        root = tmp_path_factory.mktemp(f"resume_ga{ga}")
        ref = _carto()
        _trainer(root / "ref", ref, save_strategy="no", gradient_accumulation_steps=ga).train()
        saving = _carto()
        _trainer(root / "ckpt", saving, save_steps=1, gradient_accumulation_steps=ga).train()
        steps = sorted(int(d.split("-")[1]) for d in os.listdir(root / "ckpt") if d.startswith("checkpoint-"))
        assert steps == list(range(1, EPOCHS * (3 if ga == 1 else 2) + 1))
        _RUNS[ga] = dict(ga=ga, root=root, ref=ref, saving=saving, steps=steps)
    return _RUNS[ga]


@pytest.fixture(scope="module", params=[1, 2], ids=["ga1", "ga2"])
def runs(request, tmp_path_factory):
    return _runs(tmp_path_factory, request.param)


def test_checkpoints_do_not_change_the_run(runs):
    assert runs["ref"].state.epochs_done == EPOCHS
    _assert_same(_snapshot(runs["ref"]), _snapshot(runs["saving"]))


@pytest.mark.parametrize("ga,step", [(1, s) for s in range(1, 3 * EPOCHS + 1)] + [(2, s) for s in range(1, 2 * EPOCHS + 1)])
def test_resume_from_every_step_checkpoint_equals_the_uninterrupted_run(tmp_path_factory, ga, step):
    runs = _runs(tmp_path_factory, ga)
    resumed = _carto()  # a fresh process: fresh model, fresh Cartographer
    folder = runs["root"] / "ckpt" / f"checkpoint-{step}"
    tr = _trainer(runs["root"] / f"resumed-{step}", resumed, save_strategy="no",
                  gradient_accumulation_steps=runs["ga"])
    tr.train(resume_from_checkpoint=str(folder))
    ref = runs["ref"]
    assert resumed.state.epochs_done == EPOCHS
    _assert_scores_equal(ref.state.scores(), resumed.state.scores())
    assert resumed.intervening
    _assert_same(_snapshot(ref), _snapshot(resumed))  # scores, labels and loss weights, bit for bit


def test_the_checkpoint_at_an_epoch_end_holds_the_folded_epoch(runs):
    per_epoch = len(runs["steps"]) // EPOCHS
    for step in runs["steps"]:
        st = gdc_ext.CartoState.load(runs["root"] / "ckpt" / f"checkpoint-{step}" / STATE_FILE)
        assert st.epochs_done == step // per_epoch, step
        assert (float(st.acc.abs().sum()) == 0) == (step % per_epoch == 0), step


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("how", ["epoch_strategy_stop_mid_epoch", "max_steps_mid_epoch", "max_steps_at_epoch_end"])
def test_resume_after_a_cut_short_run_equals_the_uninterrupted_run(tmp_path, how):
    # A run stopped mid-epoch folds its cut-short epoch when train() ends, but every checkpoint of it
    # (also one the "epoch" strategy writes after on_epoch_end) holds the open epoch, so a resume
    # continues that epoch instead of counting its two parts as two epochs.
    const = dict(lr_scheduler_type="constant")  # the cut run's schedule must not depend on its length
    ref = _carto()
    _trainer(tmp_path / "ref", ref, save_strategy="no", **const).train()
    cut = _carto()
    if how == "epoch_strategy_stop_mid_epoch":
        _trainer(tmp_path / "cut", cut, callbacks=[_StopAt(4)], save_strategy="epoch", **const).train()
        stop = 4
    else:
        stop = 4 if how == "max_steps_mid_epoch" else 6
        _trainer(tmp_path / "cut", cut, max_steps=stop, **const).train()
    assert cut.state.epochs_done == 2  # the cut-short epoch is folded as it stands when train() returns
    folder = tmp_path / "cut" / f"checkpoint-{stop}"
    assert gdc_ext.CartoState.load(folder / STATE_FILE).epochs_done == stop // 3
    resumed = _carto()
    _trainer(tmp_path / "cut", resumed, **const).train(resume_from_checkpoint=str(folder))
    _assert_same(_snapshot(ref), _snapshot(resumed))


# ------------------------------------------------------------------------------------------------
# item 9: missing, partial, damaged or mismatched gdc files raise (unless carto_resume="fresh");
# a refused resume leaves the Cartographer bit-identical. Item 8: the metadata's checksum.

@pytest.fixture
def ckpts(tmp_path_factory, tmp_path):
    """A copy of the ga=1 run's checkpoint folders (1..9), free to damage."""
    shutil.copytree(_runs(tmp_path_factory, 1)["root"] / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def labelled(tmp_path_factory):
    """Makes a Cartographer restored from an undamaged checkpoint of the ga=1 run: labelled (7, 8,
    9) or not, with an epoch accumulator or not, so a refused resume that changed it would show."""
    src = _runs(tmp_path_factory, 1)["root"] / "ckpt"

    def make(step=7):
        return _loaded(src / f"checkpoint-{step}")
    return make


def _loaded(folder):
    carto = _carto()
    load_carto_checkpoint(str(folder), carto.state, carto)
    return carto


def _refused(tmp_path, folder, error, match, carto, **kw):
    assert carto.intervening
    before = _snapshot(carto)
    tr = _trainer(tmp_path / "out", carto, save_strategy="no", **kw)
    with pytest.raises(error, match=match):
        tr.train(resume_from_checkpoint=str(folder))
    _assert_same(before, _snapshot(carto))
    assert tr.state.global_step == 0  # refused before the Trainer started


@pytest.mark.parametrize("gone", [STATE_FILE, META_FILE])
def test_a_checkpoint_with_one_gdc_file_raises_unless_fresh(tmp_path, ckpts, labelled, gone):
    folder = ckpts / "checkpoint-4"
    os.remove(folder / gone)
    _refused(tmp_path, folder, FileNotFoundError, f"checkpoint-4.*incomplete: {gone} is missing.*carto_resume='fresh'", labelled())
    carto = _carto()
    with pytest.warns(UserWarning, match="carto_resume='fresh'"):
        _trainer(tmp_path / "fresh", carto, save_strategy="no", carto_resume="fresh").train(
            resume_from_checkpoint=str(folder))
    assert carto.state.epochs_done == EPOCHS - 1  # the epochs after the checkpoint: epoch 2's rest counts as one


def test_gdc_files_of_another_checkpoint_raise(tmp_path, ckpts, labelled):
    # both files of a later checkpoint: the pair is consistent, but not this checkpoint's
    for name in (STATE_FILE, META_FILE):
        shutil.copy(ckpts / "checkpoint-6" / name, ckpts / "checkpoint-3" / name)
    _refused(tmp_path, ckpts / "checkpoint-3", ValueError, f"{META_FILE} was written at global step 6.*step 3", labelled())
    # the state file of the next step (same epochs done, another accumulator) beside this step's metadata
    shutil.copy(ckpts / "checkpoint-5" / STATE_FILE, ckpts / "checkpoint-4" / STATE_FILE)
    _refused(tmp_path, ckpts / "checkpoint-4", ValueError, f"{STATE_FILE} is not the state {META_FILE} was written with", labelled())
    # the folder renamed: the Trainer would resume at trainer_state.json's step 2, the files say 2 too,
    # but the name says 8: refused rather than guessed
    os.rename(ckpts / "checkpoint-8", ckpts / "gone")
    shutil.copytree(ckpts / "checkpoint-2", ckpts / "checkpoint-8")
    _refused(tmp_path, ckpts / "checkpoint-8", ValueError, "global step 2 but the folder's name says step 8", labelled())
    # trainer_state.json of another step: the Trainer would resume elsewhere than the gdc files
    shutil.copy(ckpts / "checkpoint-9" / "trainer_state.json", ckpts / "checkpoint-1" / "trainer_state.json")
    _refused(tmp_path, ckpts / "checkpoint-1", ValueError, "global step 1 but the Trainer's state says step 9", labelled())
    os.remove(ckpts / "checkpoint-2" / "trainer_state.json")
    _refused(tmp_path, ckpts / "checkpoint-2", FileNotFoundError, "no trainer_state.json", labelled())


def test_every_single_bit_flip_in_the_metadata_is_refused_or_harmless(ckpts, labelled):
    folder = ckpts / "checkpoint-7"
    raw = (folder / META_FILE).read_bytes()
    clean = _snapshot(labelled(7))
    refused = 0
    for i in range(len(raw)):
        damaged = bytearray(raw)
        damaged[i] ^= 1 << (i % 8)
        (folder / META_FILE).write_bytes(bytes(damaged))
        carto = labelled(8)
        before = _snapshot(carto)
        try:
            load_carto_checkpoint(str(folder), carto.state, carto)
        except ValueError as e:
            assert META_FILE in str(e) and "checkpoint-7" in str(e), (i, str(e))
            _assert_same(before, _snapshot(carto))
            refused += 1
        else:  # the flip left the parsed values equal (such as 1e-05 -> 1E-05): the same data
            _assert_same(clean, _snapshot(carto))
    assert refused > 0.95 * len(raw)


def test_old_metadata_is_refused_clearly(tmp_path, ckpts, labelled):
    folder = ckpts / "checkpoint-7"
    meta = json.loads((folder / META_FILE).read_text())["payload"]
    old = {k: meta[k] for k in ("format", "epochs_done", "sampler_active", "cartographer")}
    (folder / META_FILE).write_text(json.dumps({**old, "version": 1}))
    _refused(tmp_path, folder, ValueError, "older gdc_ext.*version 1", labelled())


def test_carto_resume_is_checked(tmp_path):
    with pytest.raises(ValueError, match="carto_resume must be one of 'exact', 'fresh'"):
        _trainer(tmp_path, _carto(), carto_resume="maybe")


# ------------------------------------------------------------------------------------------------
# item 9: load_state_dict checks everything before it changes anything

def _labelled(seed):
    carto = _carto()
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        carto.state.record(torch.rand(N, generator=g) * 5, torch.arange(N))
        carto.end_epoch()
    assert carto.intervening
    carto.sampler()
    return carto


def _full_snapshot(carto):
    snap = _snapshot(carto)
    snap["sampler"] = id(carto._sampler)
    return snap


def _bad_dicts(sd):
    st = sd["state"]
    neg = {**st, "istats": -st["istats"] - 1}
    yield "tau_d", {**sd, "tau_d": "x"}                          # used to fail after the state was replaced
    yield "tau_m", {**sd, "tau_m": None}
    yield "negative", {**sd, "state": neg}
    yield "shape", {**sd, "state": {**st, "acc": st["acc"][:-1]}}
    yield "meta", {**sd, "state": {**st, "meta": "not a dict"}}
    yield "codes", {**sd, "codes": sd["codes"].to(torch.int64)}
    yield "codes", {**sd, "codes": object()}
    yield "config", {**sd, "config": "not a dict"}
    yield "config", {**sd, "config": {**sd["config"], "burn_in": 3}}
    yield "reference", {**sd, "reference": "x"}


@pytest.mark.parametrize("i", range(10))
def test_a_rejected_load_state_dict_leaves_the_cartographer_bit_identical(i):
    target = _labelled(1)
    what, bad = list(_bad_dicts(_labelled(2).state_dict()))[i]
    before = _full_snapshot(target)
    with pytest.raises(ValueError):
        target.load_state_dict(bad)
    _assert_same(before, _full_snapshot(target))


def test_a_rejected_load_state_dict_leaves_the_state_bit_identical():
    target = _labelled(1).state
    sd = _labelled(2).state.state_dict()
    for bad in ({**sd, "meta": "not a dict"}, {**sd, "forgets": sd["forgets"] + 99}, {**sd, "epoch": -sd["epoch"] - 1},
                {**sd, "eps": sd["eps"].float()}, {k: v for k, v in sd.items() if k != "fstats"}):
        before = {k: v.clone() for k, v in target.tensors().items()}
        with pytest.raises(ValueError):
            target.load_state_dict(bad)
        for k, v in target.tensors().items():
            assert torch.equal(before[k], v), k
