"""Hugging Face ``transformers`` integration: a Trainer that trains on CartoLoss.

    carto = gdc_ext.Cartographer(num_samples=len(train), burn_in=2, eps=2.0, ...)
    trainer = CartoTrainer(model=model, args=args, train_dataset=train,      # items carry "sample_ids"
                           data_collator=CartoCollator(DataCollatorForLanguageModeling(tok, mlm=False)),
                           cartographer=carto)                                # or state=CartoState(...)
    trainer.train()                      # burn-in: records; end_epoch() after every epoch
    trainer.train(resume_from_checkpoint=True)   # after an interruption: the scores resume too

Sample ids:
- Every training item holds its ids under ``"sample_ids"``: an int (one sample per sequence) or a
  list with one id per token (packed rows holding several documents). :class:`CartoCollator`
  takes them out before the wrapped collator runs and puts them back in the batch unchanged: [B]
  int64 for per-sequence ids, [B, L] int64 for per-token ids, padded with :data:`IGNORED_ID` (-1)
  wherever the wrapped collator padded (found from the ``attention_mask`` when it has one, else
  from the tokenizer's ``padding_side``, else on the right). A padded position must carry the label
  -100 (every LM collator does this), since a non-ignored label with id -1 is rejected.
- Padding-free packing (``DataCollatorWithFlattening``: the items concatenated into one row
  [1, total], with position_ids restarting at every item, and ``seq_idx`` / ``cu_seq_lens_q`` when
  asked for): the ids become per-token ids [1, total], each item's id (or per-token list) on its
  own tokens, found from those boundaries. Ids that do not fit the packed batch (a number of
  items other than the number of packed sequences, a per-token list of another length than its
  item) raise ValueError, and so does a packed batch without any boundaries. The first label of
  every packed item is -100, so no document is charged for predicting the next one's first token.
- Items without ``"sample_ids"`` are fine wherever nothing is recorded (evaluation, prediction);
  training on them while a state is set records nothing, and ``compute_loss`` warns once.
- :meth:`CartoTrainer.compute_loss` removes the ids before ``model(**inputs)``, so they never reach
  the model's forward. The Trainer's column removal keeps them (added to the signature columns).

Loss: ``compute_loss`` shifts as GPT-2 does (the logits at position t predict the label at t+1,
-100 ignored) and shifts per-token ids the same way, so the loss row predicting token t+1 is
recorded for the sample of token t+1 (the label's). When the Trainer passes ``num_items_in_batch``
(the non-ignored shifted labels of the whole accumulated batch), the loss is the token sum divided
by it, exactly the stock Trainer's normalisation, so gradient accumulation with uneven token counts
gives the stock Trainer's gradients. Recording happens only for training batches (model in training
mode, grad enabled); per-sample loss weights apply only there too.

Checkpoints: every checkpoint folder gets :data:`STATE_FILE` (the CartoState with its epoch
accumulator, and the Cartographer's reference if it has one, written atomically by
:meth:`CartoState.save`: ``gdc report <checkpoint>`` scores with that reference) and :data:`META_FILE` (the
Cartographer's configuration and fixed labels, whether the interrupted ``train()`` call sampled
with the CartoSampler, the Trainer's global step, the sha256 of the state file, and a sha256 of
all this; written atomically). ``train(resume_from_checkpoint=...)`` restores them before the
dataloader is built, so the scores, labels and loss weights after resuming equal an uninterrupted
run's, from any checkpoint ("steps" at any step, "epoch", mid-epoch, gradient accumulation).
It checks everything before it changes anything, and raises (FileNotFoundError / ValueError
naming the folder and file) when the gdc files are missing (a stock Trainer's checkpoint), one of
them is missing, damaged, of an older format, or of another checkpoint (the metadata's global step
must be the folder's and its trainer_state.json's; the state file must be the one the metadata was
written with). ``CartoTrainer(..., carto_resume="fresh")`` is the explicit way to resume such a
checkpoint: the gdc files are not read and the state trains on as it is (a warning says that the
scores miss the epochs before the checkpoint).

Sampling intervention: when the Cartographer has labelled (``carto.intervening``) at the time
``train()`` builds its dataloader, the training sampler is ``carto.sampler()``. The Trainer fixes the
number of steps per epoch from the first epoch's length, so run Algorithm 1 in two ``train()``
calls: ``num_train_epochs = burn_in``, then the remaining epochs. With an integer ``gamma`` (the
default 2.0) every epoch has the same length; with a fractional one the length varies by the
Bernoulli remainders and the Trainer may cut an epoch's last batches. A resumed ``train()`` call
samples as the interrupted call did.

:class:`CartoCallback` calls ``end_epoch()`` once per Trainer epoch, at the epoch's last optimizer
step, before the Trainer writes that step's checkpoint (which then holds the folded epoch: the
Trainer resumes from it at the next epoch). When training stops early (``max_steps``,
``control.should_training_stop``) the cut-short last epoch is folded as it stands when ``train()``
ends; every checkpoint written mid-epoch holds the epoch's accumulator instead, and resuming from
it continues that epoch exactly.

transformers is imported here only, never by ``import gdc_ext``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import warnings
from typing import Any, Callable, Optional, Union

import torch

from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from gdc_ext._io import checked_json, file_sha256, json_with_checksum, write_atomic
from gdc_ext.cartographer import Cartographer
from gdc_ext.integrations.files import META_FILE, STATE_FILE  # the names, shared with the CLI (no transformers)
from gdc_ext.loss import CartoLoss
from gdc_ext.sharded import refuse_sharded
from gdc_ext.state import CartoState

__all__ = ["SAMPLE_IDS", "IGNORED_ID", "STATE_FILE", "META_FILE", "CartoCollator", "CartoCallback", "CartoTrainer"]

SAMPLE_IDS = "sample_ids"
IGNORED_ID = -1  # per-token id of padding positions (their label is -100, so it is never read)
_META_VERSION = 2  # 2: sha256 of the payload and of the state file, the Trainer's global step
RESUME_MODES = ("exact", "fresh")  # CartoTrainer(carto_resume=...)


# --------------------------------------------------------------------------------------- collator
def _id_kind(value, i: int) -> str:
    """'seq' for one int id, 'tok' for a sequence of per-token ids."""
    if isinstance(value, bool):
        raise ValueError(f"CartoCollator: feature {i}: {SAMPLE_IDS!r} must be an int or a list of ints, got a bool")
    if isinstance(value, int) or (hasattr(value, "ndim") and value.ndim == 0):
        return "seq"
    if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and value.ndim == 1):
        return "tok"
    raise ValueError(f"CartoCollator: feature {i}: {SAMPLE_IDS!r} must be an int (per sequence) or a 1-D list "
                     f"of ints (per token), got {type(value).__name__}")


def _as_ids(value, i: int) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"CartoCollator: feature {i}: {SAMPLE_IDS!r} must hold integers, got {t.dtype}")
    return t.to(torch.int64).reshape(-1)


_PACKING_HINT = ("padding-free packing (e.g. transformers' DataCollatorWithFlattening) must return position_ids, "
                 "seq_idx or cu_seq_lens_q marking where each item starts")


def _runs(starts: torch.Tensor) -> torch.Tensor:
    """Segment index per token of a flattened [R*L] batch: a new segment at every True of ``starts``."""
    return starts.to(torch.int64).cumsum(0) - 1


def _packed_segments(batch: dict, n_items: int):
    """(segment index per token [R*L] int64 (-1 outside every segment), (R, L), source) when the
    wrapped collator packed the items padding-free (several items per row: fewer or more rows than
    items, or ``seq_idx`` / ``cu_seq_lens_q`` in the batch), else None. Segments are numbered in
    token order, one per packed item, from every boundary the batch carries (position_ids
    restarting, runs of seq_idx, cu_seq_lens_q), which must agree."""
    ref = batch.get("input_ids", batch.get("labels"))
    if len(getattr(ref, "shape", ())) != 2:  # a tensor or array [R, L] (return_tensors="np" too)
        return None
    R, L = (int(n) for n in ref.shape)
    explicit = [k for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx") if batch.get(k) is not None]
    if R == n_items and not explicit:
        return None  # one item per row: the ordinary (padded) layout
    T = R * L
    found = {}
    pos = batch.get("position_ids")
    if pos is not None:
        pos = torch.as_tensor(pos)
        if pos.dim() == 2 and pos.shape[0] == 1 and R > 1:
            pos = pos.expand(R, L)
        if tuple(pos.shape) != (R, L):
            raise ValueError(f"CartoCollator: packed batch: position_ids have shape {tuple(pos.shape)} but input_ids "
                             f"{(R, L)}")
        starts = torch.ones(R, L, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # positions restart at every packed item
        inside = torch.ones(R, L, dtype=torch.bool)
        mask = batch.get("attention_mask")
        if mask is not None and tuple(getattr(mask, "shape", ())) == (R, L):
            inside = torch.as_tensor(mask).bool()  # padding of a multi-row packing belongs to no item
            starts[:, 1:] |= inside[:, 1:] & ~inside[:, :-1]
        seg = _runs((starts & inside).reshape(-1))
        found["position_ids"] = torch.where(inside.reshape(-1), seg, torch.full_like(seg, -1))
    idx = batch.get("seq_idx")
    if idx is not None:
        idx = torch.as_tensor(idx).reshape(-1)
        if idx.numel() != T:
            raise ValueError(f"CartoCollator: packed batch: seq_idx has {idx.numel()} entries but input_ids {T} tokens")
        starts = torch.ones(T, dtype=torch.bool)
        starts[1:] = idx[1:] != idx[:-1]
        found["seq_idx"] = _runs(starts)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = batch.get(key)
        if cu is None:
            continue
        cu = torch.as_tensor(cu).to(torch.int64).reshape(-1)
        if cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"CartoCollator: packed batch: {key} = {cu.tolist()} is not a cumulative list of sequence "
                             f"lengths from 0 to the {T} tokens of input_ids")
        lengths = cu[1:] - cu[:-1]
        found[key] = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        break  # cu_seq_lens_k equals cu_seq_lens_q in self-attention packing
    if not found:
        raise ValueError(f"CartoCollator: the wrapped collator returned {R} row(s) for {n_items} items without "
                         f"position_ids, seq_idx or cu_seq_lens_q, so the items' {SAMPLE_IDS!r} cannot be placed: "
                         f"{_PACKING_HINT} (plain concatenation would also let attention cross documents)")
    (source, seg), *others = found.items()
    for other, seg2 in others:
        if not torch.equal(seg, seg2):
            raise ValueError(f"CartoCollator: packed batch: the item boundaries of {source} and {other} disagree")
    return seg, (R, L), source


def _packed_token_ids(ids: list, per_sequence: bool, seg: torch.Tensor, shape: tuple, source: str) -> torch.Tensor:
    """Per-token ids [R, L] of a padding-free packed batch: item k's id (per_sequence) or its
    per-token ids on the tokens of segment k, :data:`IGNORED_ID` outside every segment."""
    inside = seg >= 0
    n_seg = int(seg.max()) + 1 if bool(inside.any()) else 0
    if n_seg != len(ids):
        raise ValueError(f"CartoCollator: padding-free packing: the batch holds {n_seg} packed sequences (from "
                         f"{source}) but {len(ids)} items carry {SAMPLE_IDS!r}: the ids do not fit the packed batch "
                         f"(one packed sequence per item expected)")
    out = torch.full((seg.numel(),), IGNORED_ID, dtype=torch.int64)
    if per_sequence:
        out[inside] = torch.cat(ids)[seg[inside]]
    else:
        lengths = torch.bincount(seg[inside], minlength=n_seg).tolist()
        for k, (t, n) in enumerate(zip(ids, lengths)):
            if t.numel() != n:
                raise ValueError(f"CartoCollator: padding-free packing: feature {k} has {t.numel()} per-token "
                                 f"{SAMPLE_IDS!r} but its packed sequence has {n} tokens (from {source}): the ids do "
                                 f"not fit the packed batch (one id per token of the item's input_ids expected)")
        out[inside] = torch.cat(ids)  # segments are numbered in token order
    return out.view(shape)


class CartoCollator:
    """Wraps a data collator and passes the items' ``"sample_ids"`` through it unchanged.

    Per-sequence ids (an int per item) come back as ``batch["sample_ids"]`` int64 [B]; per-token
    ids (a list per item, one id per token of its ``input_ids``) as int64 [B, L], the shape of the
    collated ``input_ids``, with :data:`IGNORED_ID` where the wrapped collator padded. When the
    wrapped collator packs the items padding-free (another number of rows than items, or
    ``seq_idx`` / ``cu_seq_lens_q`` in the batch: ``DataCollatorWithFlattening``), either kind
    comes back as per-token ids [R, L] placed by the packing boundaries (position_ids restarting,
    ``seq_idx`` runs, ``cu_seq_lens_q``; several must agree), :data:`IGNORED_ID` on tokens of no
    item. Items without ids give a batch without ``"sample_ids"`` (evaluation, prediction); a batch
    mixing items with and without ids, or per-sequence with per-token ids, and ids that do not fit
    a packed batch raise ValueError.

    Args:
        collator: the wrapped collator (list of feature dicts -> batch dict).
        padding_side: where the wrapped collator pads when the batch has no ``attention_mask``:
            "right" or "left"; None reads ``collator.tokenizer.padding_side`` (default "right").
    """

    def __init__(self, collator: Callable, padding_side: Optional[str] = None):
        if not callable(collator):
            raise ValueError(f"collator must be callable, got {type(collator).__name__}")
        if padding_side not in (None, "right", "left"):
            raise ValueError(f"padding_side must be 'right', 'left' or None, got {padding_side!r}")
        self.collator = collator
        self.padding_side = padding_side

    def _side(self) -> str:
        if self.padding_side is not None:
            return self.padding_side
        tok = getattr(self.collator, "tokenizer", None) or getattr(self.collator, "processing_class", None)
        return getattr(tok, "padding_side", "right") or "right"

    def __call__(self, features):
        raw, rest = [], []
        for f in features:
            f = dict(f)
            raw.append(f.pop(SAMPLE_IDS, None))
            rest.append(f)
        batch = self.collator(rest)
        have = [r is not None for r in raw]
        if not any(have):
            return batch
        if not all(have):
            raise ValueError(f"CartoCollator: features {[i for i, h in enumerate(have) if not h]} have no "
                             f"{SAMPLE_IDS!r} entry but others do: give every item of a batch its ids, or none")
        kinds = {_id_kind(r, i) for i, r in enumerate(raw)}
        if len(kinds) > 1:
            raise ValueError(f"CartoCollator: {SAMPLE_IDS!r} mixes per-sequence ids (ints) and per-token ids "
                             f"(lists) in one batch")
        ids = [_as_ids(r, i) for i, r in enumerate(raw)]
        segments = _packed_segments(batch, len(ids))
        if segments is not None:  # padding-free packing: per-token ids [R, L] from the boundaries
            batch[SAMPLE_IDS] = _packed_token_ids(ids, kinds == {"seq"}, *segments)
        elif kinds == {"seq"}:
            batch[SAMPLE_IDS] = torch.cat(ids)
        else:
            batch[SAMPLE_IDS] = self._pad_token_ids(ids, batch)
        return batch

    def _pad_token_ids(self, ids, batch) -> torch.Tensor:
        ref = batch.get("input_ids", batch.get("labels"))
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or ref.shape[0] != len(ids):
            raise ValueError(f"CartoCollator: per-token {SAMPLE_IDS!r} need a collated 'input_ids' (or 'labels') "
                             f"tensor [B, L] to align with, got {type(ref).__name__}")
        B, L = ref.shape
        out = torch.full((B, L), IGNORED_ID, dtype=torch.int64)
        mask = batch.get("attention_mask")
        use_mask = isinstance(mask, torch.Tensor) and tuple(mask.shape) == (B, L)
        side = self._side()
        for i, t in enumerate(ids):
            n = t.numel()
            if n > L:
                raise ValueError(f"CartoCollator: feature {i} has {n} per-token {SAMPLE_IDS!r} but the collated "
                                 f"sequence has {L} tokens (one id per token of input_ids is expected)")
            if use_mask and int(mask[i].sum()) == n:
                out[i, mask[i].bool()] = t  # wherever the tokens landed, whatever the padding side
            elif side == "left":
                out[i, L - n:] = t
            else:
                out[i, :n] = t
        return out


# --------------------------------------------------------------------------------------- callback
class CartoCallback(TrainerCallback):
    """Calls ``end_epoch()`` of a Cartographer or CartoState once per Trainer epoch.

    The epoch is folded at its last optimizer step (``on_step_end``), not in ``on_epoch_end``: the
    Trainer writes that step's checkpoint between the two, and on resume it treats a checkpoint at
    an epoch's last step as the end of that epoch (``global_step`` a multiple of the steps per
    epoch: it starts the next epoch and never replays or continues this one), so that checkpoint
    must hold the epoch folded. An epoch cut short by ``max_steps`` or ``should_training_stop`` is
    folded when ``train()`` ends instead (``on_train_end``): a checkpoint written after its
    ``on_epoch_end`` (``save_strategy="epoch"``) must still hold it open, since a resume from that
    global step continues the epoch. (Folding on resume instead, from the saved global step, would
    leave such a checkpoint's state file an epoch short for anyone reading it, ``gdc report`` say,
    and could not undo the fold of a cut-short epoch that a later save of the same step holds.)

    After each fold it logs :func:`gdc_ext.cartographer.epoch_metrics` (``carto/epochs``,
    ``carto/scored``, quantiles ``carto/{score}_p50`` / ``_p90`` / ``_p99`` of the Cartographer's
    score, ``carto/flagged`` and, once labelled, ``carto/n_{quadrant}``) through the ``trainer``'s
    ``Trainer.log`` (CartoTrainer passes itself): they land in ``trainer.state.log_history`` and
    reach every ``report_to`` integration (TensorBoard as ``train/carto/...``, W&B, MLflow) with
    no extra code; ``logging_strategy="no"`` turns them off. :attr:`history` keeps them too.
    """

    def __init__(self, target: Union[Cartographer, CartoState], trainer: Optional[Trainer] = None):
        refuse_sharded(target, "gdc_ext.integrations.hf.CartoCallback")
        if not isinstance(target, (Cartographer, CartoState)):
            raise ValueError(f"CartoCallback: expected a Cartographer or CartoState, got {type(target).__name__}")
        if trainer is not None and not isinstance(trainer, Trainer):
            raise ValueError(f"CartoCallback: trainer must be a transformers.Trainer or None, got {type(trainer).__name__}")
        self.target = target
        self.started_at: Optional[int] = None  # epochs done when the intervention phase started
        self._folded = False      # the Trainer's current epoch is folded already
        self._cut_short = False   # a cut-short epoch waits for on_train_end
        # the trainer whose Trainer.log the metrics go through (a plain reference, so that the callback
        # pickles with its trainer, as ray's hyperparameter search does)
        self._trainer = trainer
        self.history: list = []   # the metrics of every folded epoch (gdc_ext.cartographer.epoch_metrics)

    def _fold(self, args=None) -> None:
        self._folded = True
        if self.target.end_epoch():
            self.started_at = self.target.state.epochs_done
        self._log_epoch(args)

    def _log_epoch(self, args) -> None:
        """After each fold: :func:`gdc_ext.cartographer.epoch_metrics` (quantiles of the score, the
        number flagged, the quadrant counts once labelled) into ``Trainer.log``, which puts them in
        ``trainer.state.log_history`` and hands them to every reporting callback (TensorBoard, W&B,
        MLflow, ...: ``report_to``), unless ``logging_strategy="no"``."""
        from gdc_ext.cartographer import epoch_metrics

        metrics = epoch_metrics(self.target)
        self.history.append(metrics)
        if self._trainer is not None and (args is None or args.logging_strategy != "no"):
            self._trainer.log(dict(metrics))

    def on_train_begin(self, args, state, control, **kwargs):
        self._folded = self._cut_short = False
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._folded = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer sets state.epoch = epoch + (micro-batches done) / (micro-batches per epoch)
        # after each optimizer step, so it is a whole number exactly after the step holding the
        # epoch's last micro-batch: with gradient accumulation every micro-batch of the epoch has
        # been recorded by then (also when the last step has fewer of them), and max_steps or a stop
        # request mid-epoch leaves it fractional (the epoch stays open, see on_epoch_end).
        if not self._folded and _epoch_complete(state):
            self._fold(args)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._folded:
            return control
        if control.should_training_stop and not _epoch_complete(state):
            self._cut_short = True  # folded in on_train_end, after the checkpoints of this step
        else:
            self._fold(args)  # an epoch that ended before its last planned step (its batches ran out, should_epoch_stop)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._cut_short:
            self._cut_short = False
            self._fold(args)
        return control


def _epoch_complete(state) -> bool:
    """Whether the Trainer has run every batch of its current epoch (``state.epoch`` whole)."""
    epoch = getattr(state, "epoch", None)
    return epoch is not None and epoch > 0 and float(epoch).is_integer()


# --------------------------------------------------------------------------------------- checkpoints
def _write_json_atomic(path: str, obj: dict) -> None:
    """Writes ``obj`` as JSON atomically: a reader sees the old file or the new one."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh)

    write_atomic(path, write, prefix=".gdc-meta-")


def save_carto_checkpoint(folder: str, state: CartoState, cartographer: Optional[Cartographer] = None,
                          sampler_active: bool = False, *, global_step: Optional[int] = None,
                          trainer_epoch: Optional[float] = None) -> None:
    """Writes :data:`STATE_FILE` and then :data:`META_FILE` into ``folder`` (created if needed).

    The metadata carries the Trainer's ``global_step`` (and ``state.epoch``) at the save, the
    sha256 of the state file just written (binding the pair) and its own sha256."""
    os.makedirs(folder, exist_ok=True)
    spath = os.path.join(folder, STATE_FILE)
    # the Cartographer's reference in the state file too, so that `gdc report <checkpoint>` uses it
    state.save(spath, references=None if cartographer is None else cartographer.stored_references())
    carto = None
    if cartographer is not None:  # Cartographer.state_dict() but the CartoState (in STATE_FILE), as JSON
        carto = {k: (v.tolist() if torch.is_tensor(v) else v)
                 for k, v in cartographer.state_dict().items() if k != "state"}
    payload = {"format": "gdc_ext.hf", "version": _META_VERSION,
               "global_step": None if global_step is None else int(global_step),
               "trainer_epoch": None if trainer_epoch is None else float(trainer_epoch),
               "epochs_done": state.epochs_done, "state_sha256": file_sha256(spath),
               "sampler_active": bool(sampler_active), "cartographer": carto}
    _write_json_atomic(os.path.join(folder, META_FILE), json_with_checksum(payload))


def _read_json(path: str, what: str):
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} is damaged: not JSON ({e})") from None


def _read_meta(folder: str) -> dict:
    """The checked payload of ``folder``'s META_FILE (ValueError naming the file otherwise)."""
    what = f"checkpoint {folder!r}: {META_FILE}"
    obj = _read_json(os.path.join(folder, META_FILE), what)
    if isinstance(obj, dict) and obj.get("format") == "gdc_ext.hf" and obj.get("version") == 1:
        raise ValueError(f"{what} was written by an older gdc_ext (metadata version 1, without a checksum or a "
                         f"global step, and at an epoch's last step before the epoch was folded), so it cannot be "
                         f"checked against the checkpoint; resume it with the gdc_ext that wrote it, or pass "
                         f"carto_resume='fresh' to train on without its CartoState")
    meta = checked_json(obj, what)
    if meta.get("format") != "gdc_ext.hf" or meta.get("version") != _META_VERSION:
        raise ValueError(f"{what} is not gdc_ext metadata of version {_META_VERSION} (format "
                         f"{meta.get('format')!r}, version {meta.get('version')!r})")
    types = {"global_step": (int, type(None)), "trainer_epoch": (int, float, type(None)), "epochs_done": int,
             "state_sha256": str, "sampler_active": bool, "cartographer": (dict, type(None))}
    for key, kind in types.items():
        v = meta.get(key)
        if key not in meta or not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise ValueError(f"{what}: entry {key!r} is missing or has the wrong type ({v!r})")
    return meta


def _trainer_state_step(folder: str) -> Optional[int]:
    """``global_step`` of ``folder``'s trainer_state.json, None without that file."""
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    ts = _read_json(path, f"checkpoint {folder!r}: {TRAINER_STATE_NAME}")
    step = ts.get("global_step") if isinstance(ts, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"checkpoint {folder!r}: {TRAINER_STATE_NAME} has no integer 'global_step'")
    return step


def load_carto_checkpoint(folder: str, state: CartoState, cartographer: Optional[Cartographer] = None, *,
                          global_step: Optional[int] = None) -> dict:
    """Restores what :func:`save_carto_checkpoint` wrote into ``state`` (and ``cartographer``, whose
    state must be ``state``). Returns the metadata dict.

    Raises FileNotFoundError naming the folder and the missing file(s) when either gdc file is
    missing, and ValueError when a file is damaged (checksum), of an older version, or of another
    checkpoint: the metadata's global step must equal ``global_step`` (when given), the folder's
    ``checkpoint-<step>`` number and its trainer_state.json (when present), and the state file must
    be the one the metadata was written with. A mismatched configuration raises ValueError too.
    Everything is checked before ``state`` / ``cartographer`` change: a refused checkpoint leaves
    them as they were."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    spath, mpath = os.path.join(folder, STATE_FILE), os.path.join(folder, META_FILE)
    missing = [name for name, path in ((STATE_FILE, spath), (META_FILE, mpath)) if not os.path.isfile(path)]
    if len(missing) == 2:
        raise FileNotFoundError(f"checkpoint {folder!r} holds no CartoState: {STATE_FILE} and {META_FILE} are "
                                f"missing (a checkpoint of a stock Trainer?)")
    if missing:
        raise FileNotFoundError(f"checkpoint {folder!r} is incomplete: {missing[0]} is missing (only "
                                f"{STATE_FILE if missing[0] == META_FILE else META_FILE} is there)")
    meta = _read_meta(folder)
    step = meta["global_step"]
    known = {}
    if global_step is not None:
        known["the Trainer's state"] = int(global_step)
    else:
        ts_step = _trainer_state_step(folder)
        if ts_step is not None:
            known[TRAINER_STATE_NAME] = ts_step
    m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(os.path.normpath(folder)))
    if m:
        known["the folder's name"] = int(m.group(1))
    for where, expected in known.items():
        if step != expected:
            raise ValueError(f"checkpoint {folder!r}: {META_FILE} was written at global step {step} but "
                             f"{where} says step {expected}: the gdc files belong to another checkpoint")
    if file_sha256(spath) != meta["state_sha256"]:
        raise ValueError(f"checkpoint {folder!r}: {STATE_FILE} is not the state {META_FILE} was written with "
                         f"(damaged, or copied from another checkpoint): its sha256 differs")
    loaded = CartoState.load(spath, device=state.device)
    if loaded.epochs_done != meta["epochs_done"]:
        raise ValueError(f"checkpoint {folder!r}: {STATE_FILE} holds {loaded.epochs_done} epochs but {META_FILE} "
                         f"says {meta['epochs_done']}: the two files are of different checkpoints")
    sd = loaded.state_dict()
    if cartographer is None:
        state.load_state_dict(sd)
        return meta
    carto = meta["cartographer"]
    if carto is None:
        raise ValueError(f"checkpoint {folder!r} was written without a Cartographer: its labels and configuration "
                         f"are missing")
    try:
        codes, ref = carto["codes"], carto.get("reference")
        csd = {**carto, "state": sd, "codes": None if codes is None else torch.tensor(codes, dtype=torch.int8),
               "reference": None if ref is None else torch.tensor(ref, dtype=torch.float64)}
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"checkpoint {folder!r}: {META_FILE} has malformed Cartographer labels ({e!r})") from None
    cartographer.load_state_dict(csd)  # checks everything before it changes anything
    return meta


# --------------------------------------------------------------------------------------- trainer
def _accepts_use_cache(model: torch.nn.Module) -> bool:
    """Whether the model inside torch.compile's / DDP's / DataParallel's wrappers takes ``use_cache``."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------- references
def _no_cache_when_packed(model: torch.nn.Module, inputs: dict) -> None:
    """Sets ``use_cache=False`` in a padding-free packed batch (position_ids, no attention mask)
    unless the caller chose: transformers finds the documents of a packed row from its position_ids
    only without a key/value cache; TrainingArguments(use_cache=True) would let attention cross them
    (the fused path never uses a cache either)."""
    if ("position_ids" in inputs and inputs.get("attention_mask") is None and "use_cache" not in inputs
            and _accepts_use_cache(model)):
        inputs["use_cache"] = False


def _causal_lm_forward(head: Optional[torch.nn.Linear]):
    """forward(model, batch) for :func:`gdc_ext.reference_losses` over CartoCollator batches: the
    rows and ids CartoTrainer.compute_loss records (shifted as GPT-2 does); with ``head`` the
    decoder's hidden states (the fused linear path) in place of the logits."""
    def forward(model, batch):
        batch = dict(batch)
        ids = batch.pop(SAMPLE_IDS, None)
        if ids is None or "labels" not in batch:
            raise ValueError(f"reference_losses: every batch needs 'labels' and {SAMPLE_IDS!r} (items with sample "
                             f"ids, collated by CartoCollator)")
        labels = batch.pop("labels")
        if head is not None:
            from gdc_ext.integrations import hf_fused

            _, x, _ = hf_fused.hidden_states(model, batch)
        else:
            _no_cache_when_packed(model, batch)
            out = model(**batch)
            x = out["logits"] if isinstance(out, dict) else out[0]
        ids = ids.to(x.device)
        return x[:, :-1], labels[:, 1:].to(x.device), ids[:, 1:] if ids.dim() == 2 else ids
    return forward


def reference_losses(model: torch.nn.Module, batches, num_samples: int, *, fused_linear: bool = False,
                     progress: bool = True) -> torch.Tensor:
    """Each sample's mean token NLL [N] float64 under a causal LM ``model`` (a Hugging Face
    ``PreTrainedModel``): :func:`gdc_ext.reference_losses` over batches collated by
    :class:`CartoCollator` (dicts with ``input_ids``, ``labels``, ``sample_ids``, on the model's
    device), with the rows and ids CartoTrainer records. ``fused_linear=True`` runs the fused
    linear + cross-entropy on the decoder's hidden states and never builds the logits.
    :meth:`CartoTrainer.reference_losses` builds the batches for you."""
    from gdc_ext.counterfactual import reference_losses as _reference_losses

    head = None
    if fused_linear:
        from gdc_ext.integrations import hf_fused

        hf_fused.check_fused_model(model)
        head = hf_fused._unwrap(model).get_output_embeddings()
    return _reference_losses(model, batches, num_samples, forward=_causal_lm_forward(head), linear_head=head,
                             progress=progress)


@contextlib.contextmanager
def _reduction(loss: CartoLoss, reduction: str):
    saved = loss.reduction
    loss.reduction = reduction
    try:
        yield loss
    finally:
        loss.reduction = saved


class _Sized:
    """An iterable with a length, for the progress bar."""

    def __init__(self, it, n: int):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self) -> int:
        return self.n


class CartoTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is a CartoLoss (causal LM: shifted labels).

    Args (beyond Trainer's): exactly one of ``cartographer`` (Algorithm 1: recording, labels, loss
    weights, sampler), ``state`` (recording only) or ``loss`` (a CartoLoss of your own, recording
    into its ``state`` if it has one). ``fused_linear=True`` computes the loss with the fused
    linear + cross-entropy, never building the logits (causal LMs; see
    :mod:`gdc_ext.integrations.hf_fused`, which checks the model here, before training). Where
    logits are requested (``compute_loss(..., return_outputs=True)``: evaluation and prediction with
    ``compute_metrics`` or without ``prediction_loss_only``) they are built from the hidden states
    as the model builds them, so metrics, predictions and eval loss equal the unfused path's.
    ``carto_resume``: what ``train(resume_from_checkpoint=...)`` does with the checkpoint's gdc
    files: "exact" (default) restores them and raises when they are missing, incomplete, damaged
    or of another global step; "fresh" does not read them and trains on from the current state
    (warning that the scores miss the epochs before the checkpoint).
    """

    def __init__(self, *args, cartographer: Optional[Cartographer] = None, state: Optional[CartoState] = None,
                 loss: Optional[CartoLoss] = None, fused_linear: bool = False, carto_resume: str = "exact", **kwargs):
        if sum(x is not None for x in (cartographer, state, loss)) != 1:
            raise ValueError("CartoTrainer: give exactly one of cartographer=, state= or loss=")
        if not isinstance(carto_resume, str) or carto_resume not in RESUME_MODES:
            raise ValueError(f"carto_resume must be one of {', '.join(map(repr, RESUME_MODES))}, got {carto_resume!r}")
        if cartographer is not None and not isinstance(cartographer, Cartographer):
            raise ValueError(f"cartographer must be a gdc_ext.Cartographer, got {type(cartographer).__name__}")
        refuse_sharded(state if loss is None else getattr(loss, "state", None), "CartoTrainer")
        if state is not None and not isinstance(state, CartoState):
            raise ValueError(f"state must be a gdc_ext.CartoState, got {type(state).__name__}")
        if loss is not None and not isinstance(loss, CartoLoss):
            raise ValueError(f"loss must be a gdc_ext.CartoLoss, got {type(loss).__name__}")
        self.cartographer = cartographer
        self.carto_resume = carto_resume
        self.carto_loss = cartographer.loss if cartographer is not None else (loss or CartoLoss(state=state))
        target = cartographer if cartographer is not None else self.carto_loss.state
        super().__init__(*args, **kwargs)
        # The Trainer counts the non-ignored shifted labels of each accumulated batch
        # (num_items_in_batch) only for models that take loss kwargs; compute_loss divides the token
        # sum by that count, so the loss counts as scaled for gradient accumulation exactly when the
        # count is given (loss_is_scaled_for_ga = None lets the Trainer decide per step).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = None
        self._loss_shifts_labels = True  # compute_loss always shifts: count labels[..., 1:]
        self._warned_no_ids = False
        self._sampler_active = False      # whether this train() call's dataloader uses carto.sampler()
        self._resume_sampler: Optional[bool] = None
        self.fused_linear = bool(fused_linear)
        # set by prediction_step while its caller discards the logits (prediction_loss_only): the
        # fused path then computes the eval loss without building them
        self._logits_not_needed = False
        if self.fused_linear:
            from gdc_ext.integrations.hf_fused import check_fused_trainer

            check_fused_trainer(self)  # refuses a model it cannot handle before training
        if target is not None:
            self.add_callback(CartoCallback(target, trainer=self))
        if cartographer is not None and abs(cartographer.gamma - round(cartographer.gamma)) > 0:
            warnings.warn("CartoTrainer: a fractional gamma makes epoch lengths vary; the Trainer fixes steps per "
                          "epoch from the first epoch and may cut an epoch's last batches", stacklevel=2)

    @property
    def carto_state(self) -> Optional[CartoState]:
        return self.carto_loss.state

    def reference_losses(self, dataset=None, progress: bool = True) -> torch.Tensor:
        """The current model's mean token NLL [N] float64 on every sample of ``dataset`` (default
        the training set), batched like evaluation (the data collator, the eval batch size, no
        shuffling, split over ranks and all-reduced), through the fused linear path when
        ``fused_linear``. Before the first step this is the "initial" counterfactual reference
        of a fine-tuning run (``Cartographer(reference="initial")``, scored by :meth:`train`)."""
        state = self.carto_state
        if state is None:
            raise ValueError("CartoTrainer.reference_losses: no CartoState, so the number of samples is unknown")
        loader = self.get_eval_dataloader(dataset if dataset is not None else self.train_dataset)
        batches = (self._prepare_inputs(b) for b in loader)
        sized = _Sized(batches, len(loader)) if hasattr(loader, "__len__") else batches
        return reference_losses(self.model, sized, state.num_samples, fused_linear=self.fused_linear,
                                progress=progress and self.is_local_process_zero())

    def _score_initial_reference(self, resuming: bool) -> None:
        carto = self.cartographer
        if carto is None or carto.reference_mode != "initial" or carto.reference is not None:
            return
        if resuming or self.carto_state.epochs_done > 0 or self.state.global_step > 0:
            # a resumed or already trained model has seen the samples: its losses are no reference
            raise RuntimeError("CartoTrainer: reference='initial' needs the model before its first step, but this "
                               "model has already trained and no reference was restored (a checkpoint written "
                               "with reference='initial' carries it; carto_resume='fresh' cannot measure it)")
        carto.set_reference(self.reference_losses())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if SAMPLE_IDS not in self._signature_columns:
            self._signature_columns.append(SAMPLE_IDS)

    def _get_train_sampler(self, *args, **kwargs):
        use = self._resume_sampler if self._resume_sampler is not None else (
            self.cartographer is not None and self.cartographer.intervening)
        self._sampler_active = bool(use)
        if use:
            if self.cartographer is None or not self.cartographer.intervening:
                raise ValueError("CartoTrainer: the checkpoint was sampling with the CartoSampler but no labels "
                                 "were restored")
            return self.cartographer.sampler()
        return super()._get_train_sampler(*args, **kwargs)

    # ------------------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args, **kwargs):
        """``Trainer.train``; with ``resume_from_checkpoint`` the CartoState (and the Cartographer's
        labels) are restored from the checkpoint before training continues. A checkpoint whose gdc
        files are missing (a stock Trainer's), incomplete, damaged or of another global step raises
        FileNotFoundError / ValueError before anything changes, unless ``carto_resume="fresh"``."""
        self._resume_sampler = None
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        if resuming:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
            if folder is not None:  # None: the Trainer raises its own error below
                self._restore_carto(os.fspath(folder))
        # reference="initial": the model before its first step scores every training sample (a
        # resumed run has the reference from its checkpoint)
        self._score_initial_reference(resuming)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resume_sampler = None

    def _restore_carto(self, folder: str) -> None:
        state = self.carto_state
        if state is None:
            return
        if self.carto_resume == "fresh":
            warnings.warn(f"CartoTrainer: carto_resume='fresh': the gdc files of checkpoint {folder!r} are not read; "
                          f"the scores keep the current state ({state.epochs_done} epochs) and miss the epochs "
                          f"before the checkpoint", UserWarning, stacklevel=3)
            return
        hint = " (or pass CartoTrainer(..., carto_resume='fresh') to train on from the current state instead)"
        try:
            # the Trainer resumes at trainer_state.json's global step (at step 0 without that file)
            step = _trainer_state_step(folder) if os.path.isdir(folder) else None
            if step is None and os.path.isdir(folder):
                raise FileNotFoundError(f"checkpoint {folder!r} has no {TRAINER_STATE_NAME}: the Trainer would "
                                        f"restart at step 0 while a restored CartoState holds the checkpoint's epochs")
            meta = load_carto_checkpoint(folder, state, self.cartographer, global_step=step)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"CartoTrainer: {e}{hint}") from None
        self._resume_sampler = bool(meta["sampler_active"])
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CartoCallback) and self.cartographer is not None and self.cartographer.intervening:
                cb.started_at = self.cartographer.label_after

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's own files: trainer_state.json, which completes a
        # checkpoint, comes last. Every rank holds the same (all-reduced) state: rank 0 writes.
        state = self.carto_state
        if state is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_carto_checkpoint(folder, state, self.cartographer, self._sampler_active,
                                  global_step=self.state.global_step, trainer_epoch=self.state.epoch)
        super()._save_checkpoint(model, trial)

    # ------------------------------------------------------------------------------ loss
    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: Optional[list] = None):
        """``Trainer.prediction_step``. With ``fused_linear=True`` the logits it returns (to
        ``preprocess_logits_for_metrics``, ``compute_metrics``, ``predict()``) are the model's,
        ``lm_head(last_hidden_state)``, and the loss is computed from them as without
        ``fused_linear``; with ``prediction_loss_only`` the logits are never built and the loss is
        the fused one."""
        saved = self._logits_not_needed
        self._logits_not_needed = bool(prediction_loss_only)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._logits_not_needed = saved

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        inputs = dict(inputs)
        ids = inputs.pop(SAMPLE_IDS, None)
        if "labels" not in inputs:
            raise ValueError("CartoTrainer: the batch has no 'labels' (use a collator that sets them, e.g. "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        labels = inputs.pop("labels")
        fused = self.fused_linear
        if fused:  # the decoder's hidden states; the LM head is applied inside the fused loss
            from gdc_ext.integrations import hf_fused

            outputs, logits, head = hf_fused.hidden_states(model, inputs)
            if return_outputs and not self._logits_not_needed:
                # The caller reads the outputs' logits (prediction_step hands them to
                # preprocess_logits_for_metrics / compute_metrics): build them as the model's forward
                # does, lm_head(last hidden state), and take the loss from them as the unfused path
                # does, so predictions, metrics and eval loss equal a run without fused_linear.
                logits = head(logits)
                outputs = hf_fused.outputs_with_logits(outputs, logits)
                fused = False
        else:
            _no_cache_when_packed(model, inputs)
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # position t predicts the label at t+1; that row belongs to the sample of token t+1
        shift_logits = logits[:, :-1, :]
        shift_labels = labels[:, 1:].to(logits.device)
        training = model.training and torch.is_grad_enabled()
        fn = self.carto_loss
        if training and ids is None and fn.state is not None and not self._warned_no_ids:
            self._warned_no_ids = True
            warnings.warn(f"CartoTrainer: a training batch has no {SAMPLE_IDS!r}, so the CartoState records nothing "
                          f"for it (give every training item its sample ids; this warning is shown once)",
                          UserWarning, stacklevel=2)
        train_ids = None
        if training and ids is not None:
            train_ids = ids.to(logits.device)
            if train_ids.dim() == 2:  # per-token ids [B, L]: shifted like the labels
                if tuple(train_ids.shape) != tuple(labels.shape):
                    raise ValueError(f"CartoTrainer: per-token {SAMPLE_IDS!r} have shape {tuple(train_ids.shape)} "
                                     f"but labels {tuple(labels.shape)}")
                train_ids = train_ids[:, 1:].reshape(-1)
        flat_logits = shift_logits.reshape(-1, shift_logits.shape[-1])
        flat_labels = shift_labels.reshape(-1)
        # evaluation batches carry ids of another split (or none): no recording, no weights
        # (CartoLoss insists on ids once loss weights are set; without ids there is nothing to weight)
        plain = train_ids is None and fn.sample_weight is not None
        reduction = "sum" if num_items_in_batch is not None else "mean"
        if fused:  # flat_logits are the hidden states [R, H] here
            loss = hf_fused.head_loss(head, fn, flat_logits, flat_labels, train_ids, reduction)
        elif plain:
            loss = torch.nn.functional.cross_entropy(flat_logits.float(), flat_labels, weight=fn.weight,
                                                     ignore_index=fn.ignore_index, reduction=reduction,
                                                     label_smoothing=fn.label_smoothing)
        else:
            with _reduction(fn, reduction):
                loss = fn(flat_logits, flat_labels, train_ids)
        if num_items_in_batch is not None:
            # the stock Trainer's normalisation: token sum over the accumulated batch's label count
            loss = loss / num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) \
                else loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every rank's tokens while DDP averages gradients
                # (as Trainer.compute_loss does)
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss
