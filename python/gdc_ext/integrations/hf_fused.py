"""The fused linear + cross-entropy path of :class:`~gdc_ext.integrations.hf.CartoTrainer`
(``CartoTrainer(..., fused_linear=True)``): the LM head is never applied to the whole sequence.

For a causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM`` and other ``*ForCausalLM`` models
whose logits are exactly ``lm_head(last_hidden_state)``), the step

    hidden = base_model(input_ids, attention_mask, ...).last_hidden_state      # [B, T, H]
    loss = linear_cross_entropy(hidden[:, :-1], lm_head.weight, labels[:, 1:], sample_ids,
                                linear_bias=lm_head.bias, ...)

gives the loss of the unfused path (``model(**inputs).logits`` into the CartoLoss, with the
same label shift, ignore_index, class weight, smoothing and sample weights) and the same
gradients, without the [B x T x V] logits. The output embedding is read from
``model.get_output_embeddings()`` (tied to the input embedding or not), the base model from
``model.base_model`` (``model.transformer`` for GPT-2, ``model.model`` for Llama).

Models whose logits are not a plain linear map of the last hidden state are refused before
training by :func:`check_fused_model`: final logit soft-capping (Gemma 2/3's
``final_logit_softcapping``), a logits scaling factor (Cohere's ``logit_scale``, Granite's
``logits_scaling``), encoder-decoder and other non-causal heads, and an output embedding that is
not an ``nn.Linear``.

Evaluation and prediction: ``compute_loss(..., return_outputs=True)`` (what ``prediction_step``
calls unless ``prediction_loss_only``) applies the LM head to the hidden states and returns the
base model's outputs with ``"logits"`` in place of ``"last_hidden_state"`` (:func:`outputs_with_logits`),
so ``predict()``, ``preprocess_logits_for_metrics`` and ``compute_metrics`` get the model's logits and
the loss is computed from them as without ``fused_linear``. With ``prediction_loss_only`` (and
``evaluate()`` without ``compute_metrics``) the logits are never built. Multi-process (DDP)
training is refused: the base model would be called past the DDP wrapper.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from gdc_ext.linear_cross_entropy import linear_cross_entropy

__all__ = ["check_fused_model", "check_fused_trainer", "base_model_of", "hidden_states", "outputs_with_logits",
           "head_loss"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's / DataParallel's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None)
                                                     if isinstance(model, nn.DataParallel) else None)
        if inner is None:
            return model
        model = inner


def base_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack whose last hidden state feeds the LM head: ``model.base_model`` (the
    ``base_model_prefix`` attribute: ``transformer`` for GPT-2, ``model`` for Llama), else
    ``get_decoder()``, ``model.model`` or ``model.transformer``."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    for get in (lambda m: m.get_decoder(), lambda m: m.model, lambda m: m.transformer):
        try:
            base = get(model)
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(base, nn.Module) and base is not model:
            return base
    raise ValueError(f"fused_linear=True: cannot find the base model of {type(model).__name__} (tried base_model, "
                     f"get_decoder(), .model, .transformer)")


def check_fused_model(model: nn.Module) -> None:
    """Raises ValueError, naming the reason, when the fused path cannot reproduce ``model``'s
    logits as ``hidden @ lm_head.weight.T (+ bias)``."""
    model = _unwrap(model)
    name = type(model).__name__
    if name.startswith("Peft") or hasattr(model, "peft_config"):
        # a PeftModel's base_model is the whole causal LM (LM head included), not its decoder
        raise ValueError(f"fused_linear=True does not handle PEFT-wrapped models ({name}) yet: train without "
                         f"fused_linear, or merge the adapters first")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"fused_linear=True needs a transformers model with a config, got {name}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"fused_linear=True handles causal LMs only; {name} is an encoder-decoder model")
    if not name.endswith(_CAUSAL_SUFFIXES):
        raise ValueError(f"fused_linear=True handles causal LMs (*ForCausalLM / *LMHeadModel) only, got {name}: its "
                         f"head may not be a plain linear map predicting the next token")
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"fused_linear=True: {name} soft-caps its logits (config.final_logit_softcapping = {softcap}), "
                         f"which the fused linear + cross-entropy does not apply; train without fused_linear")
    for attr in ("logit_scale", "logits_scaling", "output_logits_scale"):
        for owner in (config, model):
            v = getattr(owner, attr, None)
            if v is not None and not (isinstance(v, (int, float)) and float(v) == 1.0):
                raise ValueError(f"fused_linear=True: {name} scales its logits ({attr} = {v}), which the fused "
                                 f"linear + cross-entropy does not apply; train without fused_linear")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"fused_linear=True: {name}'s output embedding must be an nn.Linear (the LM head), got "
                         f"{type(head).__name__}")
    base_model_of(model)


def check_fused_trainer(trainer) -> None:
    """check_fused_model on the trainer's model, and no multi-process run (ValueError)."""
    check_fused_model(trainer.model)
    if getattr(trainer.args, "world_size", 1) > 1:
        raise ValueError("fused_linear=True does not support multi-process (DDP) training yet: the base model would "
                         "be called past the DistributedDataParallel wrapper")
    if getattr(trainer.args, "n_gpu", 1) > 1:
        raise ValueError("fused_linear=True does not support single-process multi-GPU (nn.DataParallel) training: "
                         "the base model would be called past the DataParallel wrapper, on one GPU; use one GPU "
                         "per process")


def hidden_states(model: nn.Module, inputs: dict):
    """The base model's outputs, its last hidden state [B, T, H] and the LM head (an nn.Linear) of
    ``model`` for the batch ``inputs`` (without labels and sample ids): what CartoTrainer's
    compute_loss uses in place of ``model(**inputs).logits``."""
    inner = _unwrap(model)
    base = base_model_of(inner)
    head = inner.get_output_embeddings()
    inputs = dict(inputs)
    if "use_cache" in inspect.signature(base.forward).parameters and "use_cache" not in inputs:
        inputs["use_cache"] = False  # no key/value cache in a training step
    outputs = base(**inputs)
    hidden = outputs["last_hidden_state"] if isinstance(outputs, dict) else outputs[0]
    return outputs, hidden, head


def outputs_with_logits(outputs, logits: torch.Tensor):
    """The causal LM's outputs for base-model ``outputs`` and its ``logits`` [B, T, V]: a
    ``ModelOutput`` holding ``logits`` where the base model has ``last_hidden_state``, then the base
    model's other non-None entries (``past_key_values``, ``hidden_states``, ``attentions``, ...) in
    their order, as ``*ForCausalLM.forward`` returns them without labels (so ``prediction_step``,
    which takes every entry but the ignored keys as predictions, sees the same tuple). A tuple
    ``outputs`` (``return_dict=False``) gives ``(logits,) + outputs[1:]``."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    if not isinstance(outputs, dict):  # return_dict=False: the model returns (logits,) + base outputs[1:]
        return (logits,) + tuple(outputs[1:])
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state" and v is not None}
    for cls in (CausalLMOutputWithPast, CausalLMOutputWithCrossAttentions):
        if set(rest) <= set(cls.__dataclass_fields__):
            return cls(logits=logits, **rest)
    return ModelOutput(logits=logits, **rest)  # a base model with outputs of its own (kept, in order)


def head_loss(head: nn.Linear, fn, hidden: torch.Tensor, labels: torch.Tensor, train_ids,
              reduction: str) -> torch.Tensor:
    """The CartoLoss ``fn``'s loss of ``head(hidden)`` against ``labels`` (hidden [R, H] in the
    head's dtype, labels [R] int64, already shifted) with the fused linear + cross-entropy: class
    weight, ignore_index and label smoothing of ``fn`` always; with ``train_ids`` ([R] int64 or
    None) it also records into ``fn.state`` and applies ``fn.sample_weight``. Without ids
    (evaluation batches) the loss is unweighted and nothing is recorded, as on the unfused path."""
    kw = dict(linear_bias=head.bias, weight=fn.weight, ignore_index=fn.ignore_index, label_smoothing=fn.label_smoothing,
              reduction=reduction)
    if train_ids is not None:
        kw.update(state=fn.state, sample_weight=fn.sample_weight)
    return linear_cross_entropy(hidden, head.weight, labels, train_ids, **kw)
