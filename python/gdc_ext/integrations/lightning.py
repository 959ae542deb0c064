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
- ``on_train_epoch_end``: ``end_epoch()`` of the Cartographer / CartoState, before Lightning's
  ModelCheckpoint saves (Lightning runs checkpoint callbacks last), so an end-of-epoch checkpoint
  holds the folded epoch. With a Cartographer this fixes the labels at the end of epoch
  ``label_after`` and sets the loss weights on ``carto.loss`` (train with that loss).
- The sampling intervention: the DataLoader is the user's, so :meth:`CartoCallback.sampler` gives
  the sampler to build it with (None during burn-in, ``carto.sampler()`` once labelled), and
  ``reload_dataloaders_every_n_epochs=1`` makes Lightning rebuild it every epoch. With
  ``sampling=True`` (the default for a Cartographer) the callback checks this at the start of
  training and, in every intervention epoch, that the training loader draws from the CartoSampler,
  and raises a RuntimeError otherwise; ``sampling=False`` applies only the loss weights.
  CartoSampler splits the ids across ranks itself: under DDP pass ``use_distributed_sampler=False``.
- ``on_save_checkpoint`` / ``on_load_checkpoint``: the state (with its epoch accumulator) and the
  Cartographer's configuration and fixed labels go into the checkpoint dict under
  :data:`CHECKPOINT_KEY`, and are restored by ``trainer.fit(..., ckpt_path=...)`` before the
  dataloaders are built, so a resumed run's scores equal an uninterrupted run's (when the model's
  training is itself reproducible: e.g. a sampler seeded per epoch, which Lightning's ``set_epoch``
  drives, rather than an unseeded shuffle). A checkpoint without that key warns and keeps the
  current state.

Lightning is imported here only, never by ``import gdc_ext``: the ``lightning`` package
(``lightning.pytorch``) if installed, else the standalone ``pytorch_lightning``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

from gdc_ext.cartographer import Cartographer
from gdc_ext.sampler import CartoSampler
from gdc_ext.state import CartoState

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

__all__ = ["CHECKPOINT_KEY", "CartoCallback"]

CHECKPOINT_KEY = "gdc_ext"
_VERSION = 1


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


class CartoCallback(Callback):
    """Lightning callback: ``end_epoch`` per train epoch, interventions, state in checkpoints.

    Args:
        target: a :class:`~gdc_ext.Cartographer` (Algorithm 1) or a :class:`~gdc_ext.CartoState`
            (recording only).
        sampling: with a Cartographer, check that the training loader draws from
            :meth:`sampler` in the intervention epochs (see the module docstring). Default: True
            for a Cartographer; ignored for a CartoState.
    """

    def __init__(self, target: Union[Cartographer, CartoState], sampling: bool = True):
        if not isinstance(target, (Cartographer, CartoState)):
            raise ValueError(f"CartoCallback: target must be a gdc_ext.Cartographer or CartoState, got "
                             f"{type(target).__name__}")
        self.target = target
        self.cartographer: Optional[Cartographer] = target if isinstance(target, Cartographer) else None
        self.state: CartoState = target.state if self.cartographer is not None else target
        self.sampling = bool(sampling) and self.cartographer is not None
        self.started_at: Optional[int] = None  # epochs done when the intervention phase started

    # ------------------------------------------------------------------------------ interventions
    def sampler(self) -> Optional[CartoSampler]:
        """The sampler to build the training DataLoader with: None during burn-in (use your own
        order), the Cartographer's :class:`~gdc_ext.CartoSampler` once the labels are fixed."""
        if self.cartographer is None or not self.cartographer.intervening:
            return None
        return self.cartographer.sampler()

    def on_train_start(self, trainer, pl_module) -> None:
        if self.sampling and trainer.reload_dataloaders_every_n_epochs != 1:
            raise RuntimeError("CartoCallback: the sampling intervention needs the training DataLoader rebuilt every "
                               "epoch: pass Trainer(reload_dataloaders_every_n_epochs=1) and build it with "
                               "sampler=callback.sampler(); or CartoCallback(..., sampling=False) for loss weights "
                               "only")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        s = self.sampler()
        if self.sampling and s is not None and not _uses_sampler(trainer.train_dataloader, s):
            raise RuntimeError(f"CartoCallback: epoch {self.state.epochs_done + 1} is an intervention epoch but the "
                               f"training DataLoader does not draw from callback.sampler(); build it in "
                               f"train_dataloader() with sampler=callback.sampler() (or pass sampling=False)")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.target.end_epoch():
            self.started_at = self.state.epochs_done

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"version": _VERSION,
                                      "kind": "cartographer" if self.cartographer is not None else "state",
                                      "state_dict": self.target.state_dict(), "started_at": self.started_at}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            warnings.warn(f"CartoCallback: the checkpoint holds no CartoState ({CHECKPOINT_KEY!r}); the scores keep "
                          f"the current state ({self.state.epochs_done} epochs) and miss the epochs before it",
                          UserWarning, stacklevel=2)
            return
        kind = "cartographer" if self.cartographer is not None else "state"
        if saved.get("version") != _VERSION or saved.get("kind") != kind:
            raise ValueError(f"CartoCallback: the checkpoint's {CHECKPOINT_KEY!r} entry is a {saved.get('kind')!r} "
                             f"of version {saved.get('version')!r}; this callback holds a {kind!r} (version "
                             f"{_VERSION})")
        self.target.load_state_dict(saved["state_dict"])
        self.started_at = saved.get("started_at")
