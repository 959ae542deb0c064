"""The README's "Counterfactual references" block runs as written, with small stand-ins for the
data, the models and the batches, and gives what it says: a cross-fit reference where each half
is scored by the model that did not train on it."""
import re
import warnings
from pathlib import Path

import torch

import gdc_ext
from helpers import TinyLM

N, L, V = 10, 6, 50


def _block() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Counterfactual references: memorized or merely easy?\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    return code


def test_readme_counterfactual_block_runs_as_written():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (N, L + 1), generator=g)
    tokens[5] = tokens[2]  # a duplicate: crossfit_split keeps it with its copy

    def batches_of(ids):
        ids = torch.as_tensor(ids)
        return [(tokens[ids, :-1], tokens[ids, 1:], ids)]

    torch.manual_seed(0)
    models = {name: TinyLM(vocab=V) for name in ("model", "a", "b", "other")}
    ns = {"gdc_ext": gdc_ext, "torch": torch, "N": N, "samples": tokens[:, 1:], "batches": batches_of(range(N)),
          "batches_of": batches_of, "model": models["model"], "model_trained_on_a": models["a"],
          "model_trained_on_b": models["b"], "other_model": models["other"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the block as written warns about nothing
        exec(compile(_block(), "README.md", "exec"), ns)
    a, b, ref = ns["a"], ns["b"], ns["ref"]
    assert {2, 5} <= set(a.tolist()) or {2, 5} <= set(b.tolist())
    # (c) ran last: ref is the other model's; the cross-fit Cartographer kept the cross-fit one
    torch.testing.assert_close(ref, gdc_ext.reference_losses(models["other"], batches_of(range(N)), N, progress=False))
    crossfit = ns["carto"].reference
    torch.testing.assert_close(crossfit[b], gdc_ext.reference_losses(models["a"], batches_of(b), N, ids=b, progress=False)[b])
    torch.testing.assert_close(crossfit[a], gdc_ext.reference_losses(models["b"], batches_of(a), N, ids=a, progress=False)[a])
