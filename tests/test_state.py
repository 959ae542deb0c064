"""CartoState: O(N) memory, persistence, resume, and bad input that leaves the state unchanged."""
import os

import numpy as np
import pytest
import torch

from gdc_ext import CartoLoss, CartoState
from gdc_ext.state import FORMAT_VERSION


def _batches(seed, n_epochs, N=9, V=23):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_epochs):
        ep = []
        for _ in range(3):
            ids = torch.randperm(N, generator=g)[:4]
            x = torch.randn(4 * 3, V, generator=g) * float(torch.rand((), generator=g) * 6)
            t = torch.randint(0, V, (12,), generator=g)
            ep.append((x, t, ids))
        out.append(ep)
    return out


def _train(state, epochs, end=True):
    lf = CartoLoss(state=state)
    for ep in epochs:
        for x, t, ids in ep:
            lf(x.clone().requires_grad_(), t, ids).backward()
        if end:
            state.end_epoch()


def _assert_same_state(a, b):
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


def test_state_bytes_do_not_grow_with_epochs():
    s = CartoState(9, burn_in=2, eps=[0.5, 1.0, 2.0])
    n0 = s.nbytes()
    shapes0 = {k: tuple(v.shape) for k, v in s.tensors().items()}
    _train(s, _batches(0, 6))
    assert s.nbytes() == n0
    assert {k: tuple(v.shape) for k, v in s.tensors().items()} == shapes0
    # per-sample cost (csrc/state_stats.def, the compact layout): 28 + 2K bytes, 52 + 2K with extras,
    # plus the epoch counter and eps; 30 bytes for the default state (one eps)
    assert n0 == 9 * (28 + 2 * 3) + 8 + 8 * 3
    assert CartoState(9, burn_in=2, eps=0.5, extras=True).nbytes() == 9 * (52 + 2) + 8 + 8
    assert CartoState(9, burn_in=2).nbytes() == 9 * 30 + 8 + 8


def test_save_load_round_trip(tmp_path):
    s = CartoState(9, burn_in=2, eps=[0.5, 1.0])
    _train(s, _batches(1, 3))
    p = tmp_path / "state.safetensors"
    s.save(p)
    r = CartoState.load(p)
    _assert_same_state(s, r)
    assert r.burn_in == 2 and r.scores().eps == (0.5, 1.0)
    a, b = s.scores(), r.scores()
    np.testing.assert_array_equal(a.memorization.numpy(), b.memorization.numpy())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("mid_epoch", [False, True])
def test_resume_is_bit_identical(tmp_path, mid_epoch):
    epochs = _batches(2, 5)
    full = CartoState(9, burn_in=3, eps=[0.7, 1.5])
    _train(full, epochs)

    part = CartoState(9, burn_in=3, eps=[0.7, 1.5])
    _train(part, epochs[:2])
    if mid_epoch:  # half an epoch recorded before the save
        _train(part, [epochs[2][:1]], end=False)
    p = tmp_path / "ckpt.safetensors"
    part.save(p)
    del part
    resumed = CartoState.load(p)
    if mid_epoch:
        _train(resumed, [epochs[2][1:]])
        _train(resumed, epochs[3:])
    else:
        _train(resumed, epochs[2:])
    _assert_same_state(full, resumed)

    sd = CartoState(9, burn_in=3, eps=[0.7, 1.5])
    sd.load_state_dict(resumed.state_dict())
    _assert_same_state(full, sd)


def test_load_rejects_bad_files(tmp_path):
    s = CartoState(5, burn_in=1, eps=0.5)
    p = tmp_path / "s.safetensors"
    s.save(p)
    with pytest.raises(FileNotFoundError, match="no state file"):
        CartoState.load(tmp_path / "missing.safetensors")
    data = bytearray(p.read_bytes())
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated.safetensors"):
        CartoState.load(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError):
        CartoState.load(garbage)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a CartoState"):
        CartoState.load(foreign)
    import json
    sd = {k: v for k, v in s.state_dict().items() if k != "meta"}
    meta = dict(s.state_dict()["meta"], version=FORMAT_VERSION + 1)
    future = tmp_path / "future.safetensors"
    save_file(sd, future, metadata={"gdc_ext": json.dumps(meta)})
    with pytest.raises(ValueError, match="version"):
        CartoState.load(future)


def test_load_state_dict_mismatch_leaves_state_unchanged():
    a = CartoState(5, burn_in=1, eps=0.5)
    _train(a, _batches(3, 2, N=5))
    before = {k: v.clone() for k, v in a.tensors().items()}
    for other in (CartoState(6, burn_in=1, eps=0.5), CartoState(5, burn_in=2, eps=0.5),
                  CartoState(5, burn_in=1, eps=[0.5, 1.0])):
        with pytest.raises(ValueError, match="mismatched state"):
            a.load_state_dict(other.state_dict())
    sd = a.state_dict()
    sd["forgets"][0, 0] = 99  # forgets > transitions (= observed - 1)
    with pytest.raises(ValueError, match="counters"):
        a.load_state_dict(sd)
    for k, v in a.tensors().items():
        assert torch.equal(v, before[k])


def test_constructor_validation():
    for bad in [dict(num_samples=0), dict(num_samples=3.5), dict(burn_in=0), dict(eps=-1.0), dict(eps=[]),
                dict(eps=float("nan"))]:
        kw = dict(num_samples=4, burn_in=1, eps=0.5)
        kw.update(bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            CartoState(**kw)


def _snapshot(s):
    return {k: v.clone() for k, v in s.tensors().items()}


@pytest.mark.parametrize("case", ["id_high", "id_negative", "nan_logits", "inf_logits", "target_range",
                                  "ids_shape", "ids_float", "wrong_rank", "wrong_dtype"])
def test_bad_input_raises_and_leaves_state_unchanged(case):
    s = CartoState(4, burn_in=1, eps=0.5)
    lf = CartoLoss(state=s)
    lf(torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,)), torch.tensor([0, 1])).backward()
    before = _snapshot(s)
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))
    ids = torch.tensor([2, 3])
    exc, match = ValueError, "sample_ids"
    if case == "id_high":
        ids = torch.tensor([2, 4])
    elif case == "id_negative":
        ids = torch.tensor([-1, 3])
    elif case == "nan_logits":
        x = x.detach().clone()
        x[5, 2] = float("nan")
        x.requires_grad_()
        match = "input"
    elif case == "inf_logits":
        x = x.detach().clone()
        x[1, 0] = float("inf")
        x.requires_grad_()
        match = "input"
    elif case == "target_range":
        t[3] = 5
        exc, match = IndexError, "target"
    elif case == "ids_shape":
        ids = torch.tensor([0, 1, 2])
    elif case == "ids_float":
        ids = torch.tensor([0.0, 1.0])
    elif case == "wrong_rank":
        x = torch.randn(2, 4, 5, 3, requires_grad=True)  # target shape no longer matches
        exc, match = (ValueError, RuntimeError), "target|Expected"
    elif case == "wrong_dtype":
        t = t.float()  # float targets of the wrong shape: not probabilities either
        exc, match = (ValueError, RuntimeError), "target"
    with pytest.raises(exc, match=match):
        lf(x, t, ids).backward()
    after = _snapshot(s)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_state_on_other_n_is_rejected_by_sample_weights():
    lf = CartoLoss(state=CartoState(4, burn_in=1, eps=0.5))
    with pytest.raises(ValueError, match="N = 4"):
        lf.set_sample_weights(torch.ones(5))
    with pytest.raises(ValueError, match="state"):
        CartoLoss(state="not a state")


def test_ids_of_ignored_tokens_are_not_checked():
    """Padding tokens may carry any id (-1 say) as long as their target is ignore_index."""
    s = CartoState(3, burn_in=1, eps=0.5)
    t = torch.tensor([1, 2, -100, -100])
    ids = torch.tensor([0, 2, -1, -1])
    CartoLoss(state=s)(torch.randn(4, 5, requires_grad=True), t, ids).backward()
    assert s.acc[:, 1].tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("eps", [7.0, [5.0, 7.0, 9.0]])
def test_scores_accessors_are_shape_stable(eps):
    s = CartoState(9, burn_in=2, eps=eps)
    _train(s, _batches(4, 5))
    sc = s.scores()
    tracked = [eps] if isinstance(eps, float) else eps
    K = len(tracked)
    assert sc.memorization_by_eps.shape == (9, K) and sc.memorization_by_eps.dtype == torch.float64
    assert sc.forgets_by_eps.shape == (9, K) and sc.forgets_by_eps.dtype == torch.int32
    assert int(sc.forgets_by_eps.sum()) > 0  # a history with forget events
    for k, e in enumerate(tracked):
        for query in (e, e * (1 + 1e-9), np.float32(e)):  # np.isclose to a tracked threshold
            assert torch.equal(sc.memorization_at(query), sc.memorization_by_eps[:, k])
            assert torch.equal(sc.forgets_at(query), sc.forgets_by_eps[:, k])
        transitions = sc.transitions.double()
        expected = torch.where(transitions > 0, sc.forgets_at(e).double() / transitions.clamp(min=1), 0.0)
        assert torch.equal(sc.memorization_at(e), expected)
    assert torch.equal(sc.memorization_at(), sc.memorization_by_eps[:, 0])
    assert torch.equal(sc.forgets_at(None), sc.forgets_by_eps[:, 0])
    # the convenience properties keep their shape: [N] for a float eps, [N, K] for a sequence
    if isinstance(eps, float):
        assert sc.memorization.shape == (9,) and sc.forgets.shape == (9,)
    else:
        assert sc.memorization.shape == (9, K) and sc.forgets.shape == (9, K)
    assert torch.equal(sc.memorization.reshape(9, -1), sc.memorization_by_eps)
    for bad in (0.7, 3.0, "1.0", True):
        with pytest.raises(ValueError, match=r"eps.*\[" + str(tracked[0])):  # lists the tracked thresholds
            sc.memorization_at(bad)
        with pytest.raises(ValueError, match="eps"):
            sc.forgets_at(bad)
