"""NaN logits in the cross-entropy kernels, at the places where a NaN used to be dropped on CUDA
(the first value a thread reads: the last column of a short row, the head of a row that does not
start on a 16-byte boundary, a first vector chunk of only NaN and -inf).

The contract on every device: the row's loss is NaN (never a finite value). With recording, the
CPU raises ValueError and leaves the state unchanged; CUDA cannot raise without a host sync, so
it skips the whole batch instead, which leaves the state unchanged too.
"""
import pytest
import torch
from gdc_ext.layout import ACC_COLS

import gdc_ext  # noqa: F401  (loads torch.ops.gdc)

# `device`: the conftest fixture (cpu, and cuda where a GPU is present, marked `cuda`)

N_SAMPLES = 4


def _rows(R, V, dtype, device, offset=0, seed=0):
    """[R, V] finite logits whose storage starts `offset` elements into a flat buffer (a view, but
    contiguous), so offset = 1 puts every row start off the 16-byte boundary of the buffer."""
    g = torch.Generator().manual_seed(seed)
    buf = (torch.randn(R * V + offset, generator=g) * 2).to(dtype).to(device)
    return buf[offset:].view(R, V)


def _acc(device):
    """A non-zero epoch accumulator [N, ACC_COLS] (a default state's), so that any write to it shows."""
    return torch.arange(N_SAMPLES * ACC_COLS, dtype=torch.float64, device=device).reshape(N_SAMPLES, ACC_COLS) + 1.0


def _run(logits, acc, inplace=False):
    """Calls the op with sample ids, recording into acc unless it is empty; returns the loss rows."""
    device = logits.device
    R, V = logits.shape
    target = (torch.arange(R, device=device) * 3) % V
    ids = torch.arange(R, device=device) % N_SAMPLES
    args = (target, None, ids, torch.empty(0, device=device), torch.tensor([0.5], device=device), acc, -100, 0.0)
    if inplace:
        loss, _ = torch.ops.gdc.cross_entropy_fwd_inplace(logits, *args)
    else:
        loss, _, _ = torch.ops.gdc.cross_entropy_fwd(logits, *args, True)
    return loss.cpu()


def _copy(logits):
    """A copy at the same storage offset (so at the same 16-byte alignment): a plain clone()
    starts at offset 0, which would silently drop the unaligned-head case."""
    off = logits.storage_offset()
    out = logits.new_empty(logits.numel() + off)[off:].view(logits.shape)
    out.copy_(logits)
    return out


def _check(logits, bad_row, device, inplace=False):
    """The row `bad_row` holds a NaN: loss NaN there and finite elsewhere without recording; with
    recording, a ValueError (CPU) or a skipped batch (CUDA), and the state unchanged either way."""
    loss = _run(_copy(logits), torch.empty(0, dtype=torch.float64, device=device), inplace)
    assert torch.isnan(loss[bad_row]), f"row {bad_row}: a NaN logit gave the finite loss {loss[bad_row]}"
    ok = torch.ones(len(loss), dtype=torch.bool)
    ok[bad_row] = False
    assert torch.isfinite(loss[ok]).all()

    acc = _acc(device)
    if device == "cpu":
        with pytest.raises(ValueError, match="non-finite loss"):
            _run(_copy(logits), acc, inplace)
    else:
        loss = _run(_copy(logits), acc, inplace)  # no host sync, so no raise: NaN loss instead
        assert torch.isnan(loss[bad_row])
    assert torch.equal(acc.cpu(), _acc("cpu")), "a batch with a NaN row changed the CartoState"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_nan_in_last_column_of_short_rows(device, dtype, inplace):
    # V = 7: rows are shorter than one float32 vector pair / one bf16 vector, and start at every
    # alignment; the NaN is the last (tail) element a thread reads.
    R, V = 8, 7
    for r in range(R):
        x = _rows(R, V, dtype, device)
        x[r, V - 1] = float("nan")
        _check(x, r, device, inplace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_head_of_unaligned_row(device, dtype):
    # Rows start one element past the buffer start: column 1 is in the scalar head before the
    # first 16-byte boundary.
    R, V = 5, 40
    for r in range(R):
        x = _rows(R, V, dtype, device, offset=1)
        assert x.is_contiguous() and x.storage_offset() == 1 and _copy(x).storage_offset() == 1
        x[r, 1] = float("nan")
        _check(x, r, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_with_only_neg_inf_in_first_vector(device, dtype):
    # Row 0 starts aligned; its first 16-byte vector holds only -inf and one NaN, so the NaN is the
    # only value there that is not -inf (the max over the vector is -inf without the NaN).
    R, V = 3, 64
    n = 16 // torch.tensor([], dtype=dtype).element_size()
    x = _rows(R, V, dtype, device)
    x[0, :n] = float("-inf")
    x[0, 1] = float("nan")
    x[1, 0] = 30.0  # a finite row whose first vector is not special
    _check(x, 0, device)
