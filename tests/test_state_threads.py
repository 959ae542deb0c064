"""A CartoState shared between threads: recording from several threads loses no update, and an
end_epoch() running while other threads record folds every batch wholly into one epoch. The
state's lock is held by record / the fused kernels' forward / end_epoch / save / ..., never across
backward, and is not part of what is pickled, copied or saved."""
import copy
import pickle
import threading

import pytest
import torch

from gdc_ext import CartoLoss, CartoState, functional, ops
from gdc_ext.layout import ACC_COUNT, ACC_LOSS_SUM

N = 4096  # large batches: an unlocked index_add_ or fold is long enough to interleave with another thread's


def _run_threads(fns):
    """Starts one thread per function, released together by a barrier; re-raises a thread's error."""
    barrier = threading.Barrier(len(fns))
    errors = []

    def wrap(fn):
        def run():
            barrier.wait()
            try:
                fn()
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.fixture
def torch_threads():
    """More than one intra-op thread, as a training process has (conftest pins one per worker)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_threads_recording_lose_no_update(torch_threads):
    """4 threads record overlapping batches (every id, integer losses: sums are exact in any order):
    the totals equal the sequential sum exactly."""
    state = CartoState(N, burn_in=1, eps=0.5)
    ids = torch.arange(N)
    reps, workers = 250, 4

    def work(k):
        def run():
            for _ in range(reps):
                state.record(torch.full((N,), float(k + 1)), ids)
        return run

    _run_threads([work(k) for k in range(workers)])
    assert torch.equal(state.acc[:, ACC_COUNT], torch.full((N,), float(reps * workers), dtype=torch.float64))
    assert torch.equal(state.acc[:, ACC_LOSS_SUM],
                       torch.full((N,), float(reps * sum(range(1, workers + 1))), dtype=torch.float64))


def test_threads_running_the_fused_kernel_lose_no_update(torch_threads):
    """The fused kernel's recording is serialised too (CartoLoss forward + backward, and the
    no-grad recording of functional.cross_entropy(record=True), in each thread): every row is
    counted, and the loss sums equal a sequential run's (up to summation order)."""
    V = 4
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)) for _ in range(4)]
    ids = torch.arange(N)
    reps = 200

    def record_all(state, batch):
        loss_fn = CartoLoss(state=state)
        for i in range(reps):
            if i % 4 == 0:
                x = batch[0].clone().requires_grad_()
                loss_fn(x, batch[1], ids).backward()
            else:
                with torch.no_grad():
                    functional.cross_entropy(batch[0], batch[1], ids, state=state, record=True)

    shared = CartoState(N, burn_in=1, eps=0.5)
    _run_threads([lambda b=b: record_all(shared, b) for b in batches])
    alone = CartoState(N, burn_in=1, eps=0.5)
    for b in batches:
        record_all(alone, b)
    assert torch.equal(shared.acc[:, ACC_COUNT], alone.acc[:, ACC_COUNT])
    assert float(alone.acc[0, ACC_COUNT]) == reps * len(batches)
    torch.testing.assert_close(shared.acc, alone.acc, rtol=1e-12, atol=1e-9)


@pytest.mark.filterwarnings("ignore:CartoState.end_epoch. nothing was recorded")
@pytest.mark.parametrize("how", ["record", "cartoloss"])
def test_end_epoch_concurrent_with_recording_keeps_batches_whole(monkeypatch, torch_threads, how):
    """Batch b records the loss b + 1 once for every id. Whatever the interleaving, each epoch's
    accumulator (captured as end_epoch folds it) then holds whole batches: the same count and the
    same loss sum for every id, and over all epochs every batch exactly once."""
    folded = []
    real_fold = ops.end_epoch_

    def capture(acc, *args):
        folded.append(acc.clone())
        return real_fold(acc, *args)

    monkeypatch.setattr(ops, "end_epoch_", capture)
    state = CartoState(N, burn_in=1, eps=0.5)
    ids = torch.arange(N)
    n_batches, n_ends = 120, 40
    V = 8
    loss_fn = CartoLoss(state=state)

    def logits_with_loss(value):
        """[N, V] logits whose target row has NLL ~ value (target 0) and the target."""
        x = torch.zeros(N, V)
        x[:, 0] = -value  # NLL = log(exp(-v) + V - 1) + v: a distinct value per batch
        return x, torch.zeros(N, dtype=torch.int64)

    def recorder(first):
        def run():
            for b in range(first, n_batches, 2):
                if how == "record":
                    state.record(torch.full((N,), float(b + 1)), ids)
                else:
                    x, t = logits_with_loss(float(b) / n_batches)
                    loss_fn(x.requires_grad_(), t, ids).backward()
        return run

    def ender():
        for _ in range(n_ends):
            state.end_epoch()

    _run_threads([recorder(0), recorder(1), ender])
    state.end_epoch()
    assert len(folded) == n_ends + 1
    total = torch.zeros(N, dtype=torch.float64)
    for e, acc in enumerate(folded):
        count, loss = acc[:, ACC_COUNT], acc[:, ACC_LOSS_SUM]
        assert torch.equal(count, count[:1].expand(N)), f"epoch {e}: a batch was split across epochs"
        assert torch.equal(loss, loss[:1].expand(N)), f"epoch {e}: a batch was split across epochs"
        total += count
    assert torch.equal(total, torch.full((N,), float(n_batches), dtype=torch.float64)), "batches were lost"


def test_lock_is_not_held_during_backward():
    """The forward op records under the lock; the backward pass runs without it (another thread can
    take the lock while a gradient is being computed)."""
    state = CartoState(8, burn_in=1, eps=0.5)
    x = torch.randn(8, 5, requires_grad=True)
    loss = CartoLoss(state=state)(x, torch.randint(0, 5, (8,)), torch.arange(8))
    seen = []

    def try_lock():
        ok = state.lock.acquire(blocking=False)
        if ok:
            state.lock.release()
        seen.append(ok)

    def probe(grad):  # runs during backward
        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        return grad

    x.register_hook(probe)
    loss.backward()
    assert seen == [True]


def test_lock_is_not_copied_pickled_or_saved(tmp_path):
    state = CartoState(6, burn_in=1, eps=[0.5, 1.0])
    state.record(torch.arange(6.0), torch.arange(6))
    for other in (copy.deepcopy(state), pickle.loads(pickle.dumps(state)), copy.copy(state)):
        assert other.lock is not state.lock
        assert torch.equal(other.acc, state.acc)
        assert other.lock.acquire(blocking=False)
        other.lock.release()
    assert not any(isinstance(v, type(state.lock)) for v in state.state_dict().values())
    with state.lock:  # re-entrant: the state's own methods run while the caller holds it
        state.end_epoch()
        state.save(tmp_path / "s.safetensors")
    assert CartoState.load(tmp_path / "s.safetensors").epochs_done == 1
