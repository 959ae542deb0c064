"""Op registration: torch.library.opcheck on every gdc op, the fake implementations' checks,
and torch.compile of a model step (on the CPU and, where present, on CUDA)."""
import pytest
import torch
from helpers import ce_args, check_compile_matches_eager
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from gdc_ext import CartoLoss, CartoState
from gdc_ext.layout import ACC_COLS, ACC_COUNT, ACC_LOSS_SUM, F_COLS_EXTRAS, I_COLS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recording,weighted,class_weight", [(True, True, True), (False, False, False),
                                                              (True, False, False)])
def test_opcheck_cross_entropy(device, dtype, recording, weighted, class_weight):
    logits, target, ids, sw, acc = ce_args(recording=recording, weighted=weighted, dtype=dtype, device=device)
    cw = torch.rand(logits.shape[1], device=device) if class_weight else None
    gs = torch.tensor([0.5], device=device)
    for compute_grad in (True, False):
        torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd,
                              (logits, target, cw, ids, sw, gs, acc, -100, 0.1, compute_grad))
    torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd_inplace,
                          (logits.clone(), target, cw, ids, sw, gs, acc, -100, 0.0))


def test_opcheck_scale_grad_and_end_epoch(device):
    torch.library.opcheck(torch.ops.gdc.scale_grad_, (torch.randn(4, 3, device=device),
                                                      torch.tensor(0.5, device=device)))
    torch.library.opcheck(torch.ops.gdc.scale_grad_, (torch.randn(4, 3, device=device), torch.rand(4, device=device)))
    s = CartoState(7, burn_in=2, eps=[0.5, 1.0], device=device)
    s.acc[:, ACC_LOSS_SUM] = torch.rand(7, device=device, dtype=torch.float64)
    s.acc[:4, ACC_COUNT] = 2.0
    torch.library.opcheck(torch.ops.gdc.end_epoch_, (s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps, 2))


def test_fully_ignored_rows(device):
    logits, target, ids, sw, acc = ce_args(R=8, V=300, device=device)
    target[:] = -100
    loss, nll, grad = torch.ops.gdc.cross_entropy_fwd(logits, target, None, ids, sw, torch.ones(1, device=device),
                                                      acc, -100, 0.0, True)
    assert torch.equal(loss.cpu(), torch.zeros(8)) and torch.equal(nll.cpu(), torch.zeros(8))
    assert torch.equal(grad.cpu(), torch.zeros(8, 300)) and not acc.any()


# ------------------------------------------------------------------------------- fake impls
def _ce_call(**change):
    """Arguments of a valid cross_entropy_fwd call (recording, weighted), with some replaced."""
    logits, target, ids, sw, acc = ce_args(R=6, V=9)
    args = dict(logits=logits, target=target, class_weight=torch.rand(9), sample_ids=ids, sample_weight=sw,
                grad_scale=torch.ones(1), acc=acc, ignore_index=-100, label_smoothing=0.0, compute_grad=True)
    args.update(change)
    return args


_BAD_CE_CALLS = {
    "logits_3d": dict(logits=torch.randn(6, 9, 1)),
    "logits_int": dict(logits=torch.zeros(6, 9, dtype=torch.int32)),
    "target_length": dict(target=torch.zeros(5, dtype=torch.int64)),
    "target_int32": dict(target=torch.zeros(6, dtype=torch.int32)),
    "weight_length": dict(class_weight=torch.rand(8)),
    "ids_length": dict(sample_ids=torch.zeros(5, dtype=torch.int64)),
    "ids_int32": dict(sample_ids=torch.zeros(6, dtype=torch.int32)),
    "acc_columns": dict(acc=torch.zeros(5, ACC_COLS - 1, dtype=torch.float64)),
    "acc_float32": dict(acc=torch.zeros(5, ACC_COLS)),
    "recording_without_ids": dict(sample_ids=torch.empty(0, dtype=torch.int64), sample_weight=torch.empty(0)),
    "weight_without_ids": dict(sample_ids=torch.empty(0, dtype=torch.int64), acc=torch.empty(0, ACC_COLS,
                                                                                             dtype=torch.float64)),
    "sample_weight_n": dict(sample_weight=torch.rand(4)),
    "smoothing": dict(label_smoothing=1.5),
    "grad_scale": dict(grad_scale=torch.ones(2)),
}


def _fake(args):
    mode = FakeTensorMode()
    return {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}, mode


def test_fake_accepts_a_valid_call():
    fake, mode = _fake(_ce_call())
    with mode:
        loss, nll, grad = torch.ops.gdc.cross_entropy_fwd(*fake.values())
    assert loss.shape == nll.shape == (6,) and loss.dtype == torch.float32 and grad.shape == (6, 9)


@pytest.mark.parametrize("case", list(_BAD_CE_CALLS))
def test_fake_rejects_what_the_kernel_rejects(case):
    """Under FakeTensorMode (torch.compile's tracing) a bad call raises the ValueError eager
    mode raises, naming the argument."""
    args = _ce_call(**_BAD_CE_CALLS[case])
    with pytest.raises(ValueError, match="gdc.cross_entropy") as eager:
        torch.ops.gdc.cross_entropy_fwd(*args.values())
    fake, mode = _fake(args)
    with pytest.raises(ValueError, match="gdc.cross_entropy") as traced, mode:
        torch.ops.gdc.cross_entropy_fwd(*fake.values())
    fake.pop("compute_grad")
    with pytest.raises(ValueError, match="gdc.cross_entropy"), mode:
        torch.ops.gdc.cross_entropy_fwd_inplace(*fake.values())
    word = str(eager.value).split(":")[1].split()[0]  # the argument the kernel names
    assert word in str(traced.value)


def test_fake_end_epoch_and_scale_grad_check_shapes():
    s = CartoState(5, burn_in=1, eps=[0.5, 1.0])
    mode = FakeTensorMode()
    good = [mode.from_tensor(t) for t in (s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps)]
    with mode:
        torch.ops.gdc.end_epoch_(*good, 1)
    bad = {1: torch.zeros(5, F_COLS_EXTRAS - 1, dtype=torch.float64), 2: torch.zeros(5, I_COLS, dtype=torch.int64),
           3: torch.zeros(5, 3, dtype=torch.int32), 0: torch.zeros(4, ACC_COLS, dtype=torch.float64)}
    for pos, t in bad.items():
        args = list(good)
        args[pos] = mode.from_tensor(t)
        with pytest.raises(ValueError, match="gdc.end_epoch"), mode:
            torch.ops.gdc.end_epoch_(*args, 1)
    with pytest.raises(ValueError, match="grad_output"), mode:
        torch.ops.gdc.scale_grad_(mode.from_tensor(torch.zeros(4, 3)), mode.from_tensor(torch.ones(3)))


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("inplace", [False, True])
def test_compile_training_step_records_like_eager(device, inplace):
    check_compile_matches_eager(inplace, device=device)


def test_compile_inductor_forward():
    V = 30
    x = torch.randn(10, V)
    t = torch.randint(0, V, (10,))
    lf = CartoLoss()
    fn = torch.compile(lambda a, b: lf(a, b), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, t), nn.functional.cross_entropy(x, t))


def test_no_grad_does_not_record_or_write_grad():
    s = CartoState(3, burn_in=1, eps=1.0)
    x = torch.randn(6, 5, requires_grad=True)
    before = x.detach().clone()
    with torch.no_grad():
        CartoLoss(state=s, inplace_grad=True)(x, torch.randint(0, 5, (6,)), torch.arange(3))
    assert s.acc.abs().sum() == 0
    assert torch.equal(x.detach(), before)
