"""CartoTrainer(fused_linear=True) in evaluation and prediction: ``predict()``, ``evaluate()`` and
``compute_metrics`` see the model's real logits (not the hidden states the fused loss consumes),
exactly what a non-fused CartoTrainer and a stock Trainer give on the same weights, with the same
eval loss; ``prediction_loss_only`` never builds the logits (tiny GPT-2 / Llama, no downloads)."""
import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import CartoCollator, CartoTrainer  # noqa: E402

N, VOCAB, HIDDEN = 10, 96, 32  # VOCAB != HIDDEN: hidden states in place of logits show in the shape


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=HIDDEN, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(tied=True):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


class _Docs(torch.utils.data.Dataset):
    """N token sequences of 4..9 tokens (seed 1), each token repeated once (a model with tied
    embeddings predicts some of them at initialisation: a metric that is not vacuous); with
    ``ids`` each item carries its sample id."""

    def __init__(self, ids: bool):
        g = torch.Generator().manual_seed(1)
        self.seqs = [torch.randint(1, VOCAB, (5,), generator=g).repeat_interleave(2)[:int(torch.randint(4, 10, (1,),
                                                                                                    generator=g))].tolist()
                     for _ in range(N)]
        self.ids = ids

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i], **({"sample_ids": i} if self.ids else {})}


def _pad_collate(features):
    """Right padding: pad id 0, label -100, attention mask 0."""
    B, L = len(features), max(len(f["input_ids"]) for f in features)
    x = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        x[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = x[i, :n]
        mask[i, :n] = 1
    return {"input_ids": x, "labels": labels, "attention_mask": mask}


def _accuracy(p):
    """Next-token accuracy over the non-ignored shifted labels (predictions padded with -100
    across batches sit where the labels are -100 too)."""
    logits, labels = p.predictions, p.label_ids
    pred = logits[:, :-1].argmax(-1) if logits.ndim == 3 else logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    return {"accuracy": float((pred[keep] == tgt[keep]).mean())}


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, seed=0, disable_tqdm=True, **kw)


def _trainers(tmp_path, make_model, args_kw=None, **kw):
    """{"stock", "carto", "fused"}: three trainers on copies of one model (same weights)."""
    torch.manual_seed(0)
    model = make_model()
    args_kw = args_kw or {}
    out = {"stock": transformers.Trainer(model=copy.deepcopy(model), args=_args(tmp_path / "stock", **args_kw),
                                         data_collator=_pad_collate, **kw)}
    for name, fused in (("carto", False), ("fused", True)):
        state = gdc_ext.CartoState(N, burn_in=1, eps=2.0)
        out[name] = CartoTrainer(model=copy.deepcopy(model), args=_args(tmp_path / name, **args_kw),
                                 data_collator=CartoCollator(_pad_collate), state=state, fused_linear=fused, **kw)
    return out


def _check_losses(losses: dict, stock) -> None:
    """The fused eval loss equals the unfused CartoTrainer's, and the stock Trainer's where it
    normalises by the shifted label count: transformers 5.x's Trainer counts GPT-2's unshifted
    labels (GPT2LMHeadModel.loss_type is None), so its GPT-2 eval loss is sum / (count + B)."""
    np.testing.assert_allclose(losses["fused"], losses["carto"], rtol=1e-5)
    if stock._loss_shifts_labels:
        np.testing.assert_allclose(losses["carto"], losses["stock"], rtol=1e-5)


def _llama_untied():
    return _llama(tied=False)


MODELS = pytest.mark.parametrize("make_model", [_gpt2, _llama, _llama_untied], ids=["gpt2", "llama", "llama-untied"])


@MODELS
def test_predict_gives_the_logits_of_the_unfused_and_stock_trainers(tmp_path, make_model):
    trainers = _trainers(tmp_path, make_model, compute_metrics=_accuracy)
    preds = {k: t.predict(_Docs(ids=False)) for k, t in trainers.items()}
    ref = preds["stock"]
    assert ref.predictions.shape == (N, 9, VOCAB)
    for k in ("carto", "fused"):
        p = preds[k]
        assert p.predictions.shape == ref.predictions.shape, k
        np.testing.assert_allclose(p.predictions, ref.predictions, rtol=1e-5, atol=1e-5, err_msg=k)
        np.testing.assert_array_equal(p.label_ids, ref.label_ids)
        assert p.metrics["test_accuracy"] == ref.metrics["test_accuracy"], k
    _check_losses({k: p.metrics["test_loss"] for k, p in preds.items()}, trainers["stock"])
    if make_model is not _llama_untied:
        assert ref.metrics["test_accuracy"] > 0.2  # the metric is not vacuous (tied embeddings)


@MODELS
@pytest.mark.parametrize("ids", [False, True], ids=["no-ids", "with-ids"])
def test_evaluate_gives_compute_metrics_the_real_logits_and_the_unfused_loss(tmp_path, make_model, ids):
    seen = {}

    def metrics_of(name):
        def compute(p):
            seen[name] = p.predictions
            return _accuracy(p)
        return compute

    torch.manual_seed(0)
    model = make_model()
    results = {}
    for name, fused in (("carto", False), ("fused", True)):
        state = gdc_ext.CartoState(N, burn_in=1, eps=2.0)
        tr = CartoTrainer(model=copy.deepcopy(model), args=_args(tmp_path / name), eval_dataset=_Docs(ids=ids),
                          data_collator=CartoCollator(_pad_collate), state=state, fused_linear=fused,
                          compute_metrics=metrics_of(name))
        results[name] = tr.evaluate()
        assert float(state.acc.abs().sum()) == 0.0  # evaluation records nothing
    assert seen["fused"].shape == seen["carto"].shape and seen["carto"].shape[-1] == VOCAB
    np.testing.assert_allclose(seen["fused"], seen["carto"], rtol=1e-5, atol=1e-5)
    assert results["fused"]["eval_accuracy"] == results["carto"]["eval_accuracy"]
    np.testing.assert_allclose(results["fused"]["eval_loss"], results["carto"]["eval_loss"], rtol=1e-5)


@MODELS
def test_preprocess_logits_for_metrics_receives_the_logits(tmp_path, make_model):
    got = {}

    def argmax(logits, labels):
        got.setdefault("shape", logits.shape)
        assert logits.shape[-1] == VOCAB, logits.shape
        return logits.argmax(-1)

    trainers = _trainers(tmp_path, make_model, compute_metrics=_accuracy, preprocess_logits_for_metrics=argmax)
    res = {k: t.evaluate(_Docs(ids=False)) for k, t in trainers.items()}
    assert got["shape"][-1] == VOCAB
    for k in ("carto", "fused"):
        assert res[k]["eval_accuracy"] == res["stock"]["eval_accuracy"], k
    _check_losses({k: r["eval_loss"] for k, r in res.items()}, trainers["stock"])


@MODELS
def test_prediction_loss_only_never_builds_the_logits(tmp_path, make_model):
    """Without compute_metrics (evaluate) or with args.prediction_loss_only (predict) the fused
    path computes the loss without the LM head's [B, T, V] output, and equals the unfused loss."""
    trainers = _trainers(tmp_path, make_model, args_kw={"prediction_loss_only": True})
    calls = []
    trainers["fused"].model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    ev = {k: t.evaluate(_Docs(ids=False))["eval_loss"] for k, t in trainers.items()}
    pred = {k: t.predict(_Docs(ids=False)) for k, t in trainers.items()}
    assert not calls
    _check_losses(ev, trainers["stock"])
    _check_losses({k: p.metrics["test_loss"] for k, p in pred.items()}, trainers["stock"])
    assert all(p.predictions is None for p in pred.values())


def test_compute_loss_return_outputs_has_the_logits(tmp_path):
    """compute_loss(..., return_outputs=True) in the fused mode returns outputs whose "logits" are
    the model's (attribute and key), with the unfused path's loss and recording, in evaluation and
    in training (Llama has no dropout: both modes give the same numbers)."""
    trainers = _trainers(tmp_path, _llama_untied)
    batch = CartoCollator(_pad_collate)([_Docs(ids=True)[i] for i in (0, 3, 5)])
    for training in (False, True):
        got = {}
        for name in ("carto", "fused"):
            tr = trainers[name]
            tr.model.train(training)
            with torch.set_grad_enabled(training):
                loss, out = tr.compute_loss(tr.model, batch, return_outputs=True)
            assert "last_hidden_state" not in out and out.logits is out["logits"]
            got[name] = (loss.detach(), out["logits"].detach(), tr.carto_state.acc.clone())
        torch.testing.assert_close(got["fused"], got["carto"])
        labelled = sum(len(_Docs(ids=True)[i]["input_ids"]) - 1 for i in (0, 3, 5))
        assert float(got["carto"][2][:, 1].sum()) == (labelled if training else 0)  # recorded in training only
