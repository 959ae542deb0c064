"""Two CPU processes on gloo: each records half of every batch; after end_epoch() (which
all-reduces the epoch accumulators) both hold the scores of a single-process run over the whole
batches. The CartoSampler and Cartographer take the world size and rank from torch.distributed."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gdc_ext import CartoLoss, CartoSampler, CartoState, Cartographer

N, V, L, B, EPOCHS, BURN_IN, EPS = 16, 11, 3, 6, 4, 2, [1.5, 2.5]


def _batches():
    """Fixed history: per epoch, a few batches of [B, L, V] logits, [B, L] targets, [B] ids."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(EPOCHS):
        ep = []
        for _ in range(3):
            scale = float(torch.rand((), generator=g)) * 6
            logits = torch.randn(B, L, V, generator=g) * scale
            target = torch.randint(0, V, (B, L), generator=g)
            ids = torch.randint(0, N, (B,), generator=g)
            ep.append((logits, target, ids))
        out.append(ep)
    return out


def _run(rows):
    """Records the history, each batch restricted to rows(B) (a slice); returns the state."""
    state = CartoState(N, burn_in=BURN_IN, eps=EPS)
    loss_fn = CartoLoss(state=state)
    for ep in _batches():
        for logits, target, ids in ep:
            x = logits[rows].clone().requires_grad_()
            loss_fn(x.reshape(-1, V), target[rows].reshape(-1), ids[rows]).backward()
        state.end_epoch()
    return state


def _worker(rank, world, store_file, outdir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # A file store, not tcp://127.0.0.1:<port>: a port found free and closed again could be taken by
    # another process (a busy machine, other test runs) before rank 0 listens on it.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        half = B // world
        state = _run(slice(rank * half, (rank + 1) * half))
        sampler = CartoSampler(torch.tensor([1.0, 2.0, 0.0, 1.5, 1.0]), seed=3)
        carto = Cartographer(num_samples=4, burn_in=2, eps=1.0)
        for _ in range(2):  # nothing recorded: all-reduce of zeros still keeps ranks in step
            carto.end_epoch()
        torch.save({"state": state.state_dict(), "sampler": (sampler.num_replicas, sampler.rank, list(sampler)),
                    "carto_sampler": (carto.sampler().num_replicas, carto.sampler().rank)},
                   os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    world = 2
    # fork, not spawn: the children skip re-importing torch (seconds on a loaded 2-core box)
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    single = _run(slice(None)).state_dict()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, g in enumerate(got):
        st = g["state"]
        for name in ("istats", "forgets", "epoch", "eps"):  # counters: bitwise
            assert torch.equal(st[name], single[name]), (r, name)
        for name in ("acc", "fstats"):  # float sums: the order of addition differs
            torch.testing.assert_close(st[name], single[name], rtol=1e-6, atol=1e-6)
        assert int(st["istats"][:, 1].max()) > 0 and int(st["forgets"].sum()) > 0  # non-trivial history
    for name in ("fstats", "istats", "forgets"):  # ranks identical to each other
        assert torch.equal(got[0]["state"][name], got[1]["state"][name])
    # the sampler split itself by the process group: disjoint positions covering the padded list
    (R0, r0, ids0), (R1, r1, ids1) = got[0]["sampler"], got[1]["sampler"]
    assert (R0, r0, R1, r1) == (2, 0, 2, 1) and len(ids0) == len(ids1)
    ref = CartoSampler(torch.tensor([1.0, 2.0, 0.0, 1.5, 1.0]), seed=3)
    merged = [x for pair in zip(ids0, ids1) for x in pair]
    drawn = list(ref)
    assert merged[:len(drawn)] == drawn and len(merged) - len(drawn) < 2
    assert got[0]["carto_sampler"] == (2, 0) and got[1]["carto_sampler"] == (2, 1)
