"""Counterfactual references through the Hugging Face integration: CartoTrainer.reference_losses,
gdc_ext.integrations.hf.reference_losses (fused or not), and Cartographer(reference="initial")."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import CartoCollator, CartoTrainer, reference_losses  # noqa: E402
from helpers import TokenData, lm_batch  # noqa: E402

N, L, VOCAB = 12, 8, 64


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _trainer(tmp_path, epochs, model=None, fused=False, **carto):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=4,
                                          per_device_eval_batch_size=5, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return CartoTrainer(model=model or _model(), args=args, train_dataset=TokenData(N, L, VOCAB),
                        data_collator=CartoCollator(lm_batch), fused_linear=fused, **carto)


def _spec(model):
    """Each sample's mean NLL of its shifted, non-ignored labels, by plain torch."""
    data = TokenData(N, L, VOCAB)
    batch = lm_batch([data[i] for i in range(N)])
    was = model.training
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"]).logits[:, :-1].double()  # dropout off
    model.train(was)
    y = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=-100)
    return nll.sum(1) / (y != -100).sum(1)


@pytest.mark.parametrize("fused", [False, True])
def test_trainer_reference_losses_equal_the_plain_definition(tmp_path, fused):
    trainer = _trainer(tmp_path, 1, fused=fused, state=gdc_ext.CartoState(N, burn_in=1))
    ref = trainer.reference_losses(progress=False)
    assert ref.shape == (N,) and ref.dtype == torch.float64
    torch.testing.assert_close(ref, _spec(trainer.model), rtol=1e-5, atol=1e-5)
    # the module-level function over the same batches, fused or not, agrees
    data = TokenData(N, L, VOCAB)
    batches = [CartoCollator(lm_batch)([data[i] for i in range(s, min(s + 5, N))]) for s in range(0, N, 5)]
    other = reference_losses(trainer.model, batches, N, fused_linear=not fused, progress=False)
    torch.testing.assert_close(other, ref, rtol=1e-5, atol=1e-5)


def test_trainer_scores_the_initial_reference_before_the_first_step(tmp_path):
    model = _model()
    expect = _spec(model)
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=4.0, alpha_d=0.5, alpha_m=0.5, reference="initial")
    trainer = _trainer(tmp_path, 2, model=model, cartographer=carto)
    trainer.train()
    assert carto.reference is not None
    torch.testing.assert_close(carto.reference, expect, rtol=1e-5, atol=1e-5)  # the model before training
    assert carto.intervening and carto.memorization == gdc_ext.cartography.DEFAULT_REFERENCE_SCORE
    s = carto.state.scores()
    want = gdc_ext.quadrants(s.difficulty, gdc_ext.score_values(s, carto.memorization, reference=carto.reference),
                             0.5, 0.5)
    assert torch.equal(carto.quadrants.codes, want.codes)
    # a second train() call (the intervention phase) keeps the reference it measured
    ref = carto.reference.clone()
    trainer.train()
    assert torch.equal(carto.reference, ref)


def test_reference_losses_needs_ids_and_labels(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="sample_ids"):
        reference_losses(model, [lm_batch([TokenData(N, L, VOCAB)[0]])], N, progress=False)
