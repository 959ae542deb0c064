"""gdc_ext.integrations.datasets, and the whole loop: train -> report -> filtered dataset -> next run."""
import json

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

import gdc_ext  # noqa: E402
from gdc_ext import cli  # noqa: E402
from gdc_ext.integrations.datasets import add_sample_ids, drop_ids, flagged_ids, keep_ids, sample_ids  # noqa: E402

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "nov", "oscar", "papa"]


def _corpus(n=24, length=8, vocab=16, seed=0):
    """Token rows and their text (one word per token); the first four rows repeat one sequence."""
    g = np.random.default_rng(seed)
    tokens = g.integers(0, vocab, size=(n, length))
    tokens[1:4] = tokens[0]
    return datasets.Dataset.from_dict({"text": [" ".join(WORDS[t] for t in row) for row in tokens],
                                       "input_ids": tokens.tolist()})


# ------------------------------------------------------------------------------------------- units
def test_add_sample_ids_is_the_row_index_and_refuses_to_overwrite():
    ds = add_sample_ids(_corpus())
    assert ds["sample_ids"][:] == list(range(24)) and ds.features["sample_ids"].dtype == "int64"
    with pytest.raises(ValueError, match="already has a column 'sample_ids'.*replace=True.*keep_old_as"):
        add_sample_ids(ds)
    part = ds.select([5, 2, 9])  # a view (indices mapping): the ids follow the rows
    again = add_sample_ids(part, keep_old_as="old_ids")
    assert again["sample_ids"][:] == [0, 1, 2] and again["old_ids"][:] == [5, 2, 9]
    assert add_sample_ids(part, replace=True).column_names == ["text", "input_ids", "sample_ids"]
    with pytest.raises(ValueError, match="keep_old_as='text' is already a column"):
        add_sample_ids(part, keep_old_as="text")
    with pytest.raises(ValueError, match="no column 'ids' to keep"):
        add_sample_ids(part, column="ids", keep_old_as="old")
    with pytest.raises(ValueError, match="DatasetDict"):
        add_sample_ids(datasets.DatasetDict({"train": _corpus()}))
    with pytest.raises(ValueError, match="must be a datasets.Dataset"):
        add_sample_ids([{"text": "a"}])


def test_keep_and_drop_by_ids():
    ds = add_sample_ids(_corpus()).select(range(23, -1, -1))  # reversed rows: ids are not positions
    flagged = torch.tensor([3, 17, 0])
    dropped = drop_ids(ds, flagged)
    assert sample_ids(dropped).tolist() == [i for i in range(23, -1, -1) if i not in (0, 3, 17)]
    kept = keep_ids(ds, np.array([3, 17, 0]))
    assert sample_ids(kept).tolist() == [17, 3, 0]  # ds's order
    assert kept["text"] == [ds["text"][23 - i] for i in (17, 3, 0)]
    assert len(drop_ids(ds, [])) == 24 and len(keep_ids(ds, [])) == 0
    with pytest.raises(ValueError, match="1 of the 2 ids are not in ds's 'sample_ids' column .first: 99."):
        drop_ids(ds, [3, 99])
    assert len(drop_ids(ds, [3, 99], strict=False)) == 23
    with pytest.raises(ValueError, match="ids must be a 1-D sequence of int"):
        drop_ids(ds, [1.5])
    with pytest.raises(ValueError, match="no column 'sample_ids'.*add_sample_ids"):
        drop_ids(_corpus(), [1])
    with pytest.raises(ValueError, match="holds string, not integer"):
        drop_ids(ds, [1], column="text")


@pytest.mark.parametrize("view", ["plain", "selected", "formatted"])
def test_drop_ids_equals_select(tmp_path, view):
    """The Arrow-built indices mapping gives what ds.select gives: rows, format, saved copy."""
    ds = add_sample_ids(_corpus())
    if view in ("selected", "formatted"):
        ds = ds.select([7, 3, 20, 0, 11, 5, 19, 2])
    if view == "formatted":
        ds = ds.with_format("numpy", columns=["sample_ids", "input_ids"])
    flagged = [3, 19, 0]
    positions = [i for i, sid in enumerate(sample_ids(ds)) if sid not in flagged]
    got, want = drop_ids(ds, flagged), ds.select(positions)
    assert got.format == want.format and len(got) == len(want) and got.column_names == want.column_names
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    got.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert list(back.with_format(None)["sample_ids"]) == list(want.with_format(None)["sample_ids"])
    assert drop_ids(ds, [3])._fingerprint != drop_ids(ds, [5])._fingerprint != ds._fingerprint


def test_filtering_is_vectorised(monkeypatch):
    """200k rows, 50k ids: one Arrow column and NumPy, never a per-row Python callback."""
    n = 200_000
    ds = add_sample_ids(datasets.Dataset.from_dict({"x": np.zeros(n, dtype=np.int8)}))
    for name in ("filter", "map", "select"):  # select: datasets turns the positions into a Python list
        monkeypatch.setattr(datasets.Dataset, name, lambda *a, **k: pytest.fail("a per-row pass"))
    flagged = np.random.default_rng(0).choice(n, size=50_000, replace=False)
    out = drop_ids(ds, flagged)
    assert len(out) == n - 50_000
    ids = sample_ids(out)
    assert not np.isin(ids, flagged).any() and np.all(np.diff(ids) > 0)


def test_flagged_ids_by_fraction_and_quadrant():
    state = gdc_ext.CartoState(20, burn_in=1, eps=1.0)
    for e in range(3):
        state.record(torch.linspace(0.1, 4.0, 20) / (e + 1), torch.arange(20))
        state.end_epoch()
    s = state.scores()
    f = flagged_ids(s, by="last", fraction=0.25)
    assert f.tolist() == list(range(5))  # the 5 lowest last losses
    assert sorted(set(range(20)) - set(gdc_ext.prune(s, 0.25, by="last").tolist())) == f.tolist()
    q = s.quadrants(0.75, 0.75, by="last")
    assert flagged_ids(s, by="last", quadrant=2).tolist() == np.flatnonzero(q.codes.numpy() == 2).tolist()
    with pytest.raises(ValueError, match="exactly one of fraction= or quadrant="):
        flagged_ids(s, fraction=0.1, quadrant=2)
    with pytest.raises(ValueError, match="quadrant must be one of"):
        flagged_ids(s, quadrant=7)


# ------------------------------------------------------------------------------------------- the loop
transformers = pytest.importorskip("transformers")


def _collate(features):
    x = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": x, "labels": x.clone()}


def _train(ds, state, out_dir, epochs):
    from gdc_ext.integrations.hf import CartoCollator, CartoTrainer

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                 eos_token_id=0)
    args = transformers.TrainingArguments(output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = CartoTrainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=ds,
                           data_collator=CartoCollator(_collate), state=state)
    trainer.train()
    return trainer


def test_train_report_filter_next_run(tmp_path, capsys):
    # 1. the corpus with sample ids, saved as the run reads it
    ds = add_sample_ids(_corpus())
    ds.save_to_disk(str(tmp_path / "corpus"))
    ds = datasets.load_from_disk(str(tmp_path / "corpus"))
    # 2. train; the state is saved beside the run
    state = gdc_ext.CartoState(len(ds), burn_in=2, eps=1.0)
    _train(ds, state, tmp_path / "run1", epochs=4)
    assert state.epochs_done == 4 and state.scores().observed.tolist() == [4] * len(ds)
    state.save(tmp_path / "carto.safetensors")
    capsys.readouterr()  # the Trainer's own prints
    # 3. the report: the flagged samples with their text (terminal, JSON and HTML)
    assert cli.main(["report", str(tmp_path / "carto.safetensors"), "--dataset", str(tmp_path / "corpus"),
                     "--json", "--top", "6"]) == 0
    top = json.loads(capsys.readouterr().out)["top_candidates"]
    assert [r["text"] for r in top] == [ds[r["id"]]["text"] for r in top]
    assert cli.main(["report", str(tmp_path / "carto.safetensors"), "--dataset", str(tmp_path / "corpus"),
                     "--id-field", "sample_ids", "--html", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert all(ds[r["id"]]["text"] in page for r in top)
    # 4. the filtered dataset for the next run: the top 25 % by the default score removed
    scores = gdc_ext.CartoState.load(tmp_path / "carto.safetensors").scores()
    flagged = flagged_ids(scores, by=gdc_ext.DEFAULT_SCORE, fraction=0.25)
    assert len(flagged) == 6 and {r["id"] for r in top} == set(flagged.tolist())  # the report's top 6
    drop_ids(ds, flagged).save_to_disk(str(tmp_path / "corpus-clean"))
    clean = datasets.load_from_disk(str(tmp_path / "corpus-clean"))
    assert len(clean) == 18 and sorted(set(range(24)) - set(clean["sample_ids"])) == sorted(flagged.tolist())
    assert clean["text"] == [ds[i]["text"] for i in clean["sample_ids"]]
    # 5. the next run: fresh ids 0..17, the previous run's kept beside them
    nxt = add_sample_ids(clean, keep_old_as="run1_sample_ids")
    assert nxt["sample_ids"][:] == list(range(18)) and nxt["run1_sample_ids"][:] == clean["sample_ids"][:]
    state2 = gdc_ext.CartoState(len(nxt), burn_in=1, eps=1.0)
    _train(nxt, state2, tmp_path / "run2", epochs=2)
    assert state2.scores().observed.tolist() == [2] * 18
