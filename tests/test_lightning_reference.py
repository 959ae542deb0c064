"""Lightning: Cartographer(reference="initial") scored by CartoCallback(reference_forward=...) at
the start of fit, before the first step."""
import warnings

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.lightning import CartoCallback  # noqa: E402

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
    def __init__(self, loss):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB)
        self.loss_fn = loss

    def forward(self, x):
        return self.out(self.emb(x))

    def training_step(self, batch, i):
        x, y, ids = batch
        return self.loss_fn(self(x).flatten(0, 1), y.flatten(), ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Data(), batch_size=4, shuffle=False)


def _fit(carto, **cb_kw):
    cb = CartoCallback(carto, sampling=False, **cb_kw)
    model = _LM(carto.loss)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model)
    return model


def test_initial_reference_is_scored_before_the_first_step():
    torch.manual_seed(0)
    expect = gdc_ext.reference_losses(_LM(None), [(x[None], y[None], torch.tensor([i]))
                                                  for x, y, i in (_Data()[j] for j in range(N))], N, progress=False)
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5, reference="initial")
    _fit(carto, reference_forward=lambda m, b: (m(b[0]), b[1], b[2]))
    torch.testing.assert_close(carto.reference, expect, rtol=1e-6, atol=1e-6)  # the untrained model's losses
    assert carto.intervening
    s = carto.state.scores()
    m = gdc_ext.score_values(s, carto.memorization, reference=expect)
    assert torch.equal(carto.quadrants.codes, gdc_ext.quadrants(s.difficulty, m, 0.5, 0.5).codes)


def test_initial_reference_without_a_forward_is_refused_before_training():
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference="initial")
    with pytest.raises(RuntimeError, match="reference_forward"):
        _fit(carto)
    assert carto.state.epochs_done == 0 and carto.reference is None
    with pytest.raises(ValueError, match="reference_forward"):
        CartoCallback(carto, reference_forward=3)
