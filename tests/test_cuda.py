"""CUDA-specific behaviour: parity with the CPU kernels (the specification in C++), NaN-poisoned
bad rows instead of host-synchronising checks, deterministic recording, graph capture, end_epoch
at N = 1e8 and the sanitizer smoke test.

What holds on every device (opcheck, torch.compile, streaming == reference, parity with
F.cross_entropy, sample weights) is tested once, over the `device` fixture of tests/conftest.py.
Skipped without a CUDA device. `scripts/gpu_check.sh` runs every `cuda`-marked test, then the
sanitizer smoke test under compute-sanitizer (memcheck and racecheck).
"""
import time

import pytest
import torch
from helpers import require_cuda_kernels

from gdc_ext import CartoState, ops
from gdc_ext import layout
from gdc_ext.layout import ACC_COLS, ACC_COUNT, ACC_ENERGY_SUM, ACC_LOSS_SUM, I_OBSERVED

EXTRAS = layout.CORE | layout.EXTRAS  # the statistic groups of a state with extras

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Rows of T-typed gradients may differ by one rounding step of T (exp differs on CPU and GPU).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-6),
       torch.float16: dict(rtol=4e-3, atol=1e-6)}
N_SAMPLES = 6


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    require_cuda_kernels()


def _inputs(R, V, dtype, seed=0, ignore_every=5, class_weight=True, smoothing=0.1, offset=0):
    """CPU inputs of one call. offset > 0 makes the logits start off a 16-byte boundary."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(R * V + offset, generator=g) * 3).to(dtype)
    logits = flat[offset:].view(R, V)
    target = torch.randint(0, V, (R,), generator=g)
    if ignore_every:
        target[::ignore_every] = -100
    ids = torch.randint(0, N_SAMPLES, (R,), generator=g)
    sw = torch.rand(N_SAMPLES, generator=g) + 0.5
    cw = torch.rand(V, generator=g) + 0.1 if class_weight else None
    return dict(logits=logits, flat=flat, offset=offset, target=target, cw=cw, ids=ids, sw=sw,
                gs=torch.tensor([0.37]), smoothing=smoothing)


def _logits_on(d, device):
    """A fresh copy of the logits on `device`, at the same storage offset (alignment) as d's."""
    R, V = d["logits"].shape
    return d["flat"].clone().to(device)[d["offset"]:].view(R, V)


def _call(d, device, inplace=False):
    """Runs the op on `device`; returns CPU (loss, nll, grad, acc)."""
    def mv(t):
        return None if t is None else t.to(device)

    # the accumulator of a state with extras: the energy column is recorded (and compared) too
    acc = torch.zeros(N_SAMPLES, layout.widths(EXTRAS, 1)["acc"], dtype=torch.float64, device=device)
    args = (mv(d["target"]), mv(d["cw"]), mv(d["ids"]), mv(d["sw"]), mv(d["gs"]), acc, -100, d["smoothing"])
    x = _logits_on(d, device)
    if inplace:
        loss, nll = ops.cross_entropy_fwd_inplace(x, *args, EXTRAS)
        grad = x
    else:
        loss, nll, grad = ops.cross_entropy_fwd(x, *args, True, EXTRAS)
    return loss.cpu(), nll.cpu(), grad.cpu(), acc.cpu()


def _assert_parity(d, inplace=False):
    dtype = d["logits"].dtype
    lc, nc, gc, ac = _call(d, "cpu", inplace)
    lg, ng, gg, ag = _call(d, "cuda", inplace)
    torch.testing.assert_close(lg, lc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ng, nc, rtol=1e-4, atol=1e-5)
    assert gg.dtype == dtype
    torch.testing.assert_close(gg.float(), gc.float(), **TOL[dtype])
    torch.testing.assert_close(ag, ac, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 1000, 32001, 50257])
@pytest.mark.parametrize("class_weight,smoothing", [(False, 0.0), (True, 0.1)])
def test_parity_with_cpu(dtype, V, class_weight, smoothing):
    R = 64 if V < 10000 else 12
    _assert_parity(_inputs(R, V, dtype, class_weight=class_weight, smoothing=smoothing))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_parity_unaligned_rows(dtype, offset):
    # Logits off a 16-byte boundary: scalar head before the vector loop; grad not co-aligned.
    _assert_parity(_inputs(9, 1003, dtype, offset=offset))
    _assert_parity(_inputs(9, 1003, dtype, offset=offset), inplace=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 32001])
def test_parity_inplace(dtype, V):
    _assert_parity(_inputs(10, V, dtype), inplace=True)


def test_bad_rows_poison_loss_and_leave_state_unchanged():
    # No host sync: instead of raising, bad rows give NaN and the batch is not recorded.
    d = _inputs(8, 50, torch.float32)
    for field, r, value in [("target", 1, 50), ("target", 2, -3), ("ids", 1, N_SAMPLES), ("ids", 4, -1)]:
        e = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        e["target"][r] = 3 if field == "ids" else e["target"][r]
        e[field][r] = value
        loss, nll, grad, acc = _call(e, "cuda")
        assert torch.isnan(loss[r]) and torch.isnan(nll[r]) and torch.isnan(grad[r]).all()
        assert torch.equal(acc, torch.zeros_like(acc))
        ok = torch.ones(8, dtype=torch.bool)
        ok[r] = False
        assert torch.isfinite(loss[ok]).all()
    e = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    e["flat"][e["offset"] + 6 * 50 + 3] = float("nan")
    e["target"][6] = 2
    _, _, _, acc = _call(e, "cuda")
    assert torch.equal(acc, torch.zeros_like(acc))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad(dtype):
    g = (torch.randn(33, 517) * 1e-3).to(dtype)
    gc = g.cuda()
    before = gc.clone()
    ops.scale_grad_(gc, torch.tensor(1.0, device="cuda"))
    assert torch.equal(gc, before)  # exactly 1: untouched
    for go in (torch.tensor(0.37), torch.rand(33) + 0.5):
        c, d = g.clone(), g.cuda()
        ops.scale_grad_(c, go)
        ops.scale_grad_(d, go.cuda())
        torch.testing.assert_close(d.cpu(), c, rtol=0, atol=0)


def test_end_epoch_matches_cpu():
    g = torch.Generator().manual_seed(0)
    states = [CartoState(1000, burn_in=2, eps=[0.3, 1.0], device=dev, extras=True) for dev in ("cpu", "cuda")]
    for _ in range(5):
        acc = torch.zeros_like(states[0].acc)  # with extras: loss sum, count, energy sum
        seen = torch.rand(1000, generator=g) < 0.7
        acc[:, ACC_COUNT] = seen * torch.randint(1, 4, (1000,), generator=g)
        acc[:, ACC_LOSS_SUM] = acc[:, ACC_COUNT] * torch.rand(1000, generator=g).double() * 2
        acc[:, ACC_ENERGY_SUM] = acc[:, ACC_COUNT] * 0.5
        for s in states:
            s.acc.copy_(acc)
            s.end_epoch()
    a, b = states[0].scores(), states[1].scores()
    for key in ("difficulty", "memorization", "last_loss", "min_loss", "loss_mean", "loss_std", "grad_energy"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=0, atol=0, equal_nan=True)
    for key in ("forgets", "transitions", "observed"):
        assert torch.equal(getattr(b, key), getattr(a, key))
    assert b.epoch == a.epoch == 5
    assert torch.equal(states[1].acc.cpu(), torch.zeros_like(states[0].acc))
    for name, t in states[0].tensors().items():  # the float32 fold too: bit for bit (-fmad=false)
        assert torch.equal(states[1].tensors()[name].cpu(), t), name


def _record_many(R=8192, V=129, N=7, seed=3):
    d = _inputs(R, V, torch.float32, seed=seed)
    ids = torch.randint(0, N, (R,), generator=torch.Generator().manual_seed(seed)).cuda()
    acc = torch.zeros(N, ACC_COLS, dtype=torch.float64, device="cuda")
    ops.cross_entropy_fwd(_logits_on(d, "cuda"), d["target"].cuda(), None, ids, torch.empty(0, device="cuda"),
                          torch.ones(1, device="cuda"), acc, -100, 0.0, False)
    return acc.cpu(), d, ids.cpu()


def test_deterministic_mode_gives_identical_bits():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a1, d, ids = _record_many()
        a2, _, _ = _record_many()
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(a1.view(torch.int64), a2.view(torch.int64))
    # The same row order as the CPU's record_rows: equal up to per-row float differences.
    acc = torch.zeros(7, ACC_COLS, dtype=torch.float64)
    ops.cross_entropy_fwd(d["logits"], d["target"], None, ids, torch.empty(0), torch.ones(1), acc, -100, 0.0, False)
    torch.testing.assert_close(a1, acc, rtol=1e-6, atol=1e-6)
    a3, _, _ = _record_many()  # atomics: same values, summation order free
    torch.testing.assert_close(a3, a1, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_of_a_step(deterministic):
    # Any host synchronisation inside the ops would make capture fail.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        d = _inputs(64, 1000, torch.bfloat16)
        x, t, ids = _logits_on(d, "cuda"), d["target"].cuda(), d["ids"].cuda()
        cw, sw = d["cw"].cuda(), d["sw"].cuda()
        state = CartoState(N_SAMPLES, burn_in=1, eps=1.0, device="cuda")
        gs = torch.tensor([0.5], device="cuda")
        go = torch.tensor(2.0, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the graph (allocator, lazy kernel loading)
            _, _, grad = ops.cross_entropy_fwd(x, t, cw, ids, sw, gs, state.acc, -100, 0.1, True)
            ops.scale_grad_(grad, go)
            state.end_epoch()
        torch.cuda.current_stream().wait_stream(s)
        state = CartoState(N_SAMPLES, burn_in=1, eps=1.0, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, nll, grad = ops.cross_entropy_fwd(x, t, cw, ids, sw, gs, state.acc, -100, 0.1, True)
            ops.scale_grad_(grad, go)
            state.end_epoch()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        ref = torch.zeros(N_SAMPLES, ACC_COLS, dtype=torch.float64)
        l_ref, _, g_ref = ops.cross_entropy_fwd(d["logits"], d["target"], d["cw"], d["ids"], d["sw"],
                                                torch.tensor([0.5]), ref, -100, 0.1, True)
        torch.testing.assert_close(loss.cpu(), l_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad.float().cpu(), 2 * g_ref.float(), **TOL[torch.bfloat16])
        assert state.epochs_done == 3
        assert torch.equal(state.istats[:, I_OBSERVED].cpu() > 0, ref[:, ACC_COUNT] > 0)
    finally:
        torch.use_deterministic_algorithms(was)


def test_end_epoch_1e8_samples():
    N = 100_000_000
    per_sample = 16 + 8 + 4 + 2  # acc, fstats, istats, forgets (K = 1): the compact default state
    free, _ = torch.cuda.mem_get_info()
    if free < 1.3 * N * per_sample:
        pytest.skip(f"needs {1.3 * N * per_sample / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    state = CartoState(N, burn_in=1, eps=1.0, device="cuda")
    print(f"\nCartoState N=1e8 on {torch.cuda.get_device_name()}: {state.nbytes() / 2**30:.2f} GiB "
          f"({state.nbytes() / N:.0f} bytes/sample)")
    state.acc[:, ACC_LOSS_SUM] = 0.5
    state.acc[:, ACC_COUNT] = 1.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    state.end_epoch()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    moved = N * 2 * per_sample
    print(f"end_epoch N=1e8: {dt * 1e3:.1f} ms, ~{moved / dt / 1e9:.0f} GB/s")
    idx = torch.randint(0, N, (1000,), device="cuda")
    assert torch.equal(state.fstats[idx, 0].cpu(), torch.full((1000,), 0.5, dtype=torch.float32))
    assert torch.equal(state.istats[idx, 1].cpu(), torch.ones(1000, dtype=torch.int16))
    assert state.epochs_done == 1 and float(state.acc[idx].abs().sum()) == 0.0
    del state
    torch.cuda.empty_cache()


def test_sanitizer_smoke():
    """Small, fast coverage of every kernel path, for compute-sanitizer (memcheck, racecheck);
    each result is checked against the CPU kernels, so a kernel that reads or writes wrong
    memory without the sanitizer noticing still fails here."""
    for dtype in DTYPES:
        for V, offset in ((7, 0), (1003, 1), (4100, 0)):
            d = _inputs(5, V, dtype, offset=offset)
            for inplace in (False, True):
                _assert_parity(d, inplace=inplace)
            go = torch.rand(5, generator=torch.Generator().manual_seed(V)) + 0.5
            grad_cpu, grad_cuda = _call(d, "cpu")[2], _call(d, "cuda")[2].cuda()
            ops.scale_grad_(grad_cpu, go)
            ops.scale_grad_(grad_cuda, go.cuda())
            torch.testing.assert_close(grad_cuda.cpu().float(), grad_cpu.float(), **TOL[dtype])
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _assert_parity(_inputs(33, 70, torch.float32))
    finally:
        torch.use_deterministic_algorithms(was)
    states = [CartoState(1000, burn_in=1, eps=[0.5, 1.0], device=dev) for dev in ("cpu", "cuda")]
    for s in states:
        s.acc[:, ACC_LOSS_SUM] = torch.linspace(0.0, 2.0, 1000, dtype=torch.float64)
        s.acc[:, ACC_COUNT] = 1.0
        s.end_epoch()
    torch.cuda.synchronize()
    for name, t in states[0].tensors().items():
        assert torch.equal(states[1].tensors()[name].cpu(), t), name
    assert states[1].epochs_done == 1
