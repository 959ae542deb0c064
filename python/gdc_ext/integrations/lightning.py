"""PyTorch Lightning integration: a callback that runs the cartography around ``Trainer.fit``.

    carto = gdc_ext.Cartographer(num_samples=len(train), burn_in=2, eps=2.0, ...)
    cb = CartoCallback(carto)                    # or CartoCallback(gdc_ext.CartoState(...)): recording only

    class Model(L.LightningModule):
        def training_step(self, batch, i):
            x, y, ids = batch                    # the loader yields each item's sample id
            return carto.loss(self(x).flatten(0, 1), y.flatten(), ids)   # records, weighted once labelled
        def train_dataloader(self):              # the sampling intervention, once labels are fixed
            return DataLoader(train, batch_size=32, sampler=cb.sampler(), shuffle=cb.sampler() is None)

    trainer = L.Trainer(callbacks=[cb], reload_dataloaders_every_n_epochs=1, max_epochs=T)
    trainer.fit(Model())                         # trainer.fit(Model(), ckpt_path=...) resumes the scores too

What the callback does:
- ``end_epoch()`` of the Cartographer / CartoState once per epoch, at the epoch's last training
  batch (``on_train_batch_end``), before Lightning's ModelCheckpoint saves (Lightning runs
  checkpoint callbacks last): a step checkpoint there (``every_n_train_steps``) holds the folded
  epoch, since Lightning resumes from it at the next epoch without calling ``on_train_epoch_end``
  for this one; ``on_train_epoch_end`` folds an epoch that ended otherwise, before the end-of-epoch
  checkpoint. With a Cartographer this fixes the labels at the end of epoch ``label_after`` and
  sets the loss weights on ``carto.loss`` (train with that loss).
- The sampling intervention: the DataLoader is the user's, so :meth:`CartoCallback.sampler` gives
  the sampler to build it with (None during burn-in, ``carto.sampler()`` once labelled), and
  ``reload_dataloaders_every_n_epochs=1`` makes Lightning rebuild it every epoch. With
  ``sampling=True`` (the default for a Cartographer) the callback checks this at the start of
  training and, in every intervention epoch, that the training loader draws from the CartoSampler,
  and raises a RuntimeError otherwise; ``sampling=False`` applies only the loss weights.
  CartoSampler splits the ids across ranks itself: under DDP pass ``use_distributed_sampler=False``.
- ``on_save_checkpoint`` / ``on_load_checkpoint``: the state (with its epoch accumulator) and the
  Cartographer's configuration and fixed labels go into the checkpoint dict under
  :data:`CHECKPOINT_KEY`, with the checkpoint's ``global_step`` and a sha256 of the entry, and are
  restored by ``trainer.fit(..., ckpt_path=...)`` before the dataloaders are built, so a resumed
  run's scores equal an uninterrupted run's (when the model's training is itself reproducible:
  e.g. a sampler seeded per epoch, which Lightning's ``set_epoch`` drives, rather than an unseeded
  shuffle). A checkpoint without that entry (a run without this callback), with a damaged one
  (checksum), one of another kind or version, or one whose global step is not the checkpoint's
  raises ValueError before anything changes, unless ``CartoCallback(..., carto_resume="fresh")``:
  then the entry is not read and training goes on from the current state (with a warning that
  the scores miss the epochs before the checkpoint).
- Which checkpoints resume exactly is Lightning's part: end-of-epoch ones, and step checkpoints at
  an epoch's last batch when the next epoch has the same number of batches (Lightning counts the
  next epoch's batches as partly done when its length differs, as with the CartoSampler). From a
  mid-epoch checkpoint Lightning restarts a DataLoader that is not resumable from its first batch
  (it warns: "not resumable"), so those batches would be recorded twice in that epoch.

Lightning is imported here only, never by ``import gdc_ext``: the ``lightning`` package
(``lightning.pytorch``) if installed, else the standalone ``pytorch_lightning``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

from gdc_ext._io import sha256_of
from gdc_ext.cartographer import Cartographer
from gdc_ext.sampler import CartoSampler
from gdc_ext.sharded import refuse_sharded
from gdc_ext.state import CartoState

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

__all__ = ["CHECKPOINT_KEY", "RESUME_MODES", "CartoCallback"]

CHECKPOINT_KEY = "gdc_ext"
_VERSION = 2  # 2: the checkpoint's global step and a sha256 of the entry
_ENTRY_KEYS = ("version", "kind", "global_step", "state_dict", "started_at")
RESUME_MODES = ("exact", "fresh")  # CartoCallback(carto_resume=...)


def _uses_sampler(loader, sampler: CartoSampler) -> bool:
    """Whether a DataLoader (or Lightning's wrapper around one) draws its indices from ``sampler``."""
    seen = set()
    todo = [loader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if obj is sampler:
            return True
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        else:
            todo.extend(getattr(obj, name, None) for name in ("sampler", "batch_sampler", "dataloader"))
    return False


def _last_training_batch(trainer) -> bool:
    """Whether the batch Lightning just trained on is the last of its epoch (the loader is
    exhausted, or ``limit_train_batches`` / the loader's length is reached)."""
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    if progress is None:
        return False
    total = getattr(trainer, "num_training_batches", float("inf"))
    return bool(progress.is_last_batch) or progress.current.ready >= total


class CartoCallback(Callback):
    """Lightning callback: ``end_epoch`` per train epoch, interventions, state in checkpoints.

    Args:
        target: a :class:`~gdc_ext.Cartographer` (Algorithm 1) or a :class:`~gdc_ext.CartoState`
            (recording only).
        sampling: with a Cartographer, check that the training loader draws from
            :meth:`sampler` in the intervention epochs (see the module docstring). Default: True
            for a Cartographer; ignored for a CartoState.
        carto_resume: what a resume (``fit(..., ckpt_path=...)``) does with the checkpoint's
            :data:`CHECKPOINT_KEY` entry: "exact" (default) restores it and raises ValueError when
            it is missing, damaged or of another global step; "fresh" does not read it and trains
            on from the current state (with a warning).
        reference_forward: for ``Cartographer(reference="initial")``: ``(model, batch) ->
            (logits, targets, sample_ids)`` for a training batch (on the model's device), with
            which the LightningModule scores every training sample once, at the start of ``fit``
            before the first step (:meth:`~gdc_ext.Cartographer.score_reference` over
            ``trainer.train_dataloader``; each rank its share, all-reduced). Without it such a
            Cartographer must have scored its reference before ``fit``.
        log_metrics: after each folded epoch, log :func:`gdc_ext.cartographer.epoch_metrics`
            (``carto/epochs``, ``carto/scored``, quantiles ``carto/{score}_p50`` / ``_p90`` /
            ``_p99`` of the Cartographer's score, ``carto/flagged`` and, once labelled,
            ``carto/n_{quadrant}``) with ``pl_module.log_dict`` at epoch level: every logger of the
            Trainer receives them. Default True; :attr:`history` keeps them either way.
    """

    def __init__(self, target: Union[Cartographer, CartoState], sampling: bool = True, carto_resume: str = "exact",
                 reference_forward=None, log_metrics: bool = True):
        if reference_forward is not None and not callable(reference_forward):
            raise ValueError(f"reference_forward must be a callable (model, batch) -> (logits, targets, sample_ids), "
                             f"got {type(reference_forward).__name__}")
        self.reference_forward = reference_forward
        refuse_sharded(target, "gdc_ext.integrations.lightning.CartoCallback")
        if not isinstance(target, (Cartographer, CartoState)):
            raise ValueError(f"CartoCallback: target must be a gdc_ext.Cartographer or CartoState, got "
                             f"{type(target).__name__}")
        if not isinstance(carto_resume, str) or carto_resume not in RESUME_MODES:
            raise ValueError(f"carto_resume must be one of {', '.join(map(repr, RESUME_MODES))}, got {carto_resume!r}")
        self.carto_resume = carto_resume
        self.target = target
        self.cartographer: Optional[Cartographer] = target if isinstance(target, Cartographer) else None
        self.state: CartoState = target.state if self.cartographer is not None else target
        self.sampling = bool(sampling) and self.cartographer is not None
        self.started_at: Optional[int] = None  # epochs done when the intervention phase started
        self._folded = False  # the current epoch is folded already (at its last batch)
        self.log_metrics = bool(log_metrics)
        self.history: list = []  # the metrics of every folded epoch (gdc_ext.cartographer.epoch_metrics)

    # ------------------------------------------------------------------------------ interventions
    def sampler(self) -> Optional[CartoSampler]:
        """The sampler to build the training DataLoader with: None during burn-in (use your own
        order), the Cartographer's :class:`~gdc_ext.CartoSampler` once the labels are fixed."""
        if self.cartographer is None or not self.cartographer.intervening:
            return None
        return self.cartographer.sampler()

    def on_train_start(self, trainer, pl_module) -> None:
        carto = self.cartographer
        if carto is not None and carto.reference_mode == "initial" and carto.reference is None:
            if self.reference_forward is None or trainer.global_step > 0 or self.state.epochs_done > 0:
                raise RuntimeError("CartoCallback: the Cartographer's reference='initial' was never scored: pass "
                                   "CartoCallback(..., reference_forward=(model, batch) -> (logits, targets, "
                                   "sample_ids)) to score it at the start of fit, before the first step, or call "
                                   "carto.score_reference(model, batches) before fit")

            def forward(model, batch):
                return self.reference_forward(model, trainer.strategy.batch_to_device(batch))

            carto.score_reference(pl_module, trainer.train_dataloader, forward=forward,
                                  progress=trainer.is_global_zero)
        if self.sampling and trainer.reload_dataloaders_every_n_epochs != 1:
            raise RuntimeError("CartoCallback: the sampling intervention needs the training DataLoader rebuilt every "
                               "epoch: pass Trainer(reload_dataloaders_every_n_epochs=1) and build it with "
                               "sampler=callback.sampler(); or CartoCallback(..., sampling=False) for loss weights "
                               "only")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._folded = False
        s = self.sampler()
        if self.sampling and s is not None and not _uses_sampler(trainer.train_dataloader, s):
            raise RuntimeError(f"CartoCallback: epoch {self.state.epochs_done + 1} is an intervention epoch but the "
                               f"training DataLoader does not draw from callback.sampler(); build it in "
                               f"train_dataloader() with sampler=callback.sampler() (or pass sampling=False)")

    def _fold(self, trainer=None, pl_module=None) -> None:
        self._folded = True
        if self.target.end_epoch():
            self.started_at = self.state.epochs_done
        self._log_epoch(trainer, pl_module)

    def _log_epoch(self, trainer, pl_module) -> None:
        """After each fold: :func:`gdc_ext.cartographer.epoch_metrics` through ``pl_module.log_dict``
        (epoch-level), so every logger of the Trainer (CSV, TensorBoard, W&B, MLflow, ...) and
        ``trainer.callback_metrics`` (ModelCheckpoint / EarlyStopping monitors) get them."""
        from gdc_ext.cartographer import epoch_metrics

        metrics = epoch_metrics(self.target)
        self.history.append(metrics)
        if pl_module is None or not self.log_metrics:
            return
        # the state is all-reduced, so every rank holds the same values; a sync costs one small
        # all-reduce and keeps Lightning from warning about epoch-level values logged unsynced
        pl_module.log_dict({k: float(v) for k, v in metrics.items()}, on_step=False, on_epoch=True, batch_size=1,
                           sync_dist=getattr(trainer, "world_size", 1) > 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A ModelCheckpoint(every_n_train_steps=...) saving after this batch writes a checkpoint from
        # which Lightning resumes at the next epoch when this batch is the epoch's last (it resets its
        # batch progress and skips on_train_epoch_end), so that checkpoint must hold the epoch folded.
        if not self._folded and _last_training_batch(trainer):
            self._fold(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._folded:
            self._fold(trainer, pl_module)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        step = checkpoint.get("global_step", getattr(trainer, "global_step", None))
        entry = {"version": _VERSION, "kind": "cartographer" if self.cartographer is not None else "state",
                 "global_step": step, "state_dict": self.target.state_dict(), "started_at": self.started_at}
        entry["sha256"] = sha256_of(entry)
        checkpoint[CHECKPOINT_KEY] = entry

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        path = getattr(trainer, "ckpt_path", None)
        where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
        if self.carto_resume == "fresh":
            warnings.warn(f"CartoCallback: carto_resume='fresh': the {CHECKPOINT_KEY!r} entry of {where} is not read; "
                          f"the scores keep the current state ({self.state.epochs_done} epochs) and miss the epochs "
                          f"before it", UserWarning, stacklevel=2)
            return
        hint = "pass CartoCallback(..., carto_resume='fresh') to train on from the current state instead"
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError(f"CartoCallback: {where} holds no CartoState (no {CHECKPOINT_KEY!r} entry: written "
                             f"without this callback?); {hint}")
        kind = "cartographer" if self.cartographer is not None else "state"
        if not isinstance(saved, dict):
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} is a {type(saved).__name__}, "
                             f"not a dict; {hint}")
        if saved.get("kind") != kind:
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} holds a {saved.get('kind')!r} "
                             f"(version {saved.get('version')!r}); this callback holds a {kind!r}; {hint}")
        if saved.get("version") == 1:
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} was written by an older gdc_ext "
                             f"(entry version 1, without a checksum or a global step), so it cannot be checked; "
                             f"resume it with the gdc_ext that wrote it, or {hint}")
        if saved.get("version") != _VERSION:
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} has version "
                             f"{saved.get('version')!r}; this gdc_ext reads version {_VERSION}; {hint}")
        missing = [k for k in (*_ENTRY_KEYS, "sha256") if k not in saved]
        if missing:
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} is incomplete: {missing} "
                             f"missing; {hint}")
        try:
            digest = sha256_of({k: saved[k] for k in _ENTRY_KEYS})
        except ValueError:
            digest = None  # a value that cannot be in an entry this callback wrote
        if digest != saved["sha256"]:
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} is damaged: its sha256 does "
                             f"not match its content; {hint}")
        if saved["global_step"] != checkpoint.get("global_step"):
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} was written at global step "
                             f"{saved['global_step']!r} but the checkpoint is of step "
                             f"{checkpoint.get('global_step')!r}: the entry belongs to another checkpoint; {hint}")
        started_at = saved["started_at"]
        if started_at is not None and (isinstance(started_at, bool) or not isinstance(started_at, int)):
            raise ValueError(f"CartoCallback: the {CHECKPOINT_KEY!r} entry of {where} has started_at "
                             f"{started_at!r}, expected an int or None")
        self.target.load_state_dict(saved["state_dict"])  # checks everything before it changes anything
        self.started_at = started_at
