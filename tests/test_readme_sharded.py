"""The README's "Sharded state" block runs as written on 2 gloo ranks (the process group set up by
the test instead of NCCL, the state on the CPU), with small stand-ins for N, T, the model, the
loader and its DistributedSampler."""
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from sharded_common import run_world
from torch import nn
from torch.utils.data import DistributedSampler

import gdc_ext

README = Path(__file__).resolve().parents[1] / "README.md"
V, N, L = 11, 12, 6


def _block() -> str:
    section = README.read_text().split("\n## Sharded state", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)[0]
    assert 'dist.init_process_group("nccl")' in code and 'device="cuda"' in code
    return code.replace('dist.init_process_group("nccl")', "pass").replace('device="cuda"', 'device="cpu"')


def _worker(rank, world, folder):
    torch.manual_seed(0)
    data = torch.randint(0, V, (N, L + 1))
    sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=True, seed=0)

    class Loader:
        def __iter__(self):
            order = list(sampler)
            for i in range(0, len(order), 2):
                ids = torch.tensor(order[i:i + 2])
                yield data[ids], ids

    torch.manual_seed(rank)
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V))
    ns = dict(dist=dist, gdc_ext=gdc_ext, N=N, T=3, model=model, loader=Loader(), sampler=sampler)
    os.chdir(folder)
    exec(compile(_block(), "README.md", "exec"), ns)
    state, q, kept, new_sampler = ns["state"], ns["q"], ns["kept"], ns["sampler"]
    return dict(bounds=(state.start, state.stop), epochs=state.epochs_done, codes=q.codes, kept=kept,
                drawn=list(new_sampler), scored=int(state.scores().local.scored.sum()))


def test_readme_sharded_block_runs_as_written(tmp_path):
    got = run_world(_worker, 2, tmp_path, str(tmp_path))
    assert [g["bounds"] for g in got] == [(0, 6), (6, 12)]
    assert all(g["epochs"] == 3 and g["scored"] == 6 for g in got)
    kept = torch.cat([g["kept"] for g in got])
    assert len(kept) == N - round(0.05 * N)
    for g in got:  # each rank draws only its own ids
        a, b = g["bounds"]
        assert g["drawn"] and all(a <= i < b for i in g["drawn"])
    assert (tmp_path / "ckpt" / "carto" / "index.json").exists()
