"""Text beside the scores: `gdc report --dataset`, gdc_ext.texts, Scores.to_pandas / summary / repr."""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

import gdc_ext
from gdc_ext import cli, texts
from gdc_ext.cartography import available_scores, score_columns, score_values, top_k

N = 30


def _state(n=N, eps=(1.0, 2.0), extras=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = gdc_ext.CartoState(n, burn_in=2, eps=list(eps), extras=extras)
    level = torch.rand(n, generator=g) * 5
    for e in range(4):
        seen = torch.arange(n - 2) if e < 2 else torch.arange(n)  # the last two: never in burn-in (unscored)
        state.record((level / (1 + e * torch.rand(n, generator=g)) + 0.01)[seen], seen)
        state.end_epoch()
    return state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    state = _state()
    state.save(d / "carto.safetensors")
    rows = [f"document {i}: " + " ".join(["word"] * (i % 5 + 1)) + f"\tend {i}\n(second line)" for i in range(N)]
    rows[3] = "evil \x1b[2J\x1b[31mred\x07 text"  # control characters must not reach a terminal
    with open(d / "data.jsonl", "w") as fh:
        for i, t in enumerate(rows):
            fh.write(json.dumps({"text": t, "sid": 1000 + i}) + "\n")
            if i == 4:
                fh.write("\n")  # a blank line is not a row
    with open(d / "data.txt", "w") as fh:
        fh.write("".join(t.replace("\n", " ") + "\n" for t in rows))
    return d, str(d / "carto.safetensors"), state.scores(), rows


# --------------------------------------------------------------------------------------- Scores
def test_scores_repr_is_short():
    s = _state(n=5000).scores()
    r = repr(s)
    assert r.startswith("Scores(N=5000, epochs=4, burn_in=2, eps=(1.0, 2.0), scored=4998")
    assert "tensor" not in r and len(r) < 200  # the dataclass repr printed every tensor


def test_to_pandas_has_every_score_column():
    pd = pytest.importorskip("pandas")
    s = _state().scores()
    ref = np.linspace(1.0, 4.0, N)
    q = s.quadrants(0.5, 0.5, by="last")
    df = s.to_pandas(ref, quadrants=q)
    assert isinstance(df, pd.DataFrame) and len(df) == N and df.index.name == "sample_id"
    assert df.index.tolist() == list(range(N))
    np.testing.assert_array_equal(df["difficulty"], s.difficulty.numpy())
    np.testing.assert_array_equal(df["last_loss"], s.last_loss.numpy())
    np.testing.assert_array_equal(df["memorization"], s.memorization_at(1.0).numpy())
    np.testing.assert_array_equal(df["memorization@2.0"], s.memorization_at(2.0).numpy())
    np.testing.assert_array_equal(df["forgets@2.0"], s.forgets_at(2.0).numpy())
    for name in ("transitions", "observed", "min_loss", "loss_mean", "loss_std", "grad_energy"):
        np.testing.assert_array_equal(df[name], getattr(s, name).numpy())
    for by in available_scores(s, ref):  # every by= score, with the reference the calibrated ones too
        np.testing.assert_array_equal(df[f"score_{by}"], score_values(s, by, reference=ref).numpy())
    np.testing.assert_array_equal(df["reference"], ref)
    np.testing.assert_array_equal(df["quadrant"], q.codes.numpy())
    assert df["quadrant_name"].tolist()[-1] == "unscored" and df["quadrant_name"].dtype == "category"
    assert set(df["quadrant_name"].value_counts().items()) >= {(k, v) for k, v in q.counts().items() if v}
    plain = s.to_pandas()  # without a reference: no calibrated score, no quadrant
    assert "score_excess" not in plain and "score_relative_excess" not in plain and "quadrant" not in plain
    assert "score_last" in plain and "score_random" in plain
    lean = _state(eps=(1.0,), extras=False).scores().to_pandas()
    assert "memorization@2.0" not in lean and "loss_std" not in lean and "memorization" in lean


def test_to_pandas_rejects_bad_arguments():
    pytest.importorskip("pandas")
    s = _state().scores()
    with pytest.raises(ValueError, match="reference"):
        s.to_pandas(np.ones(N - 1))
    with pytest.raises(ValueError, match="quadrants"):
        s.to_pandas(quadrants=torch.zeros(N - 1, dtype=torch.int8))


def test_summary_gives_counts_and_quantiles():
    s = _state().scores()
    text = s.summary()
    assert f"N = {N} samples, 4 epochs (burn-in 2), eps = [1.0, 2.0]" in text
    assert f"scored (seen in a burn-in epoch): {N - 2}" in text and "unscored: 2" in text
    lines = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines()[3:]}
    assert set(score_columns(s)) == set(lines)
    d = s.difficulty.numpy()[:-2]  # the last two were first seen after burn-in: no difficulty
    want = [np.min(d), *np.quantile(d, [0.01, 0.1, 0.5, 0.9, 0.99]), np.max(d)]
    assert int(lines["difficulty"][0]) == N - 2 and int(lines["last_loss"][0]) == N
    np.testing.assert_allclose([float(v) for v in lines["difficulty"][1:]], want, rtol=1e-3)
    assert "score_relative_excess" in s.summary(np.full(N, 2.0))


def test_import_gdc_ext_stays_light():
    code = ("import sys, gdc_ext; bad = [m for m in ('pandas', 'datasets', 'pyarrow', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------- reading texts
@pytest.fixture(scope="module")
def formats(tmp_path_factory, run):
    """The same rows as a saved datasets folder, Parquet (several row groups), JSONL and text."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, _, _, rows = run
    out = tmp_path_factory.mktemp("formats")
    table = pa.table({"text": rows, "sid": np.arange(1000, 1000 + N)})
    pq.write_table(table, out / "data.parquet", row_group_size=4)
    datasets.Dataset.from_dict({"text": rows, "sid": list(range(1000, 1000 + N))}).save_to_disk(str(out / "ds"))
    return {"datasets": str(out / "ds"), "parquet": str(out / "data.parquet"), "jsonl": str(d / "data.jsonl"),
            "text": str(d / "data.txt")}


@pytest.mark.parametrize("kind", ["datasets", "parquet", "jsonl", "text"])
def test_read_texts_every_format(formats, run, kind):
    rows = run[3]
    path = formats[kind]
    assert texts.dataset_format(path) == kind
    ids = [7, 0, N - 1, 7, 3]
    got = texts.read_texts(path, ids, num_samples=N)
    want = [rows[i].replace("\n", " ") if kind == "text" else rows[i] for i in ids]
    assert got == want
    if kind != "text":  # by the id column: a missing id reads as None
        assert texts.read_texts(path, [1005, 999, 1000], id_field="sid") == [rows[5], None, rows[0]]
    with pytest.raises(ValueError, match=f"has {N} rows but the state has {N + 1} samples"):
        texts.read_texts(path, [0], num_samples=N + 1)


def test_read_texts_parquet_reads_only_the_row_groups_shown(formats, run, monkeypatch):
    import pyarrow.parquet as pq

    read = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        read.append((i, tuple(columns or ())))
        return orig(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    for name in ("read", "iter_batches"):  # never the whole file
        monkeypatch.setattr(pq.ParquetFile, name, lambda *a, **k: pytest.fail("read the whole file"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole file"))
    assert texts.read_texts(formats["parquet"], [9, 1, 2], num_samples=N) == [run[3][9], run[3][1], run[3][2]]
    assert sorted(read) == [(0, ("text",)), (2, ("text",))]  # rows 1, 2 in group 0, row 9 in group 2 (4 per group)
    read.clear()
    texts.read_texts(formats["parquet"], [1009], id_field="sid")
    assert [c for _, c in read].count(("sid",)) == (N + 3) // 4 and read[-1] == (2, ("text",))


@pytest.mark.parametrize("kind", ["datasets", "jsonl", "text"])
def test_read_texts_never_loads_the_data(tmp_path, kind):
    """The Python-side allocation while reading 3 rows of 8 MB of text stays far below its size."""
    n, size = 4000, 2000
    rows = [f"{i:06d}" + "x" * size for i in range(n)]
    if kind == "datasets":
        datasets = pytest.importorskip("datasets")
        path = str(tmp_path / "ds")
        datasets.Dataset.from_dict({"text": rows}).save_to_disk(path)
    elif kind == "jsonl":
        path = str(tmp_path / "d.jsonl")
        with open(path, "w") as fh:
            fh.writelines(json.dumps({"text": r}) + "\n" for r in rows)
    else:
        path = str(tmp_path / "d.txt")
        with open(path, "w") as fh:
            fh.writelines(r + "\n" for r in rows)
    del rows
    texts.read_texts(path, [5], num_samples=n)  # imports, caches
    tracemalloc.start()
    got = texts.read_texts(path, [17, 3999, 2], num_samples=n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [t[:6] for t in got] == ["000017", "003999", "000002"]
    assert peak < n * size / 8, peak


def test_read_texts_errors(tmp_path, formats):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="no column 'body' .text_field.; its columns: text, sid"):
        texts.read_texts(formats["parquet"], [0], text_field="body")
    with pytest.raises(ValueError, match="no column 'body'"):
        texts.read_texts(formats["datasets"], [0], text_field="body")
    with pytest.raises(ValueError, match="line 1: no field 'body'"):
        texts.read_texts(formats["jsonl"], [0], text_field="body")
    with pytest.raises(ValueError, match="text file .* id_field"):
        texts.read_texts(formats["text"], [0], id_field="sid")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 30\)"):
        texts.read_texts(formats["jsonl"], [30], num_samples=N)
    with pytest.raises(ValueError, match="cannot tell the format"):
        (tmp_path / "x.csv").write_text("a\n")
        texts.read_texts(str(tmp_path / "x.csv"), [0])
    with pytest.raises(ValueError, match="no file or folder"):
        texts.read_texts(str(tmp_path / "nope.jsonl"), [0])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict .* split"):
        texts.read_texts(str(tmp_path / "dd"), [0])
    (tmp_path / "dup.jsonl").write_text('{"text": "a", "sid": 1}\n{"text": "b", "sid": 1}\n')
    with pytest.raises(ValueError, match="two rows carry sample id 1"):
        texts.read_texts(str(tmp_path / "dup.jsonl"), [1], id_field="sid")
    datasets.Dataset.from_dict({"text": ["a", "b"], "sid": ["x", "y"]}).save_to_disk(str(tmp_path / "strids"))
    with pytest.raises(ValueError, match="holds string, not integer sample ids"):
        texts.read_texts(str(tmp_path / "strids"), [1], id_field="sid")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        texts.read_texts(str(tmp_path / "bad.jsonl"), [1])


def test_snippet_is_one_printable_line():
    assert texts.snippet("a\n\tb   c") == "a b c"
    assert texts.snippet("x" * 100, 10) == "xxxxxxx..."
    assert texts.snippet("red \x1b[31m!") == "red \\x1b[31m!"
    assert texts.snippet(None) == ""
    assert texts.clip("abc", 2) == "ab..." and texts.clip("ab", 2) == "ab"


# --------------------------------------------------------------------------------------- the CLI
def _expected_top(scores, k, by=gdc_ext.DEFAULT_SCORE):  # the CLI default
    score = score_values(scores, by).numpy()
    return [int(i) for i in top_k(score, k, scores.difficulty).numpy() if not np.isnan(score[i])]


@pytest.mark.parametrize("kind", ["jsonl", "text"])
def test_cli_report_shows_text_beside_every_score(run, capsys, kind):
    d, path, scores, rows = run
    data = d / ("data.jsonl" if kind == "jsonl" else "data.txt")
    assert cli.main(["report", path, "--dataset", str(data), "--top", "6"]) == 0
    out = capsys.readouterr().out
    top = _expected_top(scores, 6)
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("id"))
    for col in ("score", "d", "last", "gain", "m (forgets/transitions)", "quadrant", "text"):
        assert col in lines[head]
    table = lines[head + 1:head + 7]
    assert [int(ln.split()[0]) for ln in table] == top
    for ln, i in zip(table, top):
        assert texts.snippet(rows[i], 40)[:20] in ln  # the row's own text, on one line
        assert f"{scores.difficulty[i]:.3f}" in ln and f"{scores.last_loss[i]:.3f}" in ln
    assert "\x1b" not in out and "\x07" not in out


def test_cli_report_default_top_with_dataset_and_json(run, capsys):
    d, path, scores, rows = run
    assert cli.main(["report", path, "--dataset", str(d / "data.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    top = _expected_top(scores, 50)
    assert [r["id"] for r in out["top_candidates"]] == top  # 50 by default with --dataset: all scored here
    assert all(r["text"] == rows[r["id"]] for r in out["top_candidates"] + out["top_hotspots"])
    assert out["dataset"].endswith("data.jsonl") and out["text_field"] == "text"
    assert cli.main(["report", path, "--json"]) == 0  # without --dataset: 10, no text
    plain = json.loads(capsys.readouterr().out)
    assert len(plain["top_candidates"]) == 10 and "text" not in plain["top_candidates"][0]
    assert cli.main(["report", path, "--dataset", str(d / "data.jsonl"), "--id-field", "sid", "--json",
                     "--top-k", "3"]) == 0
    by_id = json.loads(capsys.readouterr().out)["top_candidates"]
    assert [r["text"] for r in by_id] == [None] * 3  # ids 0..29 are not in "sid" (1000..)


def test_cli_report_with_reference_shows_the_calibrated_scores(run, capsys, tmp_path):
    d, path, scores, rows = run
    ref = np.linspace(1.0, 5.0, N)
    np.save(tmp_path / "ref.npy", ref)
    assert cli.main(["report", path, "--dataset", str(d / "data.jsonl"), "--reference", str(tmp_path / "ref.npy"),
                     "--json", "--top", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    for r in out["top_candidates"]:
        assert r["excess"] == pytest.approx(ref[r["id"]] - float(scores.last_loss[r["id"]]))
        assert r["relative_excess"] == pytest.approx(1 - float(scores.last_loss[r["id"]]) / ref[r["id"]])


def test_cli_report_dataset_errors(run, capsys, tmp_path):
    d, path, scores, rows = run
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    assert cli.main(["report", path, "--dataset", str(short)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gdc report: error: --dataset:") and f"2 rows but the state has {N} samples" in err
    assert cli.main(["report", path, "--dataset", str(d / "data.jsonl"), "--text-field", "body"]) == 2
    assert "no field 'body'" in capsys.readouterr().err
    assert cli.main(["report", path, "--text-field", "body"]) == 2
    assert "need --dataset" in capsys.readouterr().err
    assert cli.main(["report", path, "--dataset", str(d / "data.jsonl"), "--id-field", "sid", "--top", "2"]) == 0
    assert "warning: no row of" in capsys.readouterr().err
    assert not os.path.exists(d / "report.html")
