"""CartoTrainer(fused_linear=True): the fused linear + cross-entropy path gives the unfused
path's loss, gradients and recording on tiny GPT-2 and Llama models (no downloads), and refuses
models whose logits are not a plain linear map of the last hidden state."""
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import CartoCollator, CartoTrainer  # noqa: E402
from helpers import TokenData, lm_batch  # noqa: E402

N, L, VOCAB = 8, 7, 64

_Data = functools.partial(TokenData, N, L, VOCAB)


def _collate(features):
    batch = lm_batch(features)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -2:] = 0  # a padded sequence: the attention mask reaches the base model
    batch["labels"][0, -2:] = -100
    return {**batch, "attention_mask": mask}


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(tied=False):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def _trainer(tmp_path, model, **carto):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return CartoTrainer(model=model, args=args, train_dataset=_Data(), data_collator=CartoCollator(_collate), **carto)


def _step(tmp_path, make_model, fused, loss_kw):
    """(loss, {param: grad}, recorded acc) of one compute_loss + backward on a fixed batch."""
    torch.manual_seed(0)
    model = make_model()
    state = gdc_ext.CartoState(N, burn_in=1, eps=1.0)
    loss_fn = gdc_ext.CartoLoss(state=state, **loss_kw)
    trainer = _trainer(tmp_path, model, loss=loss_fn, fused_linear=fused)
    model.train()
    batch = CartoCollator(_collate)([_Data()[i] for i in (3, 1, 6, 0)])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, state.acc.clone()


@pytest.mark.parametrize("make_model", [_gpt2, _llama, lambda: _llama(tied=True)], ids=["gpt2", "llama", "llama-tied"])
@pytest.mark.parametrize("loss_kw", [{}, {"label_smoothing": 0.1, "reduction": "sum"}], ids=["plain", "smooth-sum"])
def test_fused_equals_unfused(tmp_path, make_model, loss_kw):
    l0, g0, a0 = _step(tmp_path, make_model, False, loss_kw)
    l1, g1, a1 = _step(tmp_path, make_model, True, loss_kw)
    torch.testing.assert_close(l1, l0)
    assert g1.keys() == g0.keys() and len(g0) > 3
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(a1, a0)
    assert float(a0[:, 1].sum()) == 4 * (L - 2) - 1  # shifted labels, minus the ignored ones


def test_fused_trainer_trains_and_records(tmp_path):
    torch.manual_seed(0)
    state = gdc_ext.CartoState(N, burn_in=1, eps=3.0)
    trainer = _trainer(tmp_path, _llama(), state=state, fused_linear=True)
    seen = []
    head = trainer.model.get_output_embeddings()
    head.register_forward_hook(lambda *a: seen.append(1))  # the LM head must never run on the sequence
    trainer.train()
    assert not seen
    s = state.scores()
    assert s.observed.tolist() == [1] * N and bool(torch.isfinite(s.difficulty).all())


def test_refuses_models_it_cannot_handle(tmp_path):
    capped = _llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _trainer(tmp_path, capped, state=gdc_ext.CartoState(N, 1, 1.0), fused_linear=True)
    scaled = _llama()
    scaled.config.logits_scaling = 4.0
    with pytest.raises(ValueError, match="logits_scaling"):
        _trainer(tmp_path, scaled, state=gdc_ext.CartoState(N, 1, 1.0), fused_linear=True)
    cls = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16,
                                                                              n_embd=32, n_layer=1, n_head=2,
                                                                              pad_token_id=0))
    with pytest.raises(ValueError, match="causal LM"):
        _trainer(tmp_path, cls, state=gdc_ext.CartoState(N, 1, 1.0), fused_linear=True)
    # the unfused trainer still accepts them
    _trainer(tmp_path, capped, state=gdc_ext.CartoState(N, 1, 1.0))


def test_head_loss_without_ids_is_the_unweighted_smoothed_loss():
    """head_loss(head, fn, hidden, labels, train_ids, reduction): without ids (an evaluation batch of
    a run with per-sample weights) the loss keeps fn's smoothing and class weight, drops the sample
    weights and records nothing; with ids it applies them and records."""
    from gdc_ext.integrations import hf_fused
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=True)
    state = gdc_ext.CartoState(N, burn_in=1, eps=1.0)
    fn = gdc_ext.CartoLoss(state=state, label_smoothing=0.2, weight=torch.rand(VOCAB) + 0.5)
    fn.set_sample_weights(torch.full((N,), 0.5))
    hidden, labels = torch.randn(10, 16), torch.randint(0, VOCAB, (10,))
    logits = head(hidden)
    want = torch.nn.functional.cross_entropy(logits, labels, weight=fn.weight, label_smoothing=0.2)
    torch.testing.assert_close(hf_fused.head_loss(head, fn, hidden, labels, None, "mean"), want)
    assert not state.acc.any()
    ids = torch.arange(10) % N
    weighted = hf_fused.head_loss(head, fn, hidden, labels, ids, "sum")
    want = torch.nn.functional.cross_entropy(logits, labels, weight=fn.weight, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(weighted, 0.5 * want)
    assert state.acc.any()


def test_refuses_peft_wrapped_models():
    """A PEFT wrapper's base_model is the whole causal LM: refused before training, clearly."""
    from gdc_ext.integrations.hf_fused import check_fused_model

    class PeftModelForCausalLM(torch.nn.Module):  # the name and attribute PEFT's wrapper has
        peft_config = {"default": None}

    with pytest.raises(ValueError, match="PEFT"):
        check_fused_model(PeftModelForCausalLM())
