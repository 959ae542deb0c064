"""CartoCollator with padding-free packing (transformers' DataCollatorWithFlattening): one id per
item (or per-token id lists) become per-token ids [1, total] placed by the packing boundaries
(position_ids restarting, seq_idx, cu_seq_lens_q); ids that do not fit the packed batch raise;
and CartoTrainer's per-document scores under packing equal the unpacked (one sequence per row)
run's, on tiny GPT-2 / Llama models (no downloads)."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")

import gdc_ext  # noqa: E402
from gdc_ext.integrations.hf import IGNORED_ID, CartoCollator, CartoTrainer  # noqa: E402
from gdc_ext.layout import ACC_COUNT, ACC_LOSS_SUM  # noqa: E402

Flatten = transformers.DataCollatorWithFlattening
VOCAB = 64

# every way DataCollatorWithFlattening marks the boundaries (position_ids_start: RoBERTa-like models)
BOUNDARIES = [dict(), dict(return_seq_idx=True), dict(return_flash_attn_kwargs=True),
              dict(return_position_ids=False, return_seq_idx=True),
              dict(return_position_ids=False, return_flash_attn_kwargs=True), dict(position_ids_start=2)]
BOUNDARY_IDS = ["position_ids", "seq_idx", "flash", "seq_idx-only", "flash-only", "start-2"]


def _items(lengths, ids):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(), "sample_ids": i}
            for n, i in zip(lengths, ids)]


@pytest.mark.parametrize("kw", BOUNDARIES, ids=BOUNDARY_IDS)
def test_one_id_per_item_becomes_per_token_ids_at_the_packing_boundaries(kw):
    feats = _items((9, 20), (4, 7))
    b = CartoCollator(Flatten(**kw))(feats)
    ref = Flatten(**kw)([{k: v for k, v in f.items() if k != "sample_ids"} for f in feats])
    assert b.keys() - {"sample_ids"} == ref.keys()
    assert torch.equal(b["input_ids"], ref["input_ids"])  # the wrapped collator's batch is untouched
    assert b["sample_ids"].tolist() == [[4] * 9 + [7] * 20]  # not two equal chunks (14, 15)
    assert b["sample_ids"].dtype == torch.int64


@pytest.mark.parametrize("kw", BOUNDARIES, ids=BOUNDARY_IDS)
def test_per_token_id_lists_are_concatenated_like_the_tokens(kw):
    feats = [{"input_ids": [5, 6, 7], "sample_ids": [0, 0, 3]}, {"input_ids": [8, 9], "sample_ids": [1, 2]}]
    b = CartoCollator(Flatten(**kw))(feats)
    assert b["sample_ids"].tolist() == [[0, 0, 3, 1, 2]]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), per_token=st.booleans(),
       kw=st.sampled_from(BOUNDARIES))
def test_packed_ids_match_the_items_property(lengths, per_token, kw):
    feats = _items(lengths, range(len(lengths)))
    if per_token:
        for i, f in enumerate(feats):
            f["sample_ids"] = [10 * i + t for t in range(len(f["input_ids"]))]
    b = CartoCollator(Flatten(**kw))(feats)
    want = []
    for i, n in enumerate(lengths):
        want += [10 * i + t for t in range(n)] if per_token else [i] * n
    got = b["sample_ids"]
    if len(lengths) == 1 and not per_token and got.dim() == 1:  # one item, one row: the per-sequence id [1]
        got = got.expand_as(b["input_ids"])
    assert got.tolist() == [want]
    assert got.shape == b["input_ids"].shape


def test_ids_that_do_not_fit_the_packed_batch_raise_naming_packing():
    col = CartoCollator(Flatten())
    with pytest.raises(ValueError, match=r"(?s)packing.*feature 1 has 3 per-token 'sample_ids'.*2 tokens"):
        col([{"input_ids": [5, 6, 7], "sample_ids": [0, 0, 3]}, {"input_ids": [8, 9], "sample_ids": [1, 2, 2]}])
    with pytest.raises(ValueError, match=r"(?s)packing.*feature 0 has 2 per-token 'sample_ids'.*3 tokens"):
        col([{"input_ids": [5, 6, 7], "sample_ids": [0, 0]}, {"input_ids": [8, 9], "sample_ids": [1, 2]}])

    def merged(features):  # a packer whose position_ids run on across items: one packed sequence for two
        b = Flatten()(features)
        b["position_ids"] = torch.arange(b["input_ids"].shape[1])[None]
        return b

    with pytest.raises(ValueError, match=r"(?s)packing.*1 packed sequences.*2 items.*do not fit"):
        CartoCollator(merged)(_items((3, 4), (0, 1)))

    # plain concatenation: no boundaries at all
    with pytest.raises(ValueError, match=r"(?s)2 items without position_ids, seq_idx or cu_seq_lens_q.*packing"):
        CartoCollator(Flatten(return_position_ids=False))(_items((3, 4), (0, 1)))

    def disagree(features):
        b = Flatten(return_seq_idx=True)(features)
        b["seq_idx"] = torch.zeros_like(b["seq_idx"])
        return b

    with pytest.raises(ValueError, match="boundaries of position_ids and seq_idx disagree"):
        CartoCollator(disagree)(_items((3, 4), (0, 1)))

    def bad_cu(features):
        b = Flatten(return_flash_attn_kwargs=True, return_position_ids=False)(features)
        b["cu_seq_lens_q"] = torch.tensor([0, 3, 5], dtype=torch.int32)  # ends before the 7 tokens
        return b

    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        CartoCollator(bad_cu)(_items((3, 4), (0, 1)))


def test_items_without_ids_and_single_items_are_unchanged():
    b = CartoCollator(Flatten())([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert "sample_ids" not in b
    b = CartoCollator(Flatten())([{"input_ids": [1, 2, 3], "sample_ids": 5}])
    assert b["sample_ids"].reshape(-1).unique().tolist() == [5]


def test_packing_with_several_rows_and_padding():
    """A packer returning several padded rows (attention_mask 0 on the padding): each row's items
    are found from position_ids within the mask, padding gets IGNORED_ID."""
    def two_rows(features):
        a, b = Flatten()(features[:2]), Flatten()(features[2:])
        L = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)

        out = {k: torch.cat([pad(a[k], v), pad(b[k], v)]) for k, v in (("input_ids", 0), ("labels", -100),
                                                                          ("position_ids", 0))}
        out["attention_mask"] = torch.cat([pad(torch.ones_like(a["input_ids"]), 0), pad(torch.ones_like(b["input_ids"]), 0)])
        return out

    b = CartoCollator(two_rows)(_items((2, 3, 4), (7, 8, 9)))
    assert b["sample_ids"].tolist() == [[7, 7, 8, 8, 8], [9, 9, 9, 9, IGNORED_ID]]


# --------------------------------------------------------------------------- CartoTrainer, one step
DOC_LENGTHS = (9, 20, 4, 13, 6, 11)


class _Docs(torch.utils.data.Dataset):
    def __init__(self):
        self.items = _items(DOC_LENGTHS, range(len(DOC_LENGTHS)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pad_collate(features):
    """One document per row, right padding (attention mask 0, label -100): the unpacked reference."""
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


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(attn="sdpa"):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg)


def _llama_eager():
    return _llama("eager")


MODELS = pytest.mark.parametrize("make_model", [_gpt2, _llama, _llama_eager], ids=["gpt2", "llama", "llama-eager"])


def _one_step(tmp_path, model, collator, fused, **args_kw):
    """(accumulator at the end of the epoch, trained parameters) of one SGD step over all documents."""
    state = gdc_ext.CartoState(len(DOC_LENGTHS), burn_in=1, eps=2.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, **args_kw,
                                          per_device_train_batch_size=len(DOC_LENGTHS), learning_rate=0.5, optim="sgd",
                                          lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                                          disable_tqdm=True)
    tr = CartoTrainer(model=model, args=args, train_dataset=_Docs(), data_collator=CartoCollator(collator),
                      state=state, fused_linear=fused)
    acc = []
    fold = state.end_epoch

    def spy():
        acc.append(state.acc.clone())
        return fold()

    state.end_epoch = spy
    tr.train()
    assert tr.state.global_step == 1
    return acc[0], dict(tr.model.named_parameters())


@MODELS
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kw", [dict(), dict(return_seq_idx=True, return_flash_attn_kwargs=True)],
                         ids=["position_ids", "all-boundaries"])
def test_packed_per_document_losses_equal_the_unpacked_run(tmp_path, make_model, fused, kw):
    torch.manual_seed(0)
    model = make_model()
    packed_acc, packed_params = _one_step(tmp_path / "packed", copy.deepcopy(model), Flatten(**kw), fused)
    padded_acc, padded_params = _one_step(tmp_path / "padded", copy.deepcopy(model), _pad_collate, fused)
    # every document's labels but its first token (the separator -100 of the packed row; the
    # shifted-away first label of a padded row) are recorded for it, with the same loss
    assert packed_acc[:, ACC_COUNT].tolist() == [n - 1 for n in DOC_LENGTHS]
    assert padded_acc[:, ACC_COUNT].tolist() == [n - 1 for n in DOC_LENGTHS]
    torch.testing.assert_close(packed_acc[:, ACC_LOSS_SUM], padded_acc[:, ACC_LOSS_SUM], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_acc, padded_acc, rtol=1e-5, atol=1e-5)  # the gradient energy too
    for name, p in padded_params.items():  # same loss normalisation: the same step
        torch.testing.assert_close(packed_params[name], p, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("make_model", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_packed_losses_with_a_kv_cache_enabled(tmp_path, make_model):
    """TrainingArguments(use_cache=True) sets config.use_cache: transformers then builds a key/value
    cache in the forward and no longer finds the packed documents from position_ids (attention
    crosses them); compute_loss turns the cache off for packed batches."""
    torch.manual_seed(0)
    model = make_model()
    packed_acc, _ = _one_step(tmp_path / "packed", copy.deepcopy(model), Flatten(), False, use_cache=True)
    padded_acc, _ = _one_step(tmp_path / "padded", copy.deepcopy(model), _pad_collate, False, use_cache=True)
    torch.testing.assert_close(packed_acc, padded_acc, rtol=1e-5, atol=1e-5)


@MODELS
def test_plain_concatenation_lets_attention_cross_documents(make_model):
    """What the README says: without position_ids a packed row is one long sequence (later
    documents attend to earlier ones); with DataCollatorWithFlattening's position_ids each
    document's logits are its own."""
    torch.manual_seed(0)
    model = make_model().eval()
    feats = _items((5, 7), (0, 1))
    b = Flatten()([{"input_ids": f["input_ids"]} for f in feats])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0] for f in feats])
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        plain = model(input_ids=b["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert float((plain[5:] - alone[5:]).abs().max()) > 1e-2


def test_numpy_packed_batches_are_understood_too():
    b = CartoCollator(Flatten(return_tensors="np"))(_items((3, 2), (4, 1)))
    assert b["sample_ids"].tolist() == [[4, 4, 4, 1, 1]]
