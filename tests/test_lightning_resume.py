"""Lightning CartoCallback resume (issue 17, items 8 and 9): the checkpoint entry is checked before use.

A checkpoint without the entry, with a damaged one (sha256), an incomplete one, or one of another
global step raises ValueError, unless CartoCallback(..., carto_resume="fresh"); a refused entry
leaves the Cartographer / CartoState bit-identical.
"""
import glob
import os
import warnings

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.lightning import CHECKPOINT_KEY, CartoCallback  # noqa: E402

N, SEQ, VOCAB = 16, 6, 12


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (N, SEQ + 1), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.x[i, :-1], self.x[i, 1:], i


class _LM(L.LightningModule):
    def __init__(self, loss, cb=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB)
        self.loss_fn = loss
        self.cb = cb if cb is not None and cb.sampling else None  # sampling=False: loss weights only

    def training_step(self, batch, i):
        x, y, ids = batch
        if self.loss_fn is None:  # a run without gdc_ext
            return torch.nn.functional.cross_entropy(self.out(self.emb(x)).flatten(0, 1), y.flatten())
        return self.loss_fn(self.out(self.emb(x)).flatten(0, 1), y.flatten(), ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        s = self.cb.sampler() if self.cb is not None else None
        if s is None:
            s = torch.utils.data.DistributedSampler(_Data(), num_replicas=1, rank=0, shuffle=True, seed=0)
        return torch.utils.data.DataLoader(_Data(), batch_size=4, sampler=s)


def _carto():
    return gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5, gamma=2.0, alpha=0.5)


def _fit(out, epochs, target=None, ckpt_path=None, every_n_train_steps=None, **cb_kw):
    cb = None if target is None else CartoCallback(target, **cb_kw)
    loss = None if target is None else target.loss if isinstance(target, gdc_ext.Cartographer) \
        else gdc_ext.CartoLoss(state=target)
    every = dict(every_n_epochs=1, filename="{epoch}") if every_n_train_steps is None else \
        dict(every_n_train_steps=every_n_train_steps, filename="{step}")
    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(out), save_top_k=-1, **every)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[c for c in (cb, ckpt) if c is not None],
                        reload_dataloaders_every_n_epochs=1, deterministic=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        trainer.fit(_LM(loss, cb), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints epoch=0..2 of a Cartographer run (labelled at the end of epoch 2)."""
    out = tmp_path_factory.mktemp("lightning_ckpts")
    _fit(out, 3, _carto())
    paths = sorted(glob.glob(str(out / "*.ckpt")))
    assert [os.path.basename(p) for p in paths] == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    return paths


def _load(path):
    return torch.load(path, weights_only=False)


def _snapshot(carto):
    snap = {k: v.clone() for k, v in carto.state.tensors().items()}
    snap["codes"] = None if carto.quadrants is None else carto.quadrants.codes.clone()
    snap["weights"] = None if carto.loss.sample_weight is None else carto.loss.sample_weight.clone()
    return snap


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:  # bit for bit (NaN included)
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def _restored(path):
    """A callback whose Cartographer holds the (labelled) state of ``path``."""
    cb = CartoCallback(_carto())
    cb.on_load_checkpoint(None, None, _load(path))
    return cb


def _refused(cb, checkpoint, match):
    before, started = _snapshot(cb.target), cb.started_at
    with pytest.raises(ValueError, match=match):
        cb.on_load_checkpoint(None, None, checkpoint)
    _assert_same(before, _snapshot(cb.target))
    assert cb.started_at == started


def test_a_checkpoint_without_the_entry_raises_unless_fresh(tmp_path):
    _fit(tmp_path / "stock", 1)  # a run without gdc_ext: no entry in its checkpoint
    ckpt = str(tmp_path / "stock" / "epoch=0.ckpt")
    st = gdc_ext.CartoState(N, burn_in=2, eps=1.0)
    with pytest.raises(ValueError, match="checkpoint '.*epoch=0.ckpt' holds no CartoState.*carto_resume='fresh'"):
        _fit(tmp_path / "resumed", 2, st, ckpt_path=ckpt)
    assert st.epochs_done == 0
    with pytest.warns(UserWarning, match="carto_resume='fresh'"):
        _fit(tmp_path / "fresh", 2, st, ckpt_path=ckpt, carto_resume="fresh")
    assert st.epochs_done == 1  # only the epoch after the checkpoint


def test_a_flipped_bit_in_any_tensor_of_the_entry_raises(ckpts):
    cb = _restored(ckpts[2])
    saved = _load(ckpts[1])
    sd = saved[CHECKPOINT_KEY]["state_dict"]
    tensors = [("state", k, v) for k, v in sd["state"].items() if isinstance(v, torch.Tensor)]
    tensors += [("", k, v) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    assert {k for _, k, _ in tensors} >= {"acc", "fstats", "istats", "forgets", "epoch", "eps"}
    for _, _name, t in tensors:
        raw = t.view(-1).view(torch.uint8)
        for pos in (0, raw.numel() // 2, raw.numel() - 1):
            raw[pos] ^= 1 << (pos % 8)
            _refused(cb, saved, f"{CHECKPOINT_KEY!r} entry of the checkpoint is damaged")
            raw[pos] ^= 1 << (pos % 8)
    cb.on_load_checkpoint(None, None, saved)  # undamaged again: loads


@pytest.mark.parametrize("change", ["started_at", "tau_d", "alpha", "global_step_of_entry"])
def test_a_changed_value_in_the_entry_raises(ckpts, change):
    cb = _restored(ckpts[2])
    saved = _load(ckpts[2])
    entry = saved[CHECKPOINT_KEY]
    if change == "started_at":
        entry["started_at"] = 3
    elif change == "tau_d":
        entry["state_dict"]["tau_d"] += 1e-12
    elif change == "alpha":
        entry["state_dict"]["config"]["alpha"] = 0.25
    else:
        entry["global_step"] += 1
    _refused(cb, saved, "damaged")


def test_an_entry_of_another_checkpoint_raises(ckpts):
    cb = _restored(ckpts[2])
    later, earlier = _load(ckpts[2]), _load(ckpts[1])
    earlier[CHECKPOINT_KEY] = later[CHECKPOINT_KEY]  # a consistent entry, but of a later step
    # 4 batches an epoch during burn-in, then the sampler's epoch (its length depends on the labels)
    step_e, step_l = earlier["global_step"], later["global_step"]
    assert step_e == 8 and step_l > step_e
    _refused(cb, earlier, f"written at global step {step_l} but the checkpoint is of step {step_e}")


@pytest.mark.parametrize("gone", ["state_dict", "global_step", "started_at", "sha256"])
def test_an_incomplete_entry_raises(ckpts, gone):
    cb = _restored(ckpts[2])
    saved = _load(ckpts[1])
    del saved[CHECKPOINT_KEY][gone]
    _refused(cb, saved, f"incomplete: \\['{gone}'\\] missing")


def test_an_entry_of_the_old_version_is_refused_clearly(ckpts):
    cb = _restored(ckpts[2])
    saved = _load(ckpts[1])
    saved[CHECKPOINT_KEY] = {"version": 1, "kind": "cartographer", "state_dict": saved[CHECKPOINT_KEY]["state_dict"],
                             "started_at": None}
    _refused(cb, saved, "written by an older gdc_ext \\(entry version 1")


def test_a_refused_resume_through_fit_names_the_file_and_changes_nothing(tmp_path, ckpts):
    carto = _restored(ckpts[2]).target
    before = _snapshot(carto)
    saved = _load(ckpts[1])
    saved[CHECKPOINT_KEY]["state_dict"]["state"]["fstats"].view(-1).view(torch.uint8)[5] ^= 4
    bad = str(tmp_path / "bad.ckpt")
    torch.save(saved, bad)
    with pytest.raises(ValueError, match="entry of checkpoint '.*bad.ckpt' is damaged"):
        _fit(tmp_path / "out", 3, carto, ckpt_path=bad)
    _assert_same(before, _snapshot(carto))


def test_carto_resume_is_checked():
    with pytest.raises(ValueError, match="carto_resume must be one of 'exact', 'fresh'"):
        CartoCallback(_carto(), carto_resume="maybe")


# ------------------------------------------------------------------------------------------------
# the HF item-1 bug in Lightning: ModelCheckpoint(every_n_train_steps=...) saves in on_train_batch_end,
# before on_train_epoch_end; resuming from a save at an epoch's last batch, Lightning goes on with the
# next epoch without calling on_train_epoch_end for that one, so the epoch must be folded already.

@pytest.mark.parametrize("step", [4, 8, 12])  # the last batches of epochs 1, 2 and 3
def test_resume_from_a_step_checkpoint_at_an_epoch_end_equals_the_uninterrupted_run(tmp_path, step):
    # loss weights only (sampling=False): Lightning itself skips batches when it resumes from a step
    # checkpoint at an epoch's end and the next epoch has another length (as the CartoSampler's has)
    full = _carto()
    _fit(tmp_path / "full", 3, full, sampling=False)
    cut = _carto()
    _fit(tmp_path / "cut", 3, cut, every_n_train_steps=2, sampling=False)
    ckpt = tmp_path / "cut" / f"step={step}.ckpt"
    assert _load(ckpt)[CHECKPOINT_KEY]["state_dict"]["state"]["epoch"].item() == step // 4
    _assert_same(_snapshot(full), _snapshot(cut))  # saving changes nothing
    resumed = _carto()  # a fresh process
    _fit(tmp_path / "resumed", 3, resumed, ckpt_path=str(ckpt), sampling=False)
    assert resumed.intervening and resumed.loss.sample_weight is not None
    assert resumed.state.epochs_done == 3
    _assert_same(_snapshot(full), _snapshot(resumed))
