"""transformers integration: CartoTrainer on a tiny GPT-2 built from GPT2Config (no downloads)."""
import functools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import STATE_FILE, CartoCallback, CartoCollator, CartoTrainer  # noqa: E402
from helpers import TokenData, lm_batch  # noqa: E402

N, L, VOCAB = 12, 8, 64

_Data = functools.partial(TokenData, N, L, VOCAB)
_collate = lm_batch


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
    # items without ids (evaluation, prediction) collate to a batch without ids
    assert "sample_ids" not in CartoCollator(_collate)([{"input_ids": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="exactly one"):
        _trainer(tmp_path, 1)


# ------------------------------------------------------------------------------------------------
# issue 12: resume keeps the state, per-token ids, eval without ids, gradient accumulation parity


def _gpt2(seed=0):
    torch.manual_seed(seed)
    # no dropout: the comparison is about the CartoState, not about HF's RNG bookkeeping
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                 eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_train_epochs=6, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], save_strategy="epoch", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
                seed=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _StopAt(transformers.TrainerCallback):
    """Interrupts training after ``epoch`` epochs or ``step`` optimizer steps (the checkpoint is still saved)."""

    def __init__(self, epoch=None, step=None):
        self.epoch, self.step = epoch, step

    def on_step_end(self, args, state, control, **kw):
        if self.step is not None and state.global_step >= self.step:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kw):
        if self.epoch is not None and round(state.epoch) >= self.epoch:
            control.should_training_stop = True


def _make_target(kind, label_after):
    if kind == "state":
        return {"state": gdc_ext.CartoState(N, burn_in=2, eps=[2.0, 3.5])}
    # carto_excess: a score that needs a per-sample reference, which the checkpoint must carry too
    score = dict(memorization="excess", reference=torch.linspace(3.0, 5.0, N, dtype=torch.float64)) \
        if kind == "carto_excess" else {}
    return {"cartographer": gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=3.5, alpha_d=0.5, alpha_m=0.5,
                                                 label_after=label_after, **score)}


def _assert_scores_equal(a, b):
    for f in ("difficulty", "memorization", "forgets", "transitions", "observed", "last_loss", "min_loss",
              "loss_mean", "loss_std", "grad_energy"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0, equal_nan=True, msg=f)
    assert (a.eps, a.epoch, a.burn_in) == (b.eps, b.epoch, b.burn_in)


def _state_of(target):
    return target["state"] if "state" in target else target["cartographer"].state


@pytest.mark.parametrize("kind,label_after,stop", [("state", None, dict(epoch=3)),
                                                   ("carto", 2, dict(epoch=3)),   # labels fixed before the stop
                                                   ("carto", 4, dict(epoch=3)),   # labels fixed after the resume
                                                   ("carto_excess", 2, dict(epoch=3)),  # score with a reference
                                                   ("state", None, dict(step=4))])  # mid-epoch checkpoint
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, kind, label_after, stop):
    full_t = _make_target(kind, label_after)
    full = CartoTrainer(model=_gpt2(), args=_args(tmp_path / "full"), train_dataset=_Data(),
                        data_collator=CartoCollator(_collate), **full_t)
    full.train()

    first_t = _make_target(kind, label_after)
    save = dict(save_strategy="steps", save_steps=4) if "step" in stop else {}
    first = CartoTrainer(model=_gpt2(), args=_args(tmp_path / "cut", **save), train_dataset=_Data(),
                         data_collator=CartoCollator(_collate), callbacks=[_StopAt(**stop)], **first_t)
    first.train()
    ckpt = transformers.trainer_utils.get_last_checkpoint(str(tmp_path / "cut"))
    assert ckpt is not None
    saved = gdc_ext.CartoState.load(os.path.join(ckpt, STATE_FILE))
    assert saved.epochs_done == stop.get("epoch", 1)
    if "step" in stop:  # mid-epoch: the epoch accumulator holds the recorded part of epoch 2
        assert float(saved.acc[:, 1].sum()) > 0

    # a fresh process would build everything anew: fresh model, fresh state
    resumed_t = _make_target(kind, label_after)
    resumed = CartoTrainer(model=_gpt2(seed=1), args=_args(tmp_path / "cut", **save), train_dataset=_Data(),
                           data_collator=CartoCollator(_collate), **resumed_t)
    resumed.train(resume_from_checkpoint=ckpt)

    a, b = _state_of(full_t), _state_of(resumed_t)
    assert a.epochs_done == b.epochs_done == 6
    _assert_scores_equal(a.scores(), b.scores())
    qa, qb = a.scores().quadrants(0.5, 0.5), b.scores().quadrants(0.5, 0.5)
    assert torch.equal(qa.codes, qb.codes)
    if kind.startswith("carto"):
        ca, cb = full_t["cartographer"], resumed_t["cartographer"]
        assert ca.intervening and cb.intervening
        assert torch.equal(ca.quadrants.codes, cb.quadrants.codes)
        assert torch.equal(ca.loss.sample_weight, cb.loss.sample_weight)


def test_resume_with_true_finds_the_last_checkpoint_and_its_state(tmp_path):
    st = gdc_ext.CartoState(N, burn_in=2, eps=2.0)
    CartoTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=_Data(), data_collator=CartoCollator(_collate),
                 callbacks=[_StopAt(epoch=2)], state=st).train()
    st2 = gdc_ext.CartoState(N, burn_in=2, eps=2.0)
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=3), train_dataset=_Data(),
                      data_collator=CartoCollator(_collate), state=st2)
    tr.train(resume_from_checkpoint=True)
    assert st2.epochs_done == 3 and st2.scores().observed.tolist() == [3] * N


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    st = gdc_ext.CartoState(N, burn_in=2, eps=2.0)
    CartoTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=_Data(), data_collator=CartoCollator(_collate),
                 callbacks=[_StopAt(epoch=1)], state=st).train()
    other = gdc_ext.CartoState(N, burn_in=3, eps=2.0)
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=_Data(),
                      data_collator=CartoCollator(_collate), state=other)
    with pytest.raises(ValueError, match="burn_in"):
        tr.train(resume_from_checkpoint=True)


def _pad_collate(features):
    """Right-pads input_ids; labels are -100 on padding (as DataCollatorForLanguageModeling does)."""
    L = max(len(f["input_ids"]) for f in features)
    x = torch.zeros(len(features), L, dtype=torch.long)
    labels = torch.full((len(features), L), -100, dtype=torch.long)
    mask = torch.zeros(len(features), L, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        x[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = x[i, :n]
        mask[i, :n] = 1
    return {"input_ids": x, "labels": labels, "attention_mask": mask}


def test_collator_passes_per_sequence_and_per_token_ids_through():
    col = CartoCollator(_pad_collate)
    b = col([{"input_ids": [1, 2, 3], "sample_ids": 7}, {"input_ids": [4, 5], "sample_ids": torch.tensor(2)}])
    assert b["sample_ids"].tolist() == [7, 2] and b["sample_ids"].dtype == torch.int64
    b = col([{"input_ids": [1, 2, 3], "sample_ids": [0, 0, 5]}, {"input_ids": [4, 5], "sample_ids": [9, 3]}])
    assert b["sample_ids"].tolist() == [[0, 0, 5], [9, 3, -1]]
    assert b["input_ids"].shape == b["sample_ids"].shape


def test_collator_pads_per_token_ids_where_the_collator_padded():
    def left_pad(features):  # a left-padding tokenizer: the attention mask tells where the tokens went
        out = _pad_collate([{"input_ids": list(reversed(f["input_ids"]))} for f in features])
        return {k: v.flip(1) for k, v in out.items()}

    b = CartoCollator(left_pad)([{"input_ids": [1, 2, 3], "sample_ids": [4, 4, 5]},
                                 {"input_ids": [6], "sample_ids": [8]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [0, 0, 6]]
    assert b["sample_ids"].tolist() == [[4, 4, 5], [-1, -1, 8]]


def test_collator_errors_name_the_problem():
    col = CartoCollator(_pad_collate)
    with pytest.raises(ValueError, match="sample_ids"):  # some items with ids, some without
        col([{"input_ids": [1], "sample_ids": 0}, {"input_ids": [2]}])
    with pytest.raises(ValueError, match="sample_ids"):  # per-token ids longer than the sequence
        col([{"input_ids": [1, 2], "sample_ids": [0, 0, 0]}])
    with pytest.raises(ValueError, match="sample_ids"):  # mixed per-sequence and per-token ids
        col([{"input_ids": [1, 2], "sample_ids": [0, 0]}, {"input_ids": [1, 2], "sample_ids": 1}])


class _Packed(torch.utils.data.Dataset):
    """Rows of L tokens packing several documents each (one id per token), with ragged ends."""

    def __init__(self, rows=6, docs=10):
        g = torch.Generator().manual_seed(3)
        self.items = []
        doc = 0
        for _ in range(rows):
            n = int(torch.randint(L - 2, L + 1, (1,), generator=g))
            cuts = sorted(torch.randperm(n - 1, generator=g)[:2].add(1).tolist())
            ids, start = [], 0
            for c in cuts + [n]:
                ids += [doc % docs] * (c - start)
                doc, start = doc + 1, c
            self.items.append({"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(), "sample_ids": ids})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_records_packed_per_token_ids_with_the_label_token_owner(tmp_path):
    data = _Packed()
    docs = 10
    state = gdc_ext.CartoState(docs, burn_in=1, eps=2.0)
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=1, save_strategy="no"), train_dataset=data,
                      data_collator=CartoCollator(_pad_collate), state=state)
    counts = []
    fold = state.end_epoch

    def spy():
        counts.append(state.acc[:, 1].clone())
        fold()

    state.end_epoch = spy
    tr.train()
    # the row predicting token t+1 belongs to the document of token t+1 (the label): every token
    # but the first of its row is a label, whatever document the previous token belonged to
    expected = torch.zeros(docs, dtype=torch.float64)
    for it in data.items:
        for d in it["sample_ids"][1:]:
            expected[d] += 1
    assert counts[0].tolist() == expected.tolist()


class _NoIds(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": _Data().tokens[i]}


def test_evaluation_and_prediction_without_sample_ids(tmp_path):
    state = gdc_ext.CartoState(N, burn_in=1, eps=2.0)
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=1, save_strategy="no",
                                                per_device_eval_batch_size=4),
                      train_dataset=_Data(), eval_dataset=_NoIds(), data_collator=CartoCollator(_collate), state=state)
    metrics = tr.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    pred = tr.predict(_NoIds())
    assert pred.predictions is not None
    assert float(state.acc.abs().sum()) == 0.0  # nothing recorded
    tr.train()  # and training with ids still records
    assert state.scores().observed.tolist() == [1] * N


def test_training_without_ids_while_a_state_is_set_warns_once(tmp_path):
    state = gdc_ext.CartoState(N, burn_in=1, eps=2.0)
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=2, save_strategy="no"),
                      train_dataset=_NoIds(), data_collator=CartoCollator(_collate), state=state)
    with pytest.warns(UserWarning, match="sample_ids") as rec:
        tr.train()
    assert sum("sample_ids" in str(w.message) and "records nothing" in str(w.message) for w in rec) == 1


class _Uneven(torch.utils.data.Dataset):
    """Rows with very different numbers of non-ignored labels."""

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randint(0, VOCAB, (n, L), generator=g)
        self.keep = [2 + (i * 5) % (L - 2) for i in range(n)]  # 2..L-1 labelled tokens: 1..L-2 targets

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        labels = self.x[i].clone()
        labels[self.keep[i]:] = -100
        return {"input_ids": self.x[i], "labels": labels, "sample_ids": i}


def _uneven_collate(features):
    return {k: torch.stack([f[k] for f in features]) for k in ("input_ids", "labels")}


@pytest.mark.parametrize("ga", [2, 3])
def test_gradient_accumulation_matches_the_stock_trainer(tmp_path, ga):
    # plain SGD: Adam's normalisation would amplify float32 rounding of near-zero gradients
    kw = dict(num_train_epochs=1, per_device_train_batch_size=1, gradient_accumulation_steps=ga, save_strategy="no",
              learning_rate=0.5, optim="sgd", lr_scheduler_type="constant")
    stock = transformers.Trainer(model=_gpt2(), args=_args(tmp_path / "stock", **kw), train_dataset=_Uneven(),
                                 data_collator=_uneven_collate)
    stock.train()
    state = gdc_ext.CartoState(len(_Uneven()), burn_in=1, eps=2.0)
    carto = CartoTrainer(model=_gpt2(), args=_args(tmp_path / "carto", **kw), train_dataset=_Uneven(),
                         data_collator=CartoCollator(_uneven_collate), state=state)
    carto.train()
    assert state.scores().observed.tolist() == [1] * len(_Uneven())
    worst = max(float((p - q).detach().abs().max()) for p, q in zip(stock.model.parameters(), carto.model.parameters()))
    assert worst < 1e-5, worst


def test_resume_from_a_checkpoint_without_carto_state_raises_unless_fresh(tmp_path):
    # issue 17 item 9: a stock checkpoint used to warn and train on with scores missing its epochs;
    # now it raises, and carto_resume="fresh" is the explicit way to train on from the current state
    stock = transformers.Trainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=1), train_dataset=_NoIds(),
                                 data_collator=_collate)
    stock.train()
    state = gdc_ext.CartoState(N, burn_in=1, eps=2.0)
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=2), train_dataset=_Data(),
                      data_collator=CartoCollator(_collate), state=state)
    with pytest.raises(FileNotFoundError, match="holds no CartoState.*carto_resume='fresh'"):
        tr.train(resume_from_checkpoint=True)
    assert state.epochs_done == 0
    tr = CartoTrainer(model=_gpt2(), args=_args(tmp_path, num_train_epochs=2), train_dataset=_Data(),
                      data_collator=CartoCollator(_collate), state=state, carto_resume="fresh")
    with pytest.warns(UserWarning, match="carto_resume='fresh'.*miss the epochs before the checkpoint"):
        tr.train(resume_from_checkpoint=True)
    assert state.epochs_done == 1  # only the epoch trained after the resume
