"""Op registration: torch.library.opcheck on every gdc op, and torch.compile of a model step."""
import pytest
import torch
from torch import nn

from gdc_ext import CartoLoss, CartoState


def _ce_args(R=12, V=37, recording=True, weighted=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(R, V, generator=g).to(dtype)
    target = torch.randint(0, V, (R,), generator=g)
    target[3] = -100
    ids = torch.randint(0, 5, (R,), generator=g) if (recording or weighted) else torch.empty(0, dtype=torch.long)
    sw = torch.rand(5, generator=g) if weighted else torch.empty(0)
    acc = torch.zeros(5, 3, dtype=torch.float64) if recording else torch.empty(0, 3, dtype=torch.float64)
    return logits, target, ids, sw, acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recording,weighted,class_weight", [(True, True, True), (False, False, False),
                                                              (True, False, False)])
def test_opcheck_cross_entropy(dtype, recording, weighted, class_weight):
    logits, target, ids, sw, acc = _ce_args(recording=recording, weighted=weighted, dtype=dtype)
    cw = torch.rand(logits.shape[1]) if class_weight else None
    for compute_grad in (True, False):
        torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd,
                              (logits, target, cw, ids, sw, torch.tensor([0.5]), acc, -100, 0.1, compute_grad))
    torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd_inplace,
                          (logits.clone(), target, cw, ids, sw, torch.tensor([0.5]), acc, -100, 0.0))


def test_opcheck_scale_grad_and_end_epoch():
    torch.library.opcheck(torch.ops.gdc.scale_grad_, (torch.randn(4, 3), torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.gdc.scale_grad_, (torch.randn(4, 3), torch.rand(4)))
    s = CartoState(7, burn_in=2, eps=[0.5, 1.0])
    s.acc[:, 0] = torch.rand(7)
    s.acc[:4, 1] = 2.0
    torch.library.opcheck(torch.ops.gdc.end_epoch_, (s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps, 2))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def check_compile_matches_eager(inplace: bool, device: str = "cpu") -> None:
    """A model step with CartoLoss under torch.compile(fullgraph=True) gives eager's loss,
    gradients and recorded accumulators (also used by tests/test_cuda.py on CUDA)."""
    torch.manual_seed(0)
    V, B, L, N = 50, 4, 6, 8
    tokens = torch.randint(0, V, (B, L + 1)).to(device)
    ids = torch.tensor([1, 5, 2, 7], device=device)

    def run(compiled):
        torch.manual_seed(1)
        model = TinyLM(V).to(device)
        state = CartoState(N, burn_in=1, eps=1.0, device=device)
        loss_fn = CartoLoss(state=state, inplace_grad=inplace)

        def step(x, y, sid):
            logits = model(x).reshape(-1, V)
            return loss_fn(logits, y.reshape(-1), sid)

        fn = torch.compile(step, fullgraph=True) if compiled else step
        loss = fn(tokens[:, :-1], tokens[:, 1:], ids)
        loss.backward()
        loss = loss.detach()
        grads = [p.grad.clone() for p in model.parameters()]
        return loss, grads, state.acc.clone()

    l0, g0, a0 = run(False)
    l1, g1, a1 = run(True)
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a0)
    assert a0[ids, 1].tolist() == [L] * B


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_training_step_records_like_eager(inplace):
    check_compile_matches_eager(inplace)


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
