"""transformers integration: CartoTrainer on a tiny GPT-2 built from GPT2Config (no downloads)."""
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import CartoCallback, CartoCollator, CartoTrainer  # noqa: E402

N, L, VOCAB = 12, 8, 64


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, VOCAB, (N, L), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "sample_ids": i}


def _collate(features):
    x = torch.stack([f["input_ids"] for f in features])
    labels = x.clone()
    labels[:, -1] = -100  # an ignored token, as padding would be
    return {"input_ids": x, "labels": labels}


def _trainer(tmp_path, epochs, **carto):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                 bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return CartoTrainer(model=model, args=args, train_dataset=_Data(), data_collator=CartoCollator(_collate), **carto)


def test_trainer_records_every_sample_each_epoch(tmp_path):
    state = gdc_ext.CartoState(N, burn_in=1, eps=3.0)
    trainer = _trainer(tmp_path, 2, state=state)
    seen = []
    orig = trainer.model.forward

    @functools.wraps(orig)  # keeps the signature the Trainer inspects
    def forward(*a, **kw):  # sample_ids must never reach the model
        seen.append(sorted(kw))
        return orig(*a, **kw)

    trainer.model.forward = forward
    trainer.train()
    s = state.scores()
    assert state.epochs_done == 2
    assert s.observed.tolist() == [2] * N
    assert s.transitions.tolist() == [1] * N
    assert bool(torch.isfinite(s.difficulty).all()) and float(s.difficulty.mean()) > 1.0
    assert seen and all("sample_ids" not in k and "labels" not in k for k in seen)
    # the recorded difficulty is the epoch-1 mean NLL over the shifted, non-ignored tokens
    assert float(s.difficulty.mean()) < float(torch.log(torch.tensor(VOCAB * 1.0))) + 1.0


def test_trainer_runs_algorithm_1_in_two_phases(tmp_path):
    carto = gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=4.0, alpha_d=0.5, alpha_m=0.5, gamma=2.0, alpha=0.5)
    trainer = _trainer(tmp_path, 2, cartographer=carto)
    cb = [c for c in trainer.callback_handler.callbacks if isinstance(c, CartoCallback)]
    assert len(cb) == 1
    trainer.train()
    assert carto.intervening and cb[0].started_at == 2
    assert carto.loss.sample_weight is not None
    mult = carto.multiplicities()
    trainer2 = _trainer(tmp_path, 1, cartographer=carto)
    ids = []
    carto.loss.register_forward_pre_hook(lambda mod, a: ids.extend(a[2].tolist()))
    trainer2.train()
    # gamma=2: integer multiplicities, so epoch 3 draws each sample exactly that many times
    assert torch.bincount(torch.tensor(ids), minlength=N).tolist() == mult.long().tolist()
    assert float(mult.max()) == 2.0  # some samples really were up-sampled
    assert carto.state.scores().observed.tolist() == [3 if w > 0 else 2 for w in mult.tolist()]


def test_collator_and_trainer_errors(tmp_path):
    with pytest.raises(ValueError, match="sample_ids"):
        CartoCollator(_collate)([{"input_ids": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="exactly one"):
        _trainer(tmp_path, 1)
