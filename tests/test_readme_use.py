"""The README's "Use" code runs as written: its python blocks are extracted and executed with
small stand-ins for `dataset`, `loader`, `model`, `opt`, `V`, `epochs` (and the held-out set),
with per-sequence [B] ids and with per-token [B, L] ids (flattened target)."""
import re
import textwrap
from pathlib import Path

import torch
from torch import nn

import gdc_ext
from gdc_ext.layout import ACC_COUNT

README = Path(__file__).resolve().parents[1] / "README.md"
V, N, L, B = 13, 6, 8, 3


def use_blocks() -> list[str]:
    """The ```python blocks of the "## Use" section, dedented (one sits in a bullet list)."""
    text = README.read_text()
    section = text.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^[ \t]*```", section, flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in blocks]


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def _namespace(per_token: bool) -> dict:
    torch.manual_seed(0)
    data = torch.randint(0, V, (N, L + 1))
    order = [[0, 1, 2], [3, 4, 5]]

    def loader():
        for rows in order:
            ids = torch.tensor(rows)
            yield data[rows], (ids[:, None].expand(len(rows), L) if per_token else ids)

    class Loader:
        def __iter__(self):
            return loader()

    model = TinyLM()
    return dict(dataset=list(data), loader=Loader(), model=model, V=V, epochs=3,
                opt=torch.optim.SGD(model.parameters(), lr=0.5), heldout_set=list(data[:4]),
                heldout_loader=[(data[:4], torch.arange(4)[:, None].expand(4, L))])


def _run(path, monkeypatch, per_token: bool) -> dict:
    """Executes the README's Use blocks in ``path`` (where state.save writes); their namespace."""
    path.mkdir()
    monkeypatch.chdir(path)
    ns = _namespace(per_token)
    for code in use_blocks():
        exec(compile(code, str(README), "exec"), ns)
    return ns


def test_readme_has_the_use_blocks():
    blocks = use_blocks()
    assert len(blocks) >= 2
    assert "CartoLoss(state=state)" in blocks[0] and "record=True" in blocks[1]


def test_readme_use_runs_with_per_sequence_and_per_token_ids(tmp_path, monkeypatch):
    seq = _run(tmp_path / "seq", monkeypatch, per_token=False)
    tok = _run(tmp_path / "tok", monkeypatch, per_token=True)
    for name, ns in (("seq", seq), ("tok", tok)):
        assert isinstance(ns["loss_fn"], gdc_ext.CartoLoss)
        assert ns["scores"].observed.all()
        assert (tmp_path / name / "carto.safetensors").exists()
        assert ns["heldout"].scores().observed.tolist() == [True] * 4
        assert ns["loss_fn"].sample_weight is not None
    # [B, L] per-token ids equal to each row's id record exactly what [B] per-sequence ids record
    assert torch.equal(seq["state"].acc, tok["state"].acc)
    assert torch.equal(seq["scores"].difficulty, tok["scores"].difficulty)
    loaded = gdc_ext.CartoState.load(tmp_path / "tok" / "carto.safetensors")
    assert torch.equal(loaded.scores().difficulty, tok["scores"].difficulty)


def test_per_token_ids_of_any_shape_with_one_id_per_row():
    """[B, L] ids with a flattened [B*L] target: row b*L + l belongs to ids[b, l] (packed rows)."""
    torch.manual_seed(1)
    x = torch.randn(B * L, V, requires_grad=True)
    t = torch.randint(0, V, (B * L,))
    ids = torch.tensor([[0] * 5 + [1] * 3, [2] * 8, [3] * 2 + [4] * 6])  # packed: two samples in a row
    state = gdc_ext.CartoState(5, burn_in=1)
    gdc_ext.CartoLoss(state=state)(x, t, ids)
    assert state.acc[:, ACC_COUNT].tolist() == [5, 3, 8, 2, 6]
    assert torch.equal(gdc_ext.expand_sample_ids(ids, t, B * L), ids.reshape(-1))
    # per-sequence [B] still means B equal groups of rows
    assert torch.equal(gdc_ext.expand_sample_ids(torch.tensor([7, 8, 9]), t, B * L),
                       torch.tensor([7, 8, 9]).repeat_interleave(L))


def test_sample_ids_of_the_wrong_size_name_both_forms():
    t = torch.zeros(B * L, dtype=torch.long)
    for bad in (torch.zeros(B, L + 1, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                torch.zeros(B, 1, dtype=torch.long)):
        try:
            gdc_ext.expand_sample_ids(bad, t, B * L)
        except gdc_ext.ArgumentError as e:
            assert "one id per token" in str(e) and "one id per sequence" in str(e) and str(tuple(bad.shape)) in str(e)
        else:
            raise AssertionError(f"accepted sample_ids of shape {tuple(bad.shape)}")
