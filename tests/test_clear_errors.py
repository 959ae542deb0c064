"""Issue 17, item 10: every error names its argument and has the documented type (ArgumentError
for the loss's arguments, ValueError elsewhere); the `gdc` CLI prints one line on stderr and
exits 2 for bad input and I/O errors, never a traceback."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gdc_ext
from gdc_ext import ArgumentError, CartoLoss, CartoSampler, CartoState, Cartographer, cli, functional
from gdc_ext.cartography import prune, score_values


def _snapshot(s):
    return {k: v.clone() for k, v in s.tensors().items()}


def _assert_unchanged(s, before):
    for k, v in s.tensors().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------- uint8 targets
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_uint8_target_behaves_like_torch_and_records_like_int64(reduction, ignore_index):
    """torch accepts uint8 class indices for [B, V] input: so does gdc_ext, recording what the
    int64 target records (it failed inside recording with a gather() message)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g)
    t = torch.randint(0, 7, (6,), generator=g)
    t[2] = 3
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    states, losses, grads = [], [], []
    for target in (t, t.to(torch.uint8)):
        s = CartoState(4, burn_in=1)
        xg = x.clone().requires_grad_()
        out = functional.cross_entropy(xg, target, ids, state=s, reduction=reduction, ignore_index=ignore_index)
        out.sum().backward()
        states.append(s)
        losses.append(out.detach())
        grads.append(xg.grad)
    ref = F.cross_entropy(x, t.to(torch.uint8), reduction=reduction, ignore_index=ignore_index)
    torch.testing.assert_close(losses[1], ref)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    assert states[1].acc.any()
    assert torch.equal(states[0].acc, states[1].acc)


def test_uint8_target_through_cartoloss_and_linear_cross_entropy():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 6, generator=g), torch.randint(0, 6, (5,), generator=g)
    a, b = CartoState(5, burn_in=1), CartoState(5, burn_in=1)
    CartoLoss(state=a)(x.clone().requires_grad_(), t, torch.arange(5)).backward()
    CartoLoss(state=b)(x.clone().requires_grad_(), t.to(torch.uint8), torch.arange(5)).backward()
    assert torch.equal(a.acc, b.acc)
    h, w = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g)
    c, d = CartoState(5, burn_in=1), CartoState(5, burn_in=1)
    la = gdc_ext.linear_cross_entropy(h, w, t, torch.arange(5), state=c, record=True)
    lb = gdc_ext.linear_cross_entropy(h, w, t.to(torch.uint8), torch.arange(5), state=d, record=True)
    # the plain computation (F.linear_cross_entropy needs torch >= 2.13; the suite also runs on 2.11)
    torch.testing.assert_close(lb, F.cross_entropy(h @ w.T, t))
    assert torch.equal(la, lb) and torch.equal(c.acc, d.acc)


@pytest.mark.parametrize("with_state", [False, True])
def test_uint8_target_for_k_dim_input_is_refused_naming_target(with_state):
    """torch refuses uint8 targets of [B, V, d...] input ("expected scalar type Long but found
    Byte", no argument named): an ArgumentError (also a RuntimeError, torch's type) naming target."""
    x = torch.randn(2, 5, 3, requires_grad=True)
    t = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, t)
    s = CartoState(2, burn_in=1) if with_state else None
    ids = torch.arange(2) if with_state else None
    with pytest.raises(ArgumentError, match="target") as info:
        CartoLoss(state=s)(x, t, ids)
    assert isinstance(info.value, RuntimeError) and "uint8" in str(info.value)
    if with_state:
        assert not s.acc.any()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.bool])
def test_other_integer_targets_are_refused_naming_target(dtype):
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.zeros(4, dtype=dtype)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, t)
    s = CartoState(4, burn_in=1)
    with pytest.raises(ArgumentError, match="target"):
        CartoLoss(state=s)(x, t, torch.arange(4))
    with pytest.raises(ArgumentError, match="target"):
        gdc_ext.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), t, torch.arange(4), state=s)
    assert not s.acc.any()


# ------------------------------------------------------------------------------- CartoState arguments
@pytest.mark.parametrize("eps", ["abc", "0.1", None, [[0.1, 0.2]], [0.1, [0.2]], True, [0.1, False], {0.1: 1},
                                 torch.tensor([[0.1]]), torch.tensor([1, 2]) > 0, 1 + 2j, object(), 10 ** 400,
                                 [0.1, 10 ** 400]])
def test_bad_eps_names_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        CartoState(4, burn_in=1, eps=eps)


@pytest.mark.parametrize("eps, expected, single", [
    (torch.tensor(0.5), [0.5], True), (np.float32(0.5), [0.5], True), (np.array(0.25), [0.25], True),
    (torch.tensor([0.5, 1.0]), [0.5, 1.0], False), (np.array([0.5, 2]), [0.5, 2.0], False), ((1, 2), [1.0, 2.0], False),
])
def test_tensor_and_numpy_eps_are_accepted(eps, expected, single):
    s = CartoState(3, burn_in=1, eps=eps)
    assert s.eps.tolist() == expected
    assert s.scores().single_eps is single


@pytest.mark.parametrize("name, value", [("num_samples", 1e12), ("num_samples", "5"), ("num_samples", None),
                                         ("num_samples", True), ("num_samples", torch.tensor([5])),
                                         ("burn_in", 2.0), ("burn_in", "1"), ("burn_in", None), ("burn_in", False)])
def test_bad_sizes_name_the_argument(name, value):
    kw = dict(num_samples=4, burn_in=1)
    kw[name] = value
    with pytest.raises(ValueError, match=name):
        CartoState(**kw)


def test_numpy_and_0d_tensor_sizes_are_accepted():
    s = CartoState(np.int64(4), burn_in=np.int32(2))
    assert (s.num_samples, s.burn_in) == (4, 2) and type(s.num_samples) is int
    s = CartoState(torch.tensor(3), burn_in=torch.tensor(1))
    assert (s.num_samples, s.burn_in) == (3, 1)


# ------------------------------------------------------------------------------- seeds
BAD_SEEDS = [-1, 1.5, "x", None, True, 2 ** 70, np.float64(3.0)]


@pytest.fixture(scope="module")
def scores():
    s = CartoState(6, burn_in=1)
    for _ in range(2):
        s.record(torch.rand(6, generator=torch.Generator().manual_seed(0)), torch.arange(6))
        s.end_epoch()
    return s.scores()


@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_bad_seeds_name_seed(seed, scores):
    calls = [lambda: CartoSampler(torch.ones(6), seed=seed),
             lambda: score_values(scores, "random", seed=seed),
             lambda: score_values(scores, "memorization", seed=seed),
             lambda: prune(scores, 0.5, by="random", seed=seed),
             lambda: scores.quadrants(by="random", seed=seed),
             lambda: Cartographer(6, 2, 0.1, seed=seed)]
    for call in calls:
        with pytest.raises(ValueError, match="seed"):
            call()


def test_bad_seed_names_seed_in_data_map(scores):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from gdc_ext.plot import data_map

    with pytest.raises(ValueError, match="seed"):
        data_map(scores, seed=-1)


def test_numpy_int_seeds_are_accepted(scores):
    s = CartoSampler(torch.ones(6), seed=np.int64(3))
    assert s.seed == 3 and type(s.seed) is int
    assert list(s) == list(CartoSampler(torch.ones(6), seed=3))
    assert torch.equal(score_values(scores, "random", seed=np.int64(3)), score_values(scores, "random", seed=3))
    c = Cartographer(6, 2, 0.1, seed=np.int64(3))
    assert type(c.seed) is int and json.dumps(c.config())


# ------------------------------------------------------------------------------- record counts
@pytest.mark.parametrize("counts", [1e308, 10 ** 400, float(2 ** 60), "tensor", "product", "batch_sum"])
def test_record_refuses_overflowing_counts(counts):
    s = CartoState(4, burn_in=1)
    s.record(torch.ones(4), torch.arange(4))
    before = _snapshot(s)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    if counts == "tensor":
        counts = torch.tensor([1.0, 1e308, 1.0, 1.0], dtype=torch.float64)
    elif counts == "product":  # each within the bound, the product is not finite
        losses = torch.tensor([1.0, 1e300, 3.0, 4.0], dtype=torch.float64)
        counts = torch.tensor([1.0, 1e10, 1.0, 1.0], dtype=torch.float64)
    elif counts == "batch_sum":  # finite per row, infinite once two rows of one id are summed
        losses = torch.tensor([1e308, 1e308, 1.0, 1.0], dtype=torch.float64)
        counts = None
    with pytest.raises(ValueError, match="counts|losses"):
        s.record(losses, torch.tensor([0, 0, 1, 2]), counts=counts)
    _assert_unchanged(s, before)
    s.end_epoch()
    assert torch.isfinite(s.scores().last_loss).all()


def test_record_accepts_large_but_bounded_counts():
    s = CartoState(2, burn_in=1)
    s.record(torch.tensor([1.0, 2.0]), torch.arange(2), counts=float(2 ** 40))
    s.record(torch.tensor([1.0, 2.0]), torch.arange(2), counts=np.int64(7))
    s.end_epoch()
    assert s.scores().last_loss.tolist() == [1.0, 2.0]


# ------------------------------------------------------------------------------- damaged state files
def _state_file(tmp_path, meta_edit, name="s.safetensors"):
    from safetensors.torch import save_file

    s = CartoState(5, burn_in=1)
    meta = s._meta()
    meta = meta_edit(meta)
    p = tmp_path / name
    save_file({k: v.contiguous() for k, v in s.tensors().items()}, p,
              metadata={"gdc_ext": meta if isinstance(meta, str) else json.dumps(meta)})
    return str(p)


def _set(key, value):
    def edit(m):
        m[key] = value
        return m
    return edit


def _drop(key):
    def edit(m):
        del m[key]
        return m
    return edit


DAMAGED = {
    "meta a list": (lambda m: [1, 2], "metadata"),
    "meta a string": (lambda m: "just text", "metadata"),
    "meta a number": (lambda m: 3, "metadata"),
    "no num_samples": (_drop("num_samples"), "num_samples"),
    "no eps": (_drop("eps"), "eps"),
    "no eps_scalar": (_drop("eps_scalar"), "eps_scalar"),
    "no extras": (_drop("extras"), "extras"),
    "no burn_in": (_drop("burn_in"), "burn_in"),
    "no version": (_drop("version"), "version"),
    "num_samples a string": (_set("num_samples", "5"), "num_samples"),
    "num_samples a float": (_set("num_samples", 5.0), "num_samples"),
    "num_samples huge float": (_set("num_samples", 1e12), "num_samples"),
    "burn_in a list": (_set("burn_in", [1]), "burn_in"),
    "eps a string": (_set("eps", "abc"), "eps"),
    "eps empty": (_set("eps", []), "eps"),
    "eps negative": (_set("eps", [-0.1]), "eps"),
    "eps beyond float64": (_set("eps", [10 ** 400]), "eps"),
    "eps nested": (_set("eps", [[0.1]]), "eps"),
    "eps_scalar a string": (_set("eps_scalar", "yes"), "eps_scalar"),
    "eps_scalar with two eps": (lambda m: dict(m, eps=[0.1, 0.2]), "eps_scalar"),
    "extras a string": (_set("extras", "no"), "extras"),
    "format foreign": (_set("format", "other"), "format|CartoState"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_metadata_is_a_value_error_naming_file_and_field(tmp_path, case, capsys):
    edit, field = DAMAGED[case]
    path = _state_file(tmp_path, edit)
    with pytest.raises(ValueError, match=field) as info:
        CartoState.load(path)
    assert "s.safetensors" in str(info.value)
    assert cli.main(["report", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and re.search(field, err)


def test_non_utf8_metadata_is_a_value_error_naming_the_file(tmp_path):
    good = _state_file(tmp_path, lambda m: m)
    data = bytearray(open(good, "rb").read())
    data[data.find(b"gdc_ext.CartoState") + 3] = 0xFF
    bad = tmp_path / "bytes.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bytes.safetensors"):
        CartoState.load(bad)


# ------------------------------------------------------------------------------- the gdc CLI
@pytest.fixture(scope="module")
def state_path(tmp_path_factory):
    s = CartoState(30, burn_in=1, eps=[0.5, 1.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        s.record(torch.rand(30, generator=g) * 3, torch.arange(30))
        s.end_epoch()
    p = tmp_path_factory.mktemp("cli") / "state.safetensors"
    s.save(p)
    return str(p)


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gdc") and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("meta", [[1, 2], "text"])
def test_cli_metadata_not_an_object_is_one_line(tmp_path, capsys, meta):
    path = _state_file(tmp_path, lambda m: meta)
    for cmd in (["report", path], ["select", path, "--prune", "0.5"], ["plot", path, "-o", str(tmp_path / "m.png")]):
        assert cli.main(cmd) == 2
        _one_error_line(capsys.readouterr().err)


def test_cli_num_samples_too_large_to_allocate_is_one_line(tmp_path, capsys):
    """A crafted file claiming 10**15 samples (the allocation fails) is an error line, not a traceback."""
    path = _state_file(tmp_path, _set("num_samples", 10 ** 15))
    assert cli.main(["report", path]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "state.safetensors" in line or "s.safetensors" in line


@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
@pytest.mark.parametrize("cmd", ["report", "select", "plot"])
def test_cli_bad_seed_is_one_line(state_path, tmp_path, capsys, seed, cmd):
    extra = {"report": [], "select": ["--prune", "0.5"], "plot": ["-o", str(tmp_path / "m.png")]}[cmd]
    assert cli.main([cmd, state_path, "--by", "random", "--seed", seed, *extra]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--seed" in line


def _gdc(*args, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "gdc_ext.cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["report", "--json"], ["report"], ["select", "--prune", "0.5"]])
def test_cli_stdout_on_a_full_device_is_one_line(state_path, args):
    with open("/dev/full", "w") as full:
        p = _gdc(args[0], state_path, *args[1:], stdout=full)
        _, err = p.communicate()
    assert p.returncode == 2, err
    assert "No space left" in _one_error_line(err)


def test_cli_stdout_oserror_in_process_is_one_line(state_path, capsys, monkeypatch):
    import errno

    class Full:
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Full())
    assert cli.main(["report", state_path]) == 2
    assert "No space left" in _one_error_line(capsys.readouterr().err)


def test_cli_broken_pipe_exits_quietly(tmp_path):
    """`gdc report --json | head -1`: the reader goes away; Python's docs recipe: no traceback,
    no 'Exception ignored' message, status 1. The report (2000 candidates) is larger than a pipe's
    buffer, so gdc meets the closed pipe however late the reader closes it."""
    s = CartoState(2000, burn_in=1)
    for _ in range(2):
        s.record(torch.rand(2000, generator=torch.Generator().manual_seed(1)), torch.arange(2000))
        s.end_epoch()
    s.save(tmp_path / "big.safetensors")
    p = _gdc("report", str(tmp_path / "big.safetensors"), "--json", "--top-k", "2000")
    assert p.stdout.readline()  # read a little, as head does, then go away
    p.stdout.close()
    err = p.stderr.read()
    p.wait()
    p.stderr.close()
    assert p.returncode == 1, err
    assert err == "", err


def test_cli_plot_to_an_existing_directory_writes_inside_it(state_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "figs"
    out_dir.mkdir()
    assert cli.main(["plot", state_path, "-o", str(out_dir)]) == 0
    written = out_dir / "data_map.png"
    assert written.is_file() and not (tmp_path / "figs.png").exists()
    assert capsys.readouterr().out.strip() == f"wrote {written}"


def test_cli_plot_without_extension_prints_the_path_written(state_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    target = tmp_path / "map"
    assert cli.main(["plot", state_path, "-o", str(target)]) == 0
    assert (tmp_path / "map.png").is_file() and not target.exists()
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'map.png'}"


def test_cli_plot_unsupported_extension_is_one_line(state_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", state_path, "-o", str(tmp_path / "map.nope")]) == 2
    _one_error_line(capsys.readouterr().err)
