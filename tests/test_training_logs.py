"""Training logs: CartoTrainer and the Lightning CartoCallback log, per epoch, the score's quantiles,
the number flagged and (once labelled) the quadrant counts through the framework's own logging."""
import csv
import glob
import os
import warnings

import numpy as np
import pytest
import torch

import gdc_ext
from gdc_ext.cartographer import epoch_metrics
from gdc_ext.cartography import quadrants, score_values

QUADRANT_KEYS = ["carto/n_stable_easy", "carto/n_ambiguous_hard", "carto/n_hotspot_memorized", "carto/n_noisy_outlier",
                 "carto/n_unscored"]

D = gdc_ext.DEFAULT_SCORE  # the score the callbacks log (the Cartographer's default memorization=)


def _expected(scores, by, alpha=(0.75, 0.75), reference=None, labels=None):
    """epoch_metrics computed by hand from the scores of that epoch."""
    v = score_values(scores, by, reference=reference).numpy()
    f = v[np.isfinite(v)]
    out = {"carto/epochs": scores.epoch, "carto/scored": int(np.isfinite(scores.difficulty.numpy()).sum())}
    for q in (0.5, 0.9, 0.99):
        out[f"carto/{by}_p{100 * q:g}"] = float(np.quantile(f, q))
    if labels is None:
        out["carto/flagged"] = int((quadrants(scores.difficulty, v, *alpha).codes == 2).sum())
    else:
        counts = labels.counts()
        out["carto/flagged"] = counts["hotspot-memorized"]
        out.update({k: n for k, n in zip(QUADRANT_KEYS, counts.values())})
    return out


def test_epoch_metrics_by_hand():
    carto = gdc_ext.Cartographer(12, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(3):
        carto.state.record(torch.rand(12, generator=g) * 3, torch.arange(12))
        carto.end_epoch()
        seen.append(epoch_metrics(carto))
    s = carto.state.scores()
    assert seen[0].keys() == {"carto/epochs", "carto/scored", f"carto/{D}_p50", f"carto/{D}_p90", f"carto/{D}_p99",
                              "carto/flagged"}
    assert seen[2] == pytest.approx(_expected(s, D, labels=carto.quadrants))
    assert set(QUADRANT_KEYS) <= seen[1].keys()  # labelled at the end of epoch 2
    plain = epoch_metrics(carto.state)  # a CartoState: the default score, quadrants 0.75 / 0.75
    assert plain == pytest.approx(_expected(s, D))
    waiting = gdc_ext.Cartographer(12, burn_in=2, eps=1.0, reference="later")  # no reference yet: counts only
    waiting.state.record(torch.rand(12, generator=g), torch.arange(12))
    waiting.state.end_epoch()
    assert epoch_metrics(waiting) == {"carto/epochs": 1, "carto/scored": 12}
    with pytest.raises(ValueError, match="Cartographer or CartoState"):
        epoch_metrics("state")


# ------------------------------------------------------------------------------------------- Hugging Face
def _hf_run(tmp_path, carto, epochs, **args):
    transformers = pytest.importorskip("transformers")
    from gdc_ext.integrations.hf import CartoCollator, CartoTrainer
    from helpers import TokenData, lm_batch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                 eos_token_id=0)
    base = dict(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], save_strategy="epoch", logging_strategy="steps", logging_steps=1000, use_cpu=True,
                dataloader_num_workers=0, seed=0, disable_tqdm=True)
    base.update(args)
    trainer = CartoTrainer(model=transformers.GPT2LMHeadModel(cfg), args=transformers.TrainingArguments(**base),
                           train_dataset=TokenData(12, 8, 64), data_collator=CartoCollator(lm_batch), cartographer=carto)
    trainer.train()
    return trainer


def test_hf_trainer_logs_every_epoch_to_log_history_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gdc_ext.integrations.hf import STATE_FILE

    carto = gdc_ext.Cartographer(12, burn_in=2, eps=3.0, alpha_d=0.5, alpha_m=0.5)
    trainer = _hf_run(tmp_path, carto, 3, report_to=["tensorboard"])
    logged = [h for h in trainer.state.log_history if "carto/epochs" in h]
    assert [h["carto/epochs"] for h in logged] == [1, 2, 3]
    assert [h["epoch"] for h in logged] == [1.0, 2.0, 3.0] and [h["step"] for h in logged] == [3, 6, 9]
    # each epoch's values are those of that epoch's scores: read back from its checkpoint
    for h in logged:
        e = h["carto/epochs"]
        scores = gdc_ext.CartoState.load(tmp_path / f"checkpoint-{3 * e}" / STATE_FILE).scores()
        want = _expected(scores, D, (0.5, 0.5), labels=carto.quadrants if e >= 2 else None)
        assert {k: h[k] for k in want} == pytest.approx(want)
        assert (set(QUADRANT_KEYS) <= h.keys()) == (e >= 2)  # the counts once labelled (end of epoch 2)
    # TensorBoard: the Trainer's own callback wrote them (as train/carto/...) at the epochs' last steps
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    acc = EventAccumulator(os.path.dirname(files[0]))
    acc.Reload()
    for key in (f"carto/{D}_p50", f"carto/{D}_p99", "carto/flagged", "carto/n_hotspot_memorized"):
        events = acc.Scalars(f"train/{key}")
        rows = [h for h in logged if key in h]
        assert [ev.step for ev in events] == [h["step"] for h in rows]
        np.testing.assert_allclose([ev.value for ev in events], [h[key] for h in rows], rtol=1e-6)
    cb = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CartoCallback"][0]
    assert cb.history == [{k: v for k, v in h.items() if k.startswith("carto/")} for h in logged]


def test_hf_trainer_logs_nothing_with_logging_off(tmp_path):
    carto = gdc_ext.Cartographer(12, burn_in=2, eps=3.0)
    trainer = _hf_run(tmp_path, carto, 2, logging_strategy="no", save_strategy="no")
    assert not any("carto/epochs" in h for h in trainer.state.log_history)
    cb = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CartoCallback"][0]
    assert [m["carto/epochs"] for m in cb.history] == [1, 2]  # kept on the callback all the same


# ------------------------------------------------------------------------------------------- Lightning
def test_lightning_callback_logs_every_epoch_to_the_csv_logger(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from gdc_ext.integrations.lightning import CartoCallback

    N, SEQ, VOCAB = 16, 6, 12
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (N, SEQ + 1), generator=g)
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, alpha_d=0.5, alpha_m=0.5)
    snapshots = {}

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.out = torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB)

        def training_step(self, batch, i):
            x, ids = batch
            return carto.loss(self.out(self.emb(x[:, :-1])).flatten(0, 1), x[:, 1:].flatten(), ids)

        def on_train_epoch_end(self):  # after the callback folded the epoch
            snapshots[carto.state.epochs_done] = carto.state.scores()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            ds = torch.utils.data.TensorDataset(data, torch.arange(N))
            return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)

    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                        callbacks=[CartoCallback(carto, sampling=False)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(LM())
    path = os.path.join(logger.log_dir, "metrics.csv")
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("carto/epochs")]
    assert [int(float(r["carto/epochs"])) for r in rows] == [1, 2, 3]
    for r in rows:
        e = int(float(r["carto/epochs"]))
        want = _expected(snapshots[e], D, (0.5, 0.5), labels=carto.quadrants if e >= 2 else None)
        np.testing.assert_allclose([float(r[k]) for k in want], list(want.values()), rtol=1e-6)
        assert all((r[k] != "") == (e >= 2) for k in QUADRANT_KEYS)
    assert float(trainer.callback_metrics["carto/flagged"]) == carto.counts()["hotspot-memorized"]
