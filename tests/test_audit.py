"""The audit kit (gdc_ext.audit): plant canaries, report AUROC / recall per score and the exposure
and greedy extraction of each secret, inserted vs held-out twins."""
import copy
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import gdc_ext
from gdc_ext import audit

V = 50


def _data(n=200, L=16, seed=0):
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def _contains(rows, seq) -> bool:
    """Whether any row of the 2-D array holds ``seq`` as a contiguous run."""
    s = np.asarray(seq)
    win = np.lib.stride_tricks.sliding_window_view(np.asarray(rows), len(s), axis=1)
    return bool((win == s).all(-1).any())


# ----------------------------------------------------------------------------------------- plant
def test_plant_inserts_each_canary_r_times_never_the_twins_and_is_seeded():
    data = _data()
    c = audit.plant(data, vocab_size=V, template_len=6, seed=3)
    assert isinstance(c.data, torch.Tensor) and c.data.dtype == data.dtype
    assert c.num_original == 200 and c.num_rows == 200 + 4 * (1 + 2 + 4 + 8) == c.data.shape[0]
    assert c.inserted_ids == list(range(200, c.num_rows))
    assert torch.equal(c.data[:200], data)  # the original rows keep their ids
    rows = c.data.numpy()
    assert len(c.canaries) == len(c.twins) == 16
    assert sorted(i for k in c.canaries for i in k.ids) == c.inserted_ids
    for k, t in zip(c.canaries, c.twins):
        assert len(k.row) == 16 and k.row[:len(k.prefix) + 6] == k.prefix + k.secret
        assert len(k.prefix) == 6 and len(k.secret) == 6 and set(k.secret) <= set(c.alphabet)
        assert (rows == np.array(k.row)).all(1).sum() == k.reps == len(k.ids)  # exactly r copies ...
        assert all((rows[i] == np.array(k.row)).all() for i in k.ids)  # ... at its ids
        assert not _contains(rows[:200], k.prefix + k.secret)  # nowhere else
        assert t.prefix == k.prefix and t.secret != k.secret and t.reps == k.reps
        assert not _contains(rows, t.prefix + t.secret)  # the twin is never inserted
    secrets = [tuple(k.secret) for k in c.canaries] + [tuple(t.secret) for t in c.twins]
    assert len(set(secrets)) == 32
    assert [k.reps for k in c.canaries] == [1] * 4 + [2] * 4 + [4] * 4 + [8] * 4
    # the default alphabet: 10 distinct ids of the data's tokens
    assert len(c.alphabet) == 10 == len(set(c.alphabet)) and set(c.alphabet) <= set(data.unique().tolist())
    # seeded: the same arguments give the same canaries; another seed others
    again = audit.plant(data, vocab_size=V, template_len=6, seed=3)
    assert torch.equal(again.data, c.data) and again.to_dict() == c.to_dict()
    other = audit.plant(data, vocab_size=V, template_len=6, seed=4)
    assert other.to_dict()["canaries"] != c.to_dict()["canaries"]


def test_plant_numpy_list_template_alphabet_and_pad_filler():
    data = _data(30, 12).numpy().astype(np.int32)
    c = audit.plant(data, vocab_size=V, num_canaries_per_rep=2, reps=(1, 3), secret_len=2, alphabet=[7, 8, 9],
                    template=[1, 2, 3], filler=0, exclude=[0], seed=1)
    assert isinstance(c.data, np.ndarray) and c.data.dtype == np.int32 and c.data.shape == (30 + 2 * 4, 12)
    assert c.alphabet == [7, 8, 9]
    for k in c.canaries:
        assert k.prefix == [1, 2, 3] and k.row == [1, 2, 3] + k.secret + [0] * 7
    few = audit.plant(data, vocab_size=V, num_canaries_per_rep=1, reps=(1,), secret_len=2, template_len=3,
                      alphabet_size=4, scan_rows=2, seed=1)  # tokens from 2 seeded rows
    assert set(few.alphabet) <= set(np.unique(data)) and few.data.shape == (31, 12)
    # a list of 1-D sequences of different lengths: canary rows of the median length, same type
    seqs = [torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (10, 14, 20, 9, 30)]
    c = audit.plant(seqs, vocab_size=V, num_canaries_per_rep=1, reps=(2,), secret_len=3, template_len=4, seed=0)
    assert isinstance(c.data, list) and len(c.data) == 7 and c.length == 14
    assert all(isinstance(r, torch.Tensor) and r.dtype == seqs[0].dtype for r in c.data)
    assert c.data[5].tolist() == c.data[6].tolist() == c.canaries[0].row and c.canaries[0].ids == [5, 6]
    assert all(a is b for a, b in zip(c.data[:5], seqs))
    lists = audit.plant([r.tolist() for r in seqs], vocab_size=V, num_canaries_per_rep=1, reps=(2,), secret_len=3,
                        template_len=4, seed=0)
    assert lists.data[5] == c.canaries[0].row and lists.to_dict() == c.to_dict()


class _FakeDataset:
    """The part of datasets.Dataset that plant uses: column_names, len, row access, add_item."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def add_item(self, item):
        assert list(item) == self.column_names
        return _FakeDataset(self.rows + [item])


def _check_dataset_rows(new, c):
    for k in c.canaries:
        for i in k.ids:
            item = new[i]
            assert list(item["input_ids"]) == k.row and int(item["sample_ids"]) == i
            cut = len(k.prefix) + len(k.secret)
            assert list(item["attention_mask"]) == [1] * cut + [0] * (len(k.row) - cut)
            assert list(item["labels"]) == k.row[:cut] + [-100] * (len(k.row) - cut)


def test_plant_dataset_like_fills_the_known_columns_and_asks_for_the_others():
    toks = _data(20, 10).tolist()
    rows = [{"input_ids": t, "attention_mask": [1] * 10, "labels": t, "sample_ids": i} for i, t in enumerate(toks)]
    kw = dict(vocab_size=V, num_canaries_per_rep=1, reps=(1, 2), secret_len=3, template_len=3, filler=0)
    c = audit.plant(_FakeDataset(rows), **kw)
    assert isinstance(c.data, _FakeDataset) and len(c.data) == 23 and c.length == 10
    _check_dataset_rows(c.data, c)
    rows = [dict(r, source="web") for r in rows]
    with pytest.raises(ValueError, match=r"columns \['source'\] need a value.*columns="):
        audit.plant(_FakeDataset(rows), **kw)
    c = audit.plant(_FakeDataset(rows), columns={"source": "canary"}, **kw)
    assert [c.data[i]["source"] for i in c.inserted_ids] == ["canary"] * 3
    with pytest.raises(ValueError, match="'input_ids' column"):
        audit.plant(_FakeDataset([{"text": "a"}]), vocab_size=V)


def test_plant_hf_dataset():
    datasets = pytest.importorskip("datasets")
    toks = _data(20, 10).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": toks, "attention_mask": [[1] * 10] * 20, "labels": toks,
                                     "sample_ids": list(range(20))})
    c = audit.plant(ds, vocab_size=V, num_canaries_per_rep=1, reps=(1, 2), secret_len=3, template_len=3, filler=0)
    assert isinstance(c.data, datasets.Dataset) and c.data.num_rows == 23 and len(ds) == 20
    _check_dataset_rows(c.data, c)
    assert c.data[:20]["input_ids"] == toks


def test_plant_rejects_bad_arguments_before_changing_anything():
    data = _data(10, 12)
    before = data.clone()
    bad = [
        (dict(vocab_size=10), "token ids must lie in"),
        (dict(vocab_size=V, template_len=10), "does not fit"),
        (dict(vocab_size=V, reps=(1, 1)), "reps must be"),
        (dict(vocab_size=V, reps=()), "reps must be"),
        (dict(vocab_size=V, reps=(0,)), "reps must be"),
        (dict(vocab_size=V, alphabet=[3, 4], secret_len=2), "distinct secrets"),
        (dict(vocab_size=V, alphabet=[3]), "at least 2"),
        (dict(vocab_size=V, alphabet=[3, V]), "alphabet: token ids must lie"),
        (dict(vocab_size=V, template=[[1, 2]] * 3), "one per canary"),
        (dict(vocab_size=V, filler="pad"), "filler must be"),
        (dict(vocab_size=V, length=11), "length must be the rows' length"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(vocab_size=V, seed=-1), "seed"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            audit.plant(data, **kw)
    with pytest.raises(ValueError, match="2-D"):
        audit.plant(data[0], vocab_size=V)
    with pytest.raises(ValueError, match="integer token ids"):
        audit.plant(data.float(), vocab_size=V)
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        audit.plant({"input_ids": data}, vocab_size=V)
    assert torch.equal(data, before)


def test_canaries_save_load_round_trip(tmp_path):
    c = audit.plant(_data(40, 16), vocab_size=V, num_canaries_per_rep=2, template_len=6, seed=5)
    path = tmp_path / "canaries.json"
    c.save(path)
    text = path.read_text()
    assert json.loads(text)["format"] == "gdc_ext.audit.canaries"
    back = audit.Canaries.load(path)
    assert back.data is None and back.to_dict() == c.to_dict()
    bad = json.loads(text)
    bad["inserted_ids"] = bad["inserted_ids"][:-1]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="inserted_ids"):
        audit.Canaries.load(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a gdc_ext.audit canaries record"):
        audit.Canaries.load(path)


def test_audit_is_reachable_from_the_package():
    assert gdc_ext.audit is audit


# ------------------------------------------------------------------------------- AUROC, recall
def test_auroc_hand_computed_cases():
    assert audit.auroc([3, 4], [1, 2]) == 1.0  # perfect
    assert audit.auroc([1, 2], [3, 4]) == 0.0  # reversed
    assert audit.auroc([1, 1], [1, 1, 1]) == 0.5  # all tied: each pair counts half
    # pairs (3,2) (3,1) (1,2) (1,1): 1 + 1 + 0 + 1/2 over 4
    assert audit.auroc([3, 1], [2, 1]) == 2.5 / 4
    assert audit.auroc([float("nan")], [-1e300]) == 0.0  # unscored ranks below every number
    assert audit.auroc([float("nan")], [float("nan")]) == 0.5
    assert math.isnan(audit.auroc([], [1.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_auroc_is_the_pairwise_probability_with_ties_half(pos, neg):
    pairs = [1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]
    assert audit.auroc(pos, neg) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_recall_at_hand_computed_cases():
    s = [5.0, 4.0, 4.0, 4.0, 1.0]
    # top round(0.4 * 5) = 2: the 5 (a negative) and one of three tied 4s, two of them positive
    assert audit.recall_at(s, [1, 2], 0.4) == pytest.approx((2 * 1 / 3) / 2)
    assert audit.recall_at(s, [0, 4], 0.4) == 0.5
    assert audit.recall_at([9, 8, 1, 0], [0, 1], 0.5) == 1.0  # perfect
    assert audit.recall_at([0, 1, 8, 9], [0, 1], 0.5) == 0.0  # reversed
    assert audit.recall_at([0, 1, 8, 9], [0, 1], 0.1) == 0.0  # round(0.4) = 0 rows selected
    assert audit.recall_at([float("nan"), 0.0], [0], 0.5) == 0.0  # unscored last
    assert audit.recall_at([1, 1, 1, 1], [0], 0.5) == 0.5  # all tied: in expectation
    assert math.isnan(audit.recall_at([1, 2], [], 0.5))
    with pytest.raises(ValueError, match="fraction"):
        audit.recall_at([1, 2], [0], 1.5)
    with pytest.raises(ValueError, match="positives"):
        audit.recall_at([1, 2], [2], 0.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2, 2), min_size=1, max_size=6), st.floats(0, 1), st.data())
def test_recall_at_is_the_expectation_over_tie_orders(scores, fraction, data):
    pos = data.draw(st.lists(st.integers(0, len(scores) - 1), min_size=1, unique=True))
    k = int(round(fraction * len(scores)))
    # brute force: every order of the ids is as likely; sort by score (stable), take the top k
    hits = []
    for perm in itertools.permutations(range(len(scores))):
        order = sorted(perm, key=lambda i: -scores[i])
        hits.append(len(set(order[:k]) & set(pos)) / len(pos))
    assert audit.recall_at(scores, pos, fraction) == pytest.approx(np.mean(hits), abs=1e-12)


# ------------------------------------------------------------------------------------- exposure
class _Favour:
    """A fake LM: after a known prefix (the first P tokens), the logits at the positions that
    predict the secret favour it by ``margin`` (position-wise, whatever came before); 0 elsewhere
    (uniform)."""

    def __init__(self, table, P, margin=5.0):
        self.table, self.P, self.margin = table, P, margin

    def __call__(self, x):
        n, T = x.shape
        out = torch.zeros(n, T, V)
        for i in range(n):
            sec = self.table.get(tuple(x[i, :self.P].tolist()))
            for j, tok in enumerate(sec or []):
                if self.P - 1 + j < T:
                    out[i, self.P - 1 + j, tok] = self.margin
        return out


def _uniform(x):
    return torch.zeros(*x.shape, V)


def _exact_rank_by_matches(A, S, m):
    """Rank (ties half) of a secret matching the favoured one at m of S positions, under _Favour:
    log P grows with the number of matches, #{c: matches = j} = C(S, j) (A - 1) ** (S - j)."""
    count = [math.comb(S, j) * (A - 1) ** (S - j) for j in range(S + 1)]
    return 1 + sum(count[m + 1:]) + 0.5 * (count[m] - 1)


def test_exposure_exact_rank_on_a_model_that_favours_the_secret():
    prefix, secret, alphabet = [11, 12, 13], [3, 5, 7], [3, 5, 7, 9]
    model = _Favour({tuple(prefix): secret}, 3)
    e = audit.exposure(model, prefix, secret, alphabet)
    assert e["method"] == "exact" and e["space"] == 64 and e["rank"] == 1.0
    assert e["exposure"] == pytest.approx(math.log2(64))
    for other, m in (([3, 5, 9], 2), ([9, 5, 3], 1), ([9, 9, 9], 0)):
        e = audit.exposure(model, prefix, other, alphabet)
        rank = _exact_rank_by_matches(4, 3, m)
        assert e["rank"] == rank and e["exposure"] == pytest.approx(6 - math.log2(rank))
    # a uniform model: every secret ties, rank (|R| + 1) / 2, about 1 bit
    e = audit.exposure(_uniform, prefix, secret, alphabet)
    assert e["rank"] == 32.5 and e["exposure"] == pytest.approx(6 - math.log2(32.5))
    with pytest.raises(ValueError, match="alphabet"):
        audit.exposure(_uniform, prefix, [1, 2, 3], alphabet)


def test_exposure_sampled_estimate_and_its_cap():
    prefix, secret, alphabet = [11, 12], [3, 5, 7, 9], [3, 5, 7, 9, 10]
    model = _Favour({tuple(prefix): secret}, 2)
    space = 5 ** 4
    e = audit.exposure(model, prefix, secret, alphabet, max_exact=100, sample_size=50)
    assert e["method"] == "sampled" and e["capped"] and e["space"] == space
    assert e["exposure"] == pytest.approx(math.log2(space) - math.log2(1 + (space - 1) / 50))  # the cap
    e = audit.exposure(_uniform, prefix, secret, alphabet, max_exact=100, sample_size=50)
    assert not e["capped"] and e["rank"] == pytest.approx(1 + (space - 1) / 2)  # every sample ties
    # the estimate follows the exact rank of a partly-matching secret
    exact = audit.exposure(model, prefix, [3, 5, 10, 10], alphabet)
    est = audit.exposure(model, prefix, [3, 5, 10, 10], alphabet, max_exact=100, sample_size=4000,
                         rng=np.random.default_rng(1))
    assert exact["rank"] == _exact_rank_by_matches(5, 4, 2)
    assert est["exposure"] == pytest.approx(exact["exposure"], abs=0.15)


def test_greedy_extraction_on_fake_models():
    table = {(1, 2): [3, 4, 5], (6, 7): [8, 9, 10, 11]}
    model = _Favour(table, 2)
    got = audit.greedy_extract(model, [[1, 2], [6, 7], [1, 9, 9]], 3)
    assert got == [[3, 4, 5], [8, 9, 10], [0, 0, 0]]  # unknown prefix: uniform, argmax = first id
    assert audit.greedy_extract(_uniform, [[1, 2]], 2) == [[0, 0]]


# --------------------------------------------------------------------------------------- report
def _hand_scores(c, rng):
    """Mapping scores: 'oracle' ranks every inserted row first, 'reversed' last, 'coin' random."""
    ins = np.zeros(c.num_rows)
    ins[c.inserted_ids] = 1
    return {"oracle": ins + rng.random(c.num_rows) * 0.1, "reversed": -ins, "coin": rng.random(c.num_rows)}


def test_report_with_mapping_scores_and_a_fake_model(tmp_path):
    c = audit.plant(_data(100, 12), vocab_size=V, num_canaries_per_rep=2, reps=(1, 4), secret_len=3,
                    alphabet=[20, 21, 22, 23], template_len=4, seed=2)
    rep = audit.report(c, _hand_scores(c, np.random.default_rng(0)), model=_Favour(
        {tuple(k.prefix): k.secret for k in c.canaries}, 4))
    assert rep.scores["oracle"]["auroc"] == 1.0 and rep.scores["reversed"]["auroc"] == 0.0
    assert all(v["auroc"] == 1.0 for v in rep.scores["oracle"]["by_reps"].values())
    # 10 inserted rows of 110: the top 10% (11 rows) holds all of them, the top 1% one row
    assert rep.scores["oracle"]["recall"] == {"1%": 0.1, "5%": pytest.approx(6 / 10), "10%": 1.0}
    by_r = rep.exposure_by_reps()
    for r in (1, 4):
        assert by_r[r]["inserted"] == {"n": 2, "mean_exposure": pytest.approx(6.0), "min_exposure": pytest.approx(6.0),
                                       "max_exposure": pytest.approx(6.0), "extracted": 1.0}
        assert by_r[r]["twins"]["extracted"] == 0.0 and by_r[r]["twins"]["max_exposure"] < 6.0
    assert rep.exposure_method == {"method": "exact", "space": 64, "max_bits": 6.0, "sample_size": None, "cap_bits": 6.0}
    twins = [s for s in rep.secrets if s["kind"] == "twin"]
    for s in twins:  # exposure of a twin = the exact rank by its matches with its canary's secret
        m = sum(a == b for a, b in zip(c.twins[s["canary"]].secret, c.canaries[s["canary"]].secret))
        assert s["rank"] == _exact_rank_by_matches(4, 3, m)
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    md = rep.to_markdown()
    assert "| oracle | 1.000 | 0.100 | 0.600 | 1.000 |" in md and "| 4 | 2 | 6.0 (6.0-6.0)" in md and str(rep) == md
    # from the saved record: the same numbers
    c.save(tmp_path / "c.json")
    again = audit.report(str(tmp_path / "c.json"), _hand_scores(c, np.random.default_rng(0)))
    assert again.scores == rep.scores and again.secrets == []


def test_report_rejects_bad_arguments():
    c = audit.plant(_data(30, 12), vocab_size=V, num_canaries_per_rep=1, reps=(1,), secret_len=2, template_len=3)
    good = {"s": np.zeros(c.num_rows)}
    with pytest.raises(ValueError, match="num_rows = 31"):
        audit.report(c, {"s": np.zeros(30)})
    with pytest.raises(ValueError, match="scores must be a gdc_ext.Scores"):
        audit.report(c, [0.0] * 31)
    with pytest.raises(ValueError, match="canaries must be"):
        audit.report({"canaries": []}, good)
    with pytest.raises(ValueError, match="exactly one"):
        audit.report(c, good, model=_uniform, forward=_uniform)
    with pytest.raises(ValueError, match=r"logits \[n, T, V\]"):
        audit.report(c, good, model=lambda x: torch.zeros(x.shape[0], V))
    with pytest.raises(ValueError, match="fractions"):
        audit.report(c, good, fractions=(0.0,))


# -------------------------------------------------------------------------------- end to end
class _GRULM(nn.Module):
    """A small recurrent LM: memorizes repeated rows within a few epochs on the CPU."""

    def __init__(self, vocab=V, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def test_plant_train_report_end_to_end():
    """Plant into 200 random rows, train with CartoLoss, report: the repeated canaries are found by
    the last loss and the gain (far above the random baseline) and leak far more than their twins."""
    c = audit.plant(_data(200, 16), vocab_size=V, secret_len=3, template_len=6, seed=0)
    X, N = c.data, c.num_rows
    torch.manual_seed(0)
    model = _GRULM()
    initial = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = gdc_ext.CartoState(N, burn_in=2, eps=1.0)
    loss_fn = gdc_ext.CartoLoss(state=state)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        perm = torch.randperm(N, generator=g)
        for s in range(0, N, 64):
            ids = perm[s:s + 64]
            logits = model(X[ids, :-1])
            loss = loss_fn(logits.reshape(-1, V), X[ids, 1:].reshape(-1), ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
        state.end_epoch()
    # the initial model as the counterfactual reference (it trained on nothing)
    ref = gdc_ext.reference_losses(initial, [(X[s:s + 64, :-1], X[s:s + 64, 1:], torch.arange(s, min(s + 64, N)))
                                             for s in range(0, N, 64)], N, progress=False)
    rep = audit.report(c, state.scores(), reference=ref, model=model)
    # every score the state can give (the cartography group's need cartography=True)
    assert list(rep.scores) == list(gdc_ext.cartography.available_scores(state.scores(), ref)) and rep.skipped == {}
    assert set(gdc_ext.SCORES) - set(rep.scores) == set(gdc_ext.cartography.NEEDS_GROUP)
    for v in rep.scores.values():
        cells = [v["auroc"], *v["recall"].values()] + [x for b in v["by_reps"].values()
                                                        for x in (b["auroc"], *b["recall"].values())]
        assert all(0.0 <= x <= 1.0 for x in cells)
    r8 = {name: v["by_reps"][8] for name, v in rep.scores.items()}
    assert r8["last"]["auroc"] > 0.9 and r8["gain"]["auroc"] > 0.9 and r8["relative_excess"]["auroc"] > 0.9
    assert r8["last"]["auroc"] > r8["random"]["auroc"] + 0.2
    assert r8["last"]["recall"]["10%"] > r8["random"]["recall"]["10%"] + 0.3
    by_r = rep.exposure_by_reps()
    assert by_r[8]["inserted"]["mean_exposure"] > by_r[8]["twins"]["mean_exposure"] + 3.0
    assert by_r[8]["twins"]["extracted"] == 0.0
    assert model.training  # put back in training mode after the report's passes
    # without a reference the calibrated scores are skipped, and say why
    rep = audit.report(c, state.scores())
    assert set(rep.skipped) == {"excess", "relative_excess"} and "needs reference=" in rep.to_markdown()


def test_readme_audit_block_runs_as_written(tmp_path, monkeypatch):
    """The README's "Audit your own data" block, with stand-ins for tokens, V, model and train."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Audit your own data\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)

    def train(model, data, state):
        loss_fn = gdc_ext.CartoLoss(state=state)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(2):
            for s in range(0, len(data), 64):
                ids = torch.arange(s, min(s + 64, len(data)))
                loss = loss_fn(model(data[ids, :-1]).reshape(-1, V), data[ids, 1:].reshape(-1), ids)
                opt.zero_grad()
                loss.backward()
                opt.step()
            state.end_epoch()

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns = {"tokens": _data(40, 16), "V": V, "model": _GRULM(dim=8), "train": train, "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "canaries.json").exists() and isinstance(ns["rep"], audit.AuditReport)
    assert ns["rep"].exposure_method["method"] == "sampled" and len(ns["rep"].secrets) == 32
