"""PyTorch Lightning: CartoCallback on a tiny LightningModule (CPU)."""
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
        self.x[N // 2:, 1:] = self.x[N // 2:, :1]  # half the rows are easy (a repeated token)

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
        self.cb = cb
        self.seen = []  # sample ids per epoch

    def training_step(self, batch, i):
        x, y, ids = batch
        if i == 0:
            self.seen.append([])
        self.seen[-1].extend(ids.tolist())
        return self.loss_fn(self.out(self.emb(x)).flatten(0, 1), y.flatten(), ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        s = self.cb.sampler() if self.cb is not None else None
        if s is None:  # a shuffle seeded per epoch (Lightning calls set_epoch): reproducible across a resume
            s = torch.utils.data.DistributedSampler(_Data(), num_replicas=1, rank=0, shuffle=True, seed=0)
        return torch.utils.data.DataLoader(_Data(), batch_size=4, sampler=s)


def _carto():
    return gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5, gamma=2.0, alpha=0.5)


def _fit(tmp_path, epochs, target, ckpt_path=None, sampling=True):
    cb = CartoCallback(target, sampling=sampling)
    loss = target.loss if isinstance(target, gdc_ext.Cartographer) else gdc_ext.CartoLoss(state=target)
    model = _LM(loss, cb)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1,
                                       filename="{epoch}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, ckpt], reload_dataloaders_every_n_epochs=1,
                        deterministic=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, ckpt_path=ckpt_path)
    return model, cb


def _assert_scores_equal(a, b):
    for f in ("difficulty", "memorization", "forgets", "transitions", "observed", "last_loss", "min_loss",
              "loss_mean", "loss_std", "grad_energy"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0, equal_nan=True, msg=f)
    assert (a.eps, a.epoch, a.burn_in) == (b.eps, b.epoch, b.burn_in)


@pytest.mark.parametrize("kind", ["state", "cartographer"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, kind):
    make = (lambda: gdc_ext.CartoState(N, burn_in=2, eps=[1.0, 2.0])) if kind == "state" else _carto
    full = make()
    _fit(tmp_path / "full", 6, full)
    cut = make()
    _fit(tmp_path / "cut", 3, cut)
    ckpt = sorted(glob.glob(str(tmp_path / "cut" / "*.ckpt")))[-1]
    assert os.path.basename(ckpt) == "epoch=2.ckpt"
    assert torch.load(ckpt, weights_only=False)[CHECKPOINT_KEY]["state_dict"] is not None
    resumed = make()  # a fresh process: fresh state, fresh model
    _fit(tmp_path / "cut", 6, resumed, ckpt_path=ckpt)
    sa = full.scores() if kind == "state" else full.state.scores()
    sb = resumed.scores() if kind == "state" else resumed.state.scores()
    assert sa.epoch == sb.epoch == 6
    _assert_scores_equal(sa, sb)
    assert torch.equal(sa.quadrants(0.5, 0.5).codes, sb.quadrants(0.5, 0.5).codes)
    if kind == "cartographer":
        assert full.intervening and resumed.intervening
        assert torch.equal(full.quadrants.codes, resumed.quadrants.codes)
        assert torch.equal(full.loss.sample_weight, resumed.loss.sample_weight)


def test_callback_folds_epochs_and_applies_the_interventions(tmp_path):
    carto = _carto()
    model, cb = _fit(tmp_path, 4, carto)
    assert carto.state.epochs_done == 4 and cb.started_at == 2
    assert torch.equal(carto.loss.sample_weight, carto.loss_weights())  # the loss weights are set
    # burn-in epochs draw every sample once; intervention epochs follow the multiplicities
    assert [sorted(e) for e in model.seen[:2]] == [list(range(N))] * 2
    mult = carto.multiplicities().long()
    assert int(mult.max()) == 2  # gamma = 2 up-samples the ambiguous-hard samples
    for e in model.seen[2:]:
        assert torch.bincount(torch.tensor(e), minlength=N).tolist() == mult.tolist()


def test_sampling_needs_the_loader_rebuilt_every_epoch(tmp_path):
    carto = _carto()
    cb = CartoCallback(carto)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(_LM(carto.loss))


def test_an_intervention_epoch_without_the_carto_sampler_raises(tmp_path):
    carto = _carto()
    cb = CartoCallback(carto)
    model = _LM(carto.loss, cb=None)  # ignores cb.sampler()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], enable_checkpointing=False,
                        reload_dataloaders_every_n_epochs=1)
    with pytest.raises(RuntimeError, match="does not draw from callback.sampler"):
        trainer.fit(model)
    assert carto.state.epochs_done == 2


def test_loss_weights_only_without_sampling(tmp_path):
    carto = _carto()
    model, cb = _fit(tmp_path, 3, carto, sampling=False)
    assert carto.intervening and carto.loss.sample_weight is not None


def test_checkpoint_of_another_kind_is_refused_and_one_without_state_raises_unless_fresh(tmp_path):
    st = gdc_ext.CartoState(N, burn_in=2, eps=1.0)
    cb = CartoCallback(st)
    # issue 17 item 9: a checkpoint without the entry used to warn and train on with scores missing
    # its epochs; now it raises, and carto_resume="fresh" is the explicit way to train on
    with pytest.raises(ValueError, match="holds no CartoState.*carto_resume='fresh'"):
        cb.on_load_checkpoint(None, None, {})
    with pytest.warns(UserWarning, match="carto_resume='fresh'"):
        CartoCallback(st, carto_resume="fresh").on_load_checkpoint(None, None, {})
    with pytest.raises(ValueError, match="cartographer"):
        cb.on_load_checkpoint(None, None, {CHECKPOINT_KEY: {"version": 1, "kind": "cartographer", "state_dict": {}}})
    with pytest.raises(ValueError, match="CartoState"):
        CartoCallback("not a state")
