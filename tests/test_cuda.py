"""CUDA kernels: parity with the CPU kernels (the specification in C++), streaming == reference,
opcheck, torch.compile, deterministic recording, graph capture and end_epoch at N = 1e8.

Skipped without a CUDA device. `scripts/gpu_check.sh` runs this file, then the sanitizer smoke
test under compute-sanitizer (memcheck and racecheck).
"""
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from gdc_ext import CartoLoss, CartoState, ops
from test_scores_property import check_streaming_equals_reference, histories

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Rows of T-typed gradients may differ by one rounding step of T (exp differs on CPU and GPU).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-6),
       torch.float16: dict(rtol=4e-3, atol=1e-6)}
N_SAMPLES = 6


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("gdc::cross_entropy_fwd", "CUDA"):
        pytest.fail("a CUDA device is present but gdc_ext was built without CUDA kernels: "
                    "rebuild with GDC_CUDA=ON (see scripts/gpu_check.sh)")


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

    acc = torch.zeros(N_SAMPLES, 3, dtype=torch.float64, device=device)
    args = (mv(d["target"]), mv(d["cw"]), mv(d["ids"]), mv(d["sw"]), mv(d["gs"]), acc, -100, d["smoothing"])
    x = _logits_on(d, device)
    if inplace:
        loss, nll = ops.cross_entropy_fwd_inplace(x, *args)
        grad = x
    else:
        loss, nll, grad = ops.cross_entropy_fwd(x, *args, True)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_ignored_rows(dtype):
    d = _inputs(8, 300, dtype)
    d["target"][:] = -100
    loss, nll, grad, acc = _call(d, "cuda")
    assert torch.equal(loss, torch.zeros(8)) and torch.equal(nll, torch.zeros(8))
    assert torch.equal(grad.float(), torch.zeros(8, 300)) and torch.equal(acc, torch.zeros(N_SAMPLES, 3))


def test_bad_rows_poison_loss_and_leave_state_unchanged():
    # No host sync: instead of raising, bad rows give NaN and the batch is not recorded.
    d = _inputs(8, 50, torch.float32)
    for field, r, value in [("target", 1, 50), ("target", 2, -3), ("ids", 1, N_SAMPLES), ("ids", 4, -1)]:
        e = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        e["target"][r] = 3 if field == "ids" else e["target"][r]
        e[field][r] = value
        loss, nll, grad, acc = _call(e, "cuda")
        assert torch.isnan(loss[r]) and torch.isnan(nll[r]) and torch.isnan(grad[r]).all()
        assert torch.equal(acc, torch.zeros(N_SAMPLES, 3))
        ok = torch.ones(8, dtype=torch.bool)
        ok[r] = False
        assert torch.isfinite(loss[ok]).all()
    e = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    e["flat"][e["offset"] + 6 * 50 + 3] = float("nan")
    e["target"][6] = 2
    _, _, _, acc = _call(e, "cuda")
    assert torch.equal(acc, torch.zeros(N_SAMPLES, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight,smoothing", [(False, 0.0), (True, 0.2)])
@pytest.mark.parametrize("inplace", [False, True])
def test_carto_loss_matches_cross_entropy_on_cuda(reduction, use_weight, smoothing, inplace):
    torch.manual_seed(0)
    R, V = 37, 1001
    x = torch.randn(R, V, device="cuda") * 3
    t = torch.randint(0, V, (R,), device="cuda")
    t[::4] = -100
    w = torch.rand(V, device="cuda") + 0.1 if use_weight else None
    state = CartoState(5, burn_in=1, eps=0.5, device="cuda")
    ours = CartoLoss(weight=w, reduction=reduction, label_smoothing=smoothing, state=state, inplace_grad=inplace)
    ref = nn.CrossEntropyLoss(weight=w, reduction=reduction, label_smoothing=smoothing)
    g_out = torch.randn(R, device="cuda") if reduction == "none" else torch.tensor(1.7, device="cuda")
    xr = x.clone().requires_grad_()
    o_ref = ref(xr, t)
    (o_ref * g_out).sum().backward()
    leaf = torch.zeros_like(x, requires_grad=True)
    o = ours(leaf + x, t, torch.arange(R, device="cuda") % 5)
    (o * g_out).sum().backward()
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, xr.grad, rtol=1e-4, atol=1e-6)
    assert state.acc[:, 1].sum().item() == (t != -100).sum().item()


def test_sample_weights_on_cuda():
    torch.manual_seed(7)
    x = torch.randn(12, 20, device="cuda")
    t = torch.randint(0, 20, (12,), device="cuda")
    state = CartoState(3, burn_in=1, eps=0.5, device="cuda")
    lf = CartoLoss(state=state)
    lf.set_sample_weights(torch.tensor([1.0, 0.5, 0.0], device="cuda"))
    xg = x.clone().requires_grad_()
    lf(xg, t, torch.tensor([0, 1, 2], device="cuda")).backward()
    xr = x.clone().requires_grad_()
    per = F.cross_entropy(xr, t, reduction="none")
    (per * torch.tensor([1.0, 0.5, 0.0], device="cuda").repeat_interleave(4)).sum().div(12).backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state.acc[:, 0], per.detach().double().reshape(3, 4).sum(1), rtol=1e-5, atol=1e-5)


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
    states = [CartoState(1000, burn_in=2, eps=[0.3, 1.0], device=dev) for dev in ("cpu", "cuda")]
    for _ in range(5):
        acc = torch.zeros(1000, 3, dtype=torch.float64)
        seen = torch.rand(1000, generator=g) < 0.7
        acc[:, 1] = seen * torch.randint(1, 4, (1000,), generator=g)
        acc[:, 0] = acc[:, 1] * torch.rand(1000, generator=g).double() * 2
        acc[:, 2] = acc[:, 1] * 0.5
        for s in states:
            s.acc.copy_(acc)
            s.end_epoch()
    a, b = states[0].scores(), states[1].scores()
    for key in ("difficulty", "memorization", "last_loss", "min_loss", "loss_mean", "loss_std", "grad_energy"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=0, atol=0, equal_nan=True)
    for key in ("forgets", "transitions", "observed"):
        assert torch.equal(getattr(b, key), getattr(a, key))
    assert b.epoch == a.epoch == 5
    assert torch.equal(states[1].acc.cpu(), torch.zeros(1000, 3, dtype=torch.float64))


@settings(max_examples=25)
@given(histories())
def test_streaming_equals_reference_cuda(h):
    check_streaming_equals_reference(h, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cuda(dtype):
    from test_ops import _ce_args

    for recording, weighted, class_weight in [(True, True, True), (False, False, False)]:
        logits, target, ids, sw, acc = (t.cuda() for t in _ce_args(recording=recording, weighted=weighted, dtype=dtype))
        cw = torch.rand(logits.shape[1], device="cuda") if class_weight else None
        gs = torch.tensor([0.5], device="cuda")
        for compute_grad in (True, False):
            torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd,
                                  (logits, target, cw, ids, sw, gs, acc, -100, 0.1, compute_grad))
        torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd_inplace,
                              (logits.clone(), target, cw, ids, sw, gs, acc, -100, 0.0))
    torch.library.opcheck(torch.ops.gdc.scale_grad_, (torch.randn(4, 3, device="cuda"), torch.tensor(0.5, device="cuda")))
    torch.library.opcheck(torch.ops.gdc.scale_grad_, (torch.randn(4, 3, device="cuda"), torch.rand(4, device="cuda")))
    s = CartoState(7, burn_in=2, eps=[0.5, 1.0], device="cuda")
    s.acc[:4, 1] = 2.0
    torch.library.opcheck(torch.ops.gdc.end_epoch_, (s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps, 2))


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_training_step_on_cuda(inplace):
    from test_ops import check_compile_matches_eager

    check_compile_matches_eager(inplace, device="cuda")


def _record_many(R=8192, V=129, N=7, seed=3):
    d = _inputs(R, V, torch.float32, seed=seed)
    ids = torch.randint(0, N, (R,), generator=torch.Generator().manual_seed(seed)).cuda()
    acc = torch.zeros(N, 3, dtype=torch.float64, device="cuda")
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
    acc = torch.zeros(7, 3, dtype=torch.float64)
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
        ref = torch.zeros(N_SAMPLES, 3, dtype=torch.float64)
        l_ref, _, g_ref = ops.cross_entropy_fwd(d["logits"], d["target"], d["cw"], d["ids"], d["sw"],
                                                torch.tensor([0.5]), ref, -100, 0.1, True)
        torch.testing.assert_close(loss.cpu(), l_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad.float().cpu(), 2 * g_ref.float(), **TOL[torch.bfloat16])
        assert state.epochs_done == 3
        assert torch.equal(state.istats[:, 1].cpu() > 0, ref[:, 1] > 0)
    finally:
        torch.use_deterministic_algorithms(was)


def test_end_epoch_1e8_samples():
    N = 100_000_000
    per_sample = 24 + 48 + 12 + 4  # acc, fstats (extras), istats, forgets (K = 1)
    free, _ = torch.cuda.mem_get_info()
    if free < 1.3 * N * per_sample:
        pytest.skip(f"needs {1.3 * N * per_sample / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    state = CartoState(N, burn_in=1, eps=1.0, device="cuda")
    print(f"\nCartoState N=1e8 on {torch.cuda.get_device_name()}: {state.nbytes() / 2**30:.2f} GiB "
          f"({state.nbytes() / N:.0f} bytes/sample)")
    state.acc[:, 0] = 0.5
    state.acc[:, 1] = 1.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    state.end_epoch()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    moved = N * (2 * 24 + 2 * 48 + 2 * 12 + 2 * 4)
    print(f"end_epoch N=1e8: {dt * 1e3:.1f} ms, ~{moved / dt / 1e9:.0f} GB/s")
    idx = torch.randint(0, N, (1000,), device="cuda")
    assert torch.equal(state.fstats[idx, 0].cpu(), torch.full((1000,), 0.5, dtype=torch.float64))
    assert torch.equal(state.istats[idx, 1].cpu(), torch.ones(1000, dtype=torch.int32))
    assert state.epochs_done == 1 and float(state.acc[idx].abs().sum()) == 0.0
    del state
    torch.cuda.empty_cache()


def test_sanitizer_smoke():
    """Small, fast coverage of every kernel path, for compute-sanitizer (memcheck, racecheck)."""
    for dtype in DTYPES:
        for V, offset in ((7, 0), (1003, 1), (4100, 0)):
            d = _inputs(5, V, dtype, offset=offset)
            _call(d, "cuda")
            _call(d, "cuda", inplace=True)
            ops.scale_grad_(_call(d, "cuda")[2].cuda(), torch.rand(5, device="cuda"))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _call(_inputs(33, 70, torch.float32), "cuda")
    finally:
        torch.use_deterministic_algorithms(was)
    s = CartoState(1000, burn_in=1, eps=[0.5, 1.0], device="cuda")
    s.acc[:, 1] = 1.0
    s.end_epoch()
    torch.cuda.synchronize()
