"""The state's layout has one source, csrc/state_stats.def: the table compiled into the extension
(what Python reads) equals the file, every place that depends on it follows it (shapes, bytes per
sample, the fakes and the kernels for every group set, Scores' columns), and the compact default
state fits in 32 bytes per sample."""
import os
import re
import warnings

import pytest
import torch

import gdc_ext
from gdc_ext import CartoState, layout, ops, scores_columns

DEF_FILE = os.path.join(os.path.dirname(__file__), "..", "csrc", "state_stats.def")
GROUP_SETS = [g for g in range(1, layout.ALL_GROUPS + 1) if g & layout.CORE and not g & ~layout.ALL_GROUPS]


def _parse_def():
    """{macro: [argument lists]} of the declarations in csrc/state_stats.def, in file order."""
    out = {}
    with open(DEF_FILE) as fh:
        for line in fh:
            m = re.match(r"^(GDC_[A-Z]+)\(([^)]*)\)\s*(//.*)?$", line.strip())
            if m:
                out.setdefault(m.group(1), []).append([a.strip() for a in m.group(2).split(",")])
    return out


def test_compiled_table_equals_the_def_file():
    """A stale build (the .def edited, the extension not rebuilt) or a Python-side copy that drifted
    would show here."""
    d = _parse_def()
    assert [[n, int(b)] for n, b in d["GDC_GROUP"]] == layout.TABLE["groups"]
    assert d["GDC_TENSOR"] == layout.TABLE["tensors"]
    assert [s for (s,) in d["GDC_SOURCE"]] == layout.TABLE["sources"]
    assert d["GDC_SIGNAL"] == layout.TABLE["signals"]
    assert d["GDC_FOLD"] == layout.TABLE["folds"]
    assert d["GDC_STAT"] == layout.TABLE["stats"]
    assert layout.MAX_EPOCHS == 2 ** 15 - 1  # int16 counters


def test_table_is_coherent_with_python():
    """Every Scores column the table names has a derivation, reading statistics that feed it or
    core ones; every statistic's input and fold exist."""
    names = {s.name for s in layout.STATS}
    core = {s.name for s in layout.STATS if s.group == "core"}
    for s in layout.STATS:
        assert s.fold in layout.FOLDS and layout.FOLDS[s.fold] == s.tensor
        assert s.input in (layout.SOURCES if s.tensor == "acc" else set(layout.SIGNALS) | names)
        if s.scores != "none":
            col = scores_columns.COLUMNS[s.scores]
            assert s.name in col.stats, (s.name, s.scores)
            assert set(col.stats) <= core | {x.name for x in layout.STATS if x.group == s.group}
    for name, col in scores_columns.COLUMNS.items():
        assert set(col.stats) <= names, name
    assert layout.scores_columns(layout.CORE) == ("difficulty", "last_loss", "observed", "forgets_by_eps")
    assert layout.optional_scores_columns() == ("min_loss", "loss_mean", "loss_std", "grad_energy", "confidence",
                                                "variability", "accuracy_last", "correctness", "forgetting",
                                                "first_learned")
    assert layout.group_scores_columns("cartography") == layout.optional_scores_columns()[4:]


@pytest.mark.parametrize("K", [1, 3])
def test_bytes_per_sample(K):
    """The default state (one eps) is 30 bytes per sample, accumulator included (it was 88 with the
    then-default extras, 56 without); extras cost 24 more."""
    N = 1000
    for extras, per_sample in ((False, 28 + 2 * K), (True, 52 + 2 * K)):
        s = CartoState(N, burn_in=2, eps=[0.5 * (k + 1) for k in range(K)], extras=extras)
        assert s.nbytes() == N * per_sample + 8 + 8 * K
    assert CartoState(N, burn_in=2).nbytes() / N <= 32
    assert gdc_ext.Cartographer(num_samples=N, burn_in=2, eps=1.0).state.nbytes() / N <= 32


def test_state_tensors_follow_the_layout():
    for extras in (False, True):
        s = CartoState(4, burn_in=1, eps=[0.5, 1.0], extras=extras)
        assert s.groups == layout.groups_for(extras)
        for name, (dtype, shape) in layout.shapes(4, 2, s.groups).items():
            t = getattr(s, name)
            assert t.dtype == dtype and tuple(t.shape) == shape, name
        assert layout.acc_sources(s.groups) == (("nll", "one", "energy") if extras else ("nll", "one"))
        cols = layout.saved_columns(s.groups)
        assert s.state_dict()["meta"]["columns"] == cols
        assert cols["istats"] == ["diff_count", "observed"]  # transitions are derived, not stored


@pytest.mark.parametrize("groups", GROUP_SETS)
def test_fakes_and_kernels_agree_for_every_group_set(groups):
    """torch.library.opcheck (the fake's shapes against the kernel's, schema, autograd
    registration) of end_epoch_ and the recording cross-entropy ops, for each group set."""
    K, N = 2, 6
    extras, cartography = bool(groups & layout.EXTRAS), bool(groups & layout.CARTOGRAPHY)
    s = CartoState(N, burn_in=2, eps=[0.5, 1.5], extras=extras, cartography=cartography)
    assert s.groups == groups
    g = torch.Generator().manual_seed(groups)
    logits = torch.randn(10, 7, generator=g)
    target = torch.randint(0, 7, (10,), generator=g)
    ids = torch.randint(0, N, (10,), generator=g)
    args = (logits, target, None, ids, torch.empty(0), torch.ones(1), s.acc, -100, 0.0)
    torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd, (*args, True, groups))
    torch.library.opcheck(torch.ops.gdc.cross_entropy_fwd_inplace, (logits.clone(), *args[1:], groups))
    torch.library.opcheck(torch.ops.gdc.end_epoch_, (s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps, 2, groups))
    assert s.acc.shape[1] == layout.widths(groups, K)["acc"]


@pytest.mark.parametrize("bad", ["acc", "fstats", "istats", "forgets"])
def test_kernel_and_fake_refuse_a_tensor_of_another_layout(bad):
    """A core state's tensors with the extras group (or a tensor of the wrong dtype) raise the same
    ValueError from the kernel and from the fake, naming the tensor."""
    s = CartoState(5, burn_in=1, eps=0.5)
    ext = CartoState(5, burn_in=1, eps=0.5, extras=True)
    t = dict(s.tensors())
    if bad in ("acc", "fstats"):
        wrong_groups = layout.CORE | layout.EXTRAS  # core tensors, extras layout: acc / fstats too narrow
        args = (t["acc"], t["fstats"], t["istats"], t["forgets"], t["epoch"], t["eps"], 1, wrong_groups)
        if bad == "fstats":
            args = (ext.acc, t["fstats"], t["istats"], t["forgets"], t["epoch"], t["eps"], 1, wrong_groups)
    else:
        t[bad] = t[bad].to(torch.int32)  # the former int32 counters
        args = (t["acc"], t["fstats"], t["istats"], t["forgets"], t["epoch"], t["eps"], 1, layout.CORE)
    with pytest.raises(ValueError, match=bad):
        torch.ops.gdc.end_epoch_(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=bad):
            torch.ops.gdc.end_epoch_(*fake)


def test_groups_argument_is_checked():
    s = CartoState(3, burn_in=1, eps=0.5)
    for groups in (0, 2, 1 | 64):
        with pytest.raises(ValueError, match="groups"):
            torch.ops.gdc.end_epoch_(s.acc, s.fstats, s.istats, s.forgets, s.epoch, s.eps, 1, groups)
        with pytest.raises(ValueError, match="groups"):
            ops.cross_entropy_fwd(torch.randn(2, 3), torch.tensor([0, 1]), None, torch.tensor([0, 1]), torch.empty(0),
                                  torch.ones(1), s.acc, -100, 0.0, False, groups)


def test_ops_wrapper_infers_the_groups_from_the_widths():
    """ops.end_epoch_ without groups (callers written before the argument) folds like state.end_epoch."""
    a, b = (CartoState(4, burn_in=1, eps=[0.5, 1.0], extras=True) for _ in range(2))
    for s in (a, b):
        s.record(torch.tensor([0.2, 3.0, 1.0]), torch.tensor([0, 1, 3]))
    a.end_epoch()
    ops.end_epoch_(b.acc, b.fstats, b.istats, b.forgets, b.epoch, b.eps, b.burn_in)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


def test_core_statistics_do_not_depend_on_the_groups():
    """The same recorded stream gives bit-identical core columns with and without extras (the
    fold of each statistic reads only its declared inputs)."""
    g = torch.Generator().manual_seed(0)
    lean, full = CartoState(6, burn_in=2, eps=[0.4, 2.0]), CartoState(6, burn_in=2, eps=[0.4, 2.0], extras=True)
    for _ in range(5):
        logits = torch.randn(20, 9, generator=g) * 3
        target = torch.randint(0, 9, (20,), generator=g)
        ids = torch.randint(0, 6, (20,), generator=g)
        for s in (lean, full):
            gdc_ext.functional.cross_entropy(logits, target, ids, state=s, record=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lean.end_epoch()
            full.end_epoch()
    for name in ("acc", "fstats", "istats", "forgets"):
        for stat in layout.columns(name, layout.CORE):
            c_lean, c_full = layout.column(stat, lean.groups, 2), layout.column(stat, full.groups, 2)
            w = 2 if name == "forgets" else 1
            assert torch.equal(getattr(lean, name)[:, c_lean:c_lean + w], getattr(full, name)[:, c_full:c_full + w])
