"""Ranks whose CartoStates disagree (N, eps, burn_in, extras, epochs done) are caught by
end_epoch() before its all-reduce: every rank raises the same ValueError naming the field, the
ranks and their values, and leaves its state unchanged; no rank aborts (a different N used to
SIGABRT inside gloo) and the group stays in step for the next call.

Three gloo processes run every case in turn (one start, cases in sequence: a detected mismatch
raises on every rank at the same call, so the ranks stay paired). Each rank appends one JSON line
per case to its own file, so a rank that dies still leaves the cases it finished. The process
group's timeout turns a hang into an error instead of a stuck test."""
import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gdc_ext import CartoState

WORLD = 3
BASE = dict(num_samples=8, burn_in=2, eps=[0.5, 1.5], extras=True)
# case -> (rank that differs, its constructor arguments); the ranks not listed build BASE
CASES = {
    "eps": (1, dict(BASE, eps=[0.5, 1.25])),
    "eps_count": (2, dict(BASE, eps=[0.5, 1.5, 3.0])),
    "burn_in": (0, dict(BASE, burn_in=3)),
    "extras": (1, dict(BASE, extras=False)),
    "epoch_ahead": (1, BASE),  # the same state, one epoch further (a later checkpoint, an extra end_epoch)
    "agree": (None, BASE),      # control: no mismatch, the fold happens and the group is still in step
    "num_samples": (2, dict(BASE, num_samples=9)),  # last: without the check it aborts the process
}
PG_TIMEOUT_S = 120  # a hang (a rank left waiting in a collective) becomes a gloo error, not a stuck test


def _build(rank, case):
    odd, kw = CASES[case]
    state = CartoState(**(kw if rank == odd else BASE))
    n = state.num_samples
    state.record(torch.arange(n, dtype=torch.float64) + rank, torch.arange(n))
    return state


def _worker(rank, port, outdir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # the epoch-ahead rank folded one more epoch before joining (e.g. restored a later checkpoint)
    ahead = _build(rank, "epoch_ahead")
    if rank == CASES["epoch_ahead"][0]:
        ahead.end_epoch()
        ahead.record(torch.ones(8), torch.arange(8))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for case in CASES:
            state = ahead if case == "epoch_ahead" else _build(rank, case)
            before = {k: v.clone() for k, v in state.tensors().items()}
            row = {"case": case, "error": None, "message": None}
            try:
                state.end_epoch()
            except Exception as e:  # recorded, judged by the tests
                row["error"], row["message"] = type(e).__name__, str(e)
                row["unchanged"] = all(torch.equal(v, before[k]) for k, v in state.tensors().items())
            else:
                row["last_loss"] = state.scores().last_loss.tolist()
            with open(os.path.join(outdir, f"rank{rank}.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case: [rank 0's row, rank 1's, rank 2's]} (rows missing where a rank died first) and how the
    processes ended."""
    out = tmp_path_factory.mktemp("agree")
    ended = "ok"
    try:
        # fork, not spawn: the children skip re-importing torch (seconds on a loaded 2-core box)
        mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    except Exception as e:  # a rank died (SIGABRT) or raised outside a case
        ended = f"{type(e).__name__}: {e}"
    rows = {case: [None] * WORLD for case in CASES}
    for r in range(WORLD):
        path = out / f"rank{r}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                rows[row["case"]][r] = row
    return rows, ended


def _check_raised(results, case, field, values):
    rows, ended = results
    got = rows[case]
    assert all(row is not None for row in got), f"case {case}: some rank did not finish it ({ended})"
    for r, row in enumerate(got):
        assert row["error"] == "ValueError", f"case {case}: rank {r} did not raise ({row})"
        assert row["unchanged"], f"case {case}: rank {r} changed its state before raising"
        assert f"{field} differs" in row["message"], row["message"]
        for v in values:
            assert v in row["message"], (v, row["message"])
    assert len({row["message"] for row in got}) == 1, "the ranks raised different messages"


def test_different_eps_raises_on_every_rank(results):
    _check_raised(results, "eps", "eps", ["ranks 0, 2: [0.5, 1.5] (K = 2)", "rank 1: [0.5, 1.25] (K = 2)"])


def test_different_number_of_eps_raises_on_every_rank(results):
    _check_raised(results, "eps_count", "eps", ["ranks 0, 1: [0.5, 1.5] (K = 2)", "rank 2: [0.5, 1.5, 3.0] (K = 3)"])


def test_different_burn_in_raises_on_every_rank(results):
    _check_raised(results, "burn_in", "burn_in", ["rank 0: 3", "ranks 1, 2: 2"])


def test_different_extras_raises_on_every_rank(results):
    _check_raised(results, "extras", "extras", ["ranks 0, 2: True", "rank 1: False"])


def test_rank_an_epoch_ahead_raises_on_every_rank(results):
    _check_raised(results, "epoch_ahead", "epochs_done", ["ranks 0, 2: 0", "rank 1: 1"])


def test_different_num_samples_raises_on_every_rank_without_abort(results):
    _check_raised(results, "num_samples", "num_samples (N)", ["ranks 0, 1: 8", "rank 2: 9"])
    assert results[1] == "ok", f"a rank did not end normally: {results[1]}"


def test_agreeing_ranks_fold_after_the_failed_calls(results):
    """After the mismatches every rank is still paired: the agreeing case all-reduces normally
    (each id's loss is the mean of the ranks' losses id + rank: id + 1)."""
    rows, ended = results
    got = rows["agree"]
    assert all(row is not None and row["error"] is None for row in got), (got, ended)
    for row in got:
        assert row["last_loss"] == [float(i) + 1.0 for i in range(8)]
