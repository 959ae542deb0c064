"""Hugging Face ``transformers`` integration: a Trainer that trains on CartoLoss.

    carto = gdc_ext.Cartographer(num_samples=len(train), burn_in=2, eps=2.0, ...)
    trainer = CartoTrainer(model=model, args=args, train_dataset=train,      # items carry "sample_ids"
                           data_collator=CartoCollator(DataCollatorForLanguageModeling(tok, mlm=False)),
                           cartographer=carto)                                # or state=CartoState(...)
    trainer.train()                      # burn-in: records; end_epoch() after every epoch

- Every training item holds its sample id (an int) under ``"sample_ids"``; :class:`CartoCollator`
  takes it out before the wrapped collator runs and puts the [B] tensor back in the batch;
  :meth:`CartoTrainer.compute_loss` removes it before ``model(**inputs)``, so it never reaches the
  model's forward. The Trainer's column removal keeps it (it is added to the signature columns).
- ``compute_loss`` shifts the labels as GPT-2 does (position t predicts label t+1, -100 ignored) and
  calls the CartoLoss with one id per sequence; it records only in training (grad mode on) and
  applies the per-sample loss weights only to training batches.
- :class:`CartoCallback` calls ``end_epoch()`` at the end of every Trainer epoch.
- Sampling intervention: when the Cartographer has labelled (``carto.intervening``) at the time
  ``train()`` builds its dataloader, the training sampler is ``carto.sampler()``. The Trainer fixes
  the number of steps per epoch from the first epoch's length, so run Algorithm 1 in two
  ``train()`` calls: ``num_train_epochs = burn_in``, then the remaining epochs. With an integer
  ``gamma`` (the default 2.0) every epoch has the same length; with a fractional one the length
  varies by the Bernoulli remainders and the Trainer may cut an epoch's last batches.

transformers is imported here only, never by ``import gdc_ext``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from transformers import Trainer, TrainerCallback

from gdc_ext.cartographer import Cartographer
from gdc_ext.loss import CartoLoss
from gdc_ext.state import CartoState

__all__ = ["SAMPLE_IDS", "CartoCollator", "CartoCallback", "CartoTrainer"]

SAMPLE_IDS = "sample_ids"


class CartoCollator:
    """Wraps a data collator: pops each feature's ``"sample_ids"`` (an int), collates the rest with
    ``collator``, and adds ``batch["sample_ids"]`` as an int64 tensor [B]."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features):
        ids, rest = [], []
        for i, f in enumerate(features):
            if SAMPLE_IDS not in f:
                raise ValueError(f"CartoCollator: feature {i} has no {SAMPLE_IDS!r} entry (the sample id, an int)")
            f = dict(f)
            ids.append(int(torch.as_tensor(f.pop(SAMPLE_IDS)).reshape(-1)[0]))
            rest.append(f)
        batch = self.collator(rest)
        batch[SAMPLE_IDS] = torch.tensor(ids, dtype=torch.int64)
        return batch


class CartoCallback(TrainerCallback):
    """Calls ``end_epoch()`` of a Cartographer or CartoState when the Trainer ends an epoch."""

    def __init__(self, target):
        if not isinstance(target, (Cartographer, CartoState)):
            raise ValueError(f"CartoCallback: expected a Cartographer or CartoState, got {type(target).__name__}")
        self.target = target
        self.started_at: Optional[int] = None  # epochs done when the intervention phase started

    def on_epoch_end(self, args, state, control, **kwargs):
        started = self.target.end_epoch()
        if started:
            self.started_at = self.target.state.epochs_done
        return control


class CartoTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is a CartoLoss (causal LM: shifted labels).

    Args (beyond Trainer's): exactly one of ``cartographer`` (Algorithm 1: recording, labels, loss
    weights, sampler) or ``state`` (recording only, or ``loss=`` a CartoLoss of your own);
    ``fused_linear=True`` computes the loss with the fused linear + cross-entropy, never building
    the logits (causal LMs; see :mod:`gdc_ext.integrations.hf_fused`, which checks the model here).
    """

    # compute_loss returns a per-micro-batch mean: let the Trainer divide by accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, cartographer: Optional[Cartographer] = None, state: Optional[CartoState] = None,
                 loss: Optional[CartoLoss] = None, fused_linear: bool = False, **kwargs):
        if sum(x is not None for x in (cartographer, state, loss)) != 1:
            raise ValueError("CartoTrainer: give exactly one of cartographer=, state= or loss=")
        if loss is not None and not isinstance(loss, CartoLoss):
            raise ValueError(f"loss must be a gdc_ext.CartoLoss, got {type(loss).__name__}")
        self.cartographer = cartographer
        self.carto_loss = cartographer.loss if cartographer is not None else (loss or CartoLoss(state=state))
        target = cartographer if cartographer is not None else self.carto_loss.state
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # older transformers read this instead of loss_is_scaled_for_ga
        self.fused_linear = bool(fused_linear)
        if self.fused_linear:
            from gdc_ext.integrations.hf_fused import check_fused_trainer

            check_fused_trainer(self)  # refuses a model it cannot handle before training
        if target is not None:
            self.add_callback(CartoCallback(target))
        if cartographer is not None and abs(cartographer.gamma - round(cartographer.gamma)) > 0:
            warnings.warn("CartoTrainer: a fractional gamma makes epoch lengths vary; the Trainer fixes steps per "
                          "epoch from the first epoch and may cut an epoch's last batches", stacklevel=2)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if SAMPLE_IDS not in self._signature_columns:
            self._signature_columns.append(SAMPLE_IDS)

    def _get_train_sampler(self, *args, **kwargs):
        if self.cartographer is not None and self.cartographer.intervening:
            return self.cartographer.sampler()
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        if self.fused_linear:
            from gdc_ext.integrations.hf_fused import fused_compute_loss

            return fused_compute_loss(self, model, inputs, return_outputs)
        inputs = dict(inputs)
        ids = inputs.pop(SAMPLE_IDS, None)
        if "labels" not in inputs:
            raise ValueError("CartoTrainer: the batch has no 'labels' (use a collator that sets them, e.g. "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        shift_logits = logits[:, :-1, :]
        shift_labels = labels[:, 1:].to(logits.device)
        # evaluation batches carry ids of another split (or none): no recording, no weights
        train_ids = ids.to(logits.device) if (ids is not None and model.training and torch.is_grad_enabled()) else None
        fn = self.carto_loss
        if train_ids is None and fn.sample_weight is not None:
            loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
                                                     shift_labels.reshape(-1), ignore_index=fn.ignore_index)
        else:
            loss = fn(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), train_ids)
        return (loss, outputs) if return_outputs else loss
