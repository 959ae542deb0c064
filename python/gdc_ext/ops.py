"""Python face of the `torch.ops.gdc` kernels: thin wrappers that translate argument conventions,
fake (meta) implementations for torch.compile that check shapes and dtypes like the kernels do,
and the autograd Function around the fused cross-entropy. The work of choosing inputs (rows,
ids, reduction) lives in :mod:`gdc_ext.functional`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from gdc_ext import _C  # noqa: F401  (loads the kernels and their schemas)
from gdc_ext._reduction import reduce_rows
from gdc_ext import layout
from gdc_ext.layout import ACC_COLS, CORE

__all__ = ["cross_entropy_fwd", "cross_entropy_fwd_inplace", "scale_grad_", "end_epoch_", "ArgumentError",
           "TargetIndexError"]

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TargetIndexError(IndexError, ValueError):
    """A target class index is out of range. An IndexError like torch's, and a ValueError."""


class ArgumentError(ValueError, RuntimeError):
    """An invalid argument to the loss (class weight of the wrong size, label_smoothing outside
    [0, 1], target of the wrong shape or dtype, bad reduction, bad sample ids or state, ...).

    Both a ValueError and a RuntimeError: ``nn.CrossEntropyLoss`` raises one or the other
    depending on the argument (RuntimeError for the class weight, label_smoothing and most target
    shapes; ValueError for batch-size mismatches and the reduction), and callers written against
    either (or against gdc_ext's earlier ValueError) keep working. Raised in eager mode; inside a
    compiled graph the kernels' shape checks raise the plain ValueError at trace time.
    """


# ---------------------------------------------------------------------------------------- fakes
# The fakes raise ValueError, like the kernels' TORCH_CHECK_VALUE, so a compiled graph rejects a
# bad call at trace time with the same type of error eager mode gives.
def _check_groups(groups, op: str) -> None:
    torch._check_value(not isinstance(groups, bool) and isinstance(groups, int) and bool(groups & CORE)
                       and not groups & ~layout.ALL_GROUPS,
                       lambda: f"{op}: groups must be a bit set of the state's statistic groups with core (1) set and "
                               f"no unknown bit (all: {layout.ALL_GROUPS}), got {groups}")


def _check_ce_inputs(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc, label_smoothing,
                     groups=CORE):
    """The shape and dtype contract of gdc::cross_entropy_fwd(_inplace) (csrc/ce_call.cpp)."""
    _check_float_matrix(logits, "gdc.cross_entropy: input (logits)", "rows, classes")
    R, V = logits.shape
    torch._check_value(target.dim() == 1 and target.shape[0] == R,
                       lambda: f"gdc.cross_entropy: target must be 1-D with one class index per row ({R}), "
                               f"got {target.shape}")
    torch._check_value(target.dtype == torch.int64, lambda: f"gdc.cross_entropy: target must be int64, got "
                                                            f"{target.dtype}")
    if class_weight is not None:
        torch._check_value(class_weight.dim() == 1 and class_weight.shape[0] == V,
                           lambda: f"gdc.cross_entropy: weight must be 1-D with one value per class ({V}), "
                                   f"got {class_weight.shape}")
    torch._check_value(0.0 <= label_smoothing <= 1.0,
                       lambda: f"gdc.cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    torch._check_value(grad_scale.numel() == 1, lambda: "gdc.cross_entropy: grad_scale must hold one value")
    has_ids = sample_ids.numel() > 0
    if has_ids:
        torch._check_value(sample_ids.dim() == 1 and sample_ids.shape[0] == R and sample_ids.dtype == torch.int64,
                           lambda: f"gdc.cross_entropy: sample_ids must be int64 [{R}] (one id per row) or empty, "
                                   f"got {sample_ids.shape} {sample_ids.dtype}")
    _check_groups(groups, "gdc.cross_entropy")
    if acc.numel() > 0:
        cols = layout.widths(groups, 1)["acc"]
        torch._check_value(acc.dim() == 2 and acc.shape[1] == cols and acc.dtype == torch.float64,
                           lambda: f"gdc.cross_entropy: acc must be a contiguous float64 [N, {cols}] epoch accumulator "
                                   f"(the state's groups = {groups}), got {acc.shape} {acc.dtype}")
        torch._check_value(has_ids or R == 0, lambda: "gdc.cross_entropy: recording into a state needs sample_ids")
    if sample_weight.numel() > 0:
        torch._check_value(has_ids, lambda: "gdc.cross_entropy: sample_weight needs sample_ids")
        torch._check_value(sample_weight.dim() == 1,
                           lambda: f"gdc.cross_entropy: sample_weight must be 1-D [N], got {sample_weight.shape}")
        if acc.numel() > 0:
            torch._check_value(sample_weight.shape[0] == acc.shape[0],
                               lambda: f"gdc.cross_entropy: sample_weight has {sample_weight.shape[0]} entries but "
                                       f"the CartoState has N = {acc.shape[0]}")


def _check_float_matrix(x, what: str, dims: str) -> None:
    """``x`` must be a 2-D [dims] tensor of a float dtype the kernels take (``what`` names it)."""
    torch._check_value(x.dim() == 2, lambda: f"{what} must be 2-D [{dims}], got {x.shape}")
    torch._check_value(x.dtype in _LOGITS_DTYPES,
                       lambda: f"{what} must be float32, bfloat16, float16 or float64, got {x.dtype}")


@torch.library.register_fake("gdc::cross_entropy_fwd")
def _ce_fwd_fake(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc, ignore_index,
                 label_smoothing, compute_grad, groups=CORE):
    _check_ce_inputs(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc, label_smoothing,
                     groups)
    R = logits.shape[0]
    loss = logits.new_empty((R,), dtype=torch.float32)
    nll = logits.new_empty((R,), dtype=torch.float32)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty((0,))
    return loss, nll, grad


@torch.library.register_fake("gdc::cross_entropy_fwd_inplace")
def _ce_fwd_inplace_fake(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                         ignore_index, label_smoothing, groups=CORE):
    _check_ce_inputs(logits, target, class_weight, sample_ids, sample_weight, grad_scale, acc, label_smoothing,
                     groups)
    R = logits.shape[0]
    return logits.new_empty((R,), dtype=torch.float32), logits.new_empty((R,), dtype=torch.float32)


@torch.library.register_fake("gdc::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    torch._check_value(grad.numel() == 0 or grad_output.numel() == 1
                       or (grad_output.dim() == 1 and grad_output.shape[0] == grad.shape[0]),
                       lambda: f"gdc.scale_grad: grad_output must be a scalar or have one value per row "
                               f"({grad.shape[0] if grad.dim() else 0}), got {grad_output.shape}")
    return None


@torch.library.register_fake("gdc::end_epoch_")
def _end_epoch_fake(acc, fstats, istats, forgets, epoch, eps, burn_in, groups=CORE):
    """The state's contract (csrc/epoch_checks.h): eps [K] float64, then acc, fstats, istats and
    forgets [N, columns] with the dtypes and widths that csrc/state_stats.def gives ``groups``
    (gdc_ext.layout.shapes)."""
    op = "gdc.end_epoch"
    _check_groups(groups, op)
    torch._check_value(eps.dim() == 1 and eps.shape[0] >= 1 and eps.dtype == torch.float64,
                       lambda: f"{op}: eps must be float64 [K] with K >= 1, got {eps.shape} {eps.dtype}")
    K = eps.shape[0]
    N = acc.shape[0] if acc.dim() == 2 else None
    for name, t in (("acc", acc), ("fstats", fstats), ("istats", istats), ("forgets", forgets)):
        dtype, (_, cols) = layout.shapes(0, K, groups)[name]
        ok = t.dim() == 2 and (N is None or t.shape[0] == N) and t.shape[1] == cols and t.dtype == dtype
        msg = (f"{op}: {name} must be {str(dtype).replace('torch.', '')} [N, {cols}]"
               f"{'' if N is None or name == 'acc' else f' with N = {N}'} (groups = {groups}, K = {K}), got "
               f"{t.shape} {t.dtype}")
        torch._check_value(ok, lambda msg=msg: msg)
    torch._check_value(epoch.numel() == 1 and epoch.dtype == torch.int64,
                       lambda: f"{op}: epoch must be a single int64, got {epoch.shape} {epoch.dtype}")
    torch._check_value(burn_in >= 0, lambda: f"{op}: burn_in must be >= 0, got {burn_in}")
    return None


# ------------------------------------------------------------------------------------- wrappers
def _call(op, *args):
    """Runs a cross-entropy op; in eager mode an out-of-range target surfaces as TargetIndexError
    (an IndexError like torch's, and a ValueError) and the kernels' argument checks
    (TORCH_CHECK_VALUE) as ArgumentError (a ValueError and a RuntimeError). Compiled graphs raise
    the plain IndexError / ValueError."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except IndexError as e:
        raise TargetIndexError(_message(e)) from None
    except ValueError as e:
        raise ArgumentError(_message(e)) from None


def _message(e: Exception) -> str:
    """The kernel's message without the C++ backtrace torch appends."""
    return str(e).split("\nException raised from")[0]


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, class_weight: Optional[torch.Tensor],
                      sample_ids: torch.Tensor, sample_weight: torch.Tensor, grad_scale: torch.Tensor,
                      acc: torch.Tensor, ignore_index: int, label_smoothing: float,
                      compute_grad: bool, groups: int = CORE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused cross-entropy forward (and gradient) over rows of logits.

    Args:
        logits: [R, V] float32/bfloat16/float16/float64, contiguous.
        target: [R] int64 class indices (``ignore_index`` rows are skipped).
        class_weight: optional [V] class weights.
        sample_ids: [R] int64 sample id per row, or an empty tensor.
        sample_weight: [N] float per-sample loss weights, or an empty tensor.
        grad_scale: one-element float tensor folded into the gradient (1/denominator for 'mean').
        acc: [N, columns] float64 epoch accumulator updated in place, or an empty tensor (no
            recording); its columns are those of a state with the statistic ``groups``
            (:func:`gdc_ext.layout.columns`; ``state.groups``, default core only).
    Returns:
        loss_rows [R] float32, nll_rows [R] float32 (0 where ignored), grad [R, V] (or [0]).
    """
    return _call(torch.ops.gdc.cross_entropy_fwd, logits, target, class_weight, sample_ids, sample_weight, grad_scale,
                 acc, ignore_index, label_smoothing, compute_grad, groups)


def cross_entropy_fwd_inplace(logits: torch.Tensor, target: torch.Tensor, class_weight: Optional[torch.Tensor],
                              sample_ids: torch.Tensor, sample_weight: torch.Tensor, grad_scale: torch.Tensor,
                              acc: torch.Tensor, ignore_index: int, label_smoothing: float,
                              groups: int = CORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`cross_entropy_fwd` (same arguments but ``compute_grad``) with the gradient
    written over ``logits``; returns loss_rows [R] and nll_rows [R] float32."""
    return _call(torch.ops.gdc.cross_entropy_fwd_inplace, logits, target, class_weight, sample_ids, sample_weight,
                 grad_scale, acc, ignore_index, label_smoothing, groups)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place (scalar, or [R] per row); skipped when the scalar is 1."""
    torch.ops.gdc.scale_grad_(grad, grad_output)


def end_epoch_(acc: torch.Tensor, fstats: torch.Tensor, istats: torch.Tensor, forgets: torch.Tensor,
               epoch: torch.Tensor, eps: torch.Tensor, burn_in: int, groups: Optional[int] = None) -> None:
    """Folds the epoch accumulators into the per-sample statistics (see csrc/epoch_math.h and
    docs/method.md); shapes as in :func:`_end_epoch_fake`. ``groups``: the state's statistic
    groups (``state.groups``); None: the one whose layout has these tensors' widths."""
    if groups is None:
        groups = layout.infer_groups(eps.shape[0] if eps.dim() == 1 else 1, acc=acc.shape[-1], fstats=fstats.shape[-1],
                                     istats=istats.shape[-1], forgets=forgets.shape[-1]) or CORE
    torch.ops.gdc.end_epoch_(acc, fstats, istats, forgets, epoch, eps, int(burn_in), int(groups))


# ------------------------------------------------------------------------ warnings under compile
_TRACE_WARNED: set = set()


@torch.library.custom_op("gdc_ext::warn_while_tracing", mutates_args=())
def warn_while_tracing(x: torch.Tensor, message: str) -> None:
    """Gives ``message`` as a UserWarning, once per process, while torch.compile traces the call;
    does nothing when run. dynamo cannot trace warnings.warn (a graph break, an error under
    fullgraph=True), but an op's fake runs as plain Python while the graph is traced. ``x``: any
    tensor of the traced code (an op needs one to be dispatched)."""


@warn_while_tracing.register_fake
def _warn_while_tracing_fake(x, message):
    if message not in _TRACE_WARNED:
        _TRACE_WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=2)


# ------------------------------------------------------------------------------------- autograd
class _FusedCE(torch.autograd.Function):
    """Autograd around the fused kernel: the gradient is computed in forward and only scaled by
    grad_output in backward (in place, skipped when grad_output is 1).

    forward(logits [R, V], target [R], weight [V] or None, ids [R] or empty, sw [N] or empty,
    grad_scale [1], acc [N, columns] or empty, ignore_index, smoothing, reduction, inplace,
    denom 0-d for 'mean', else None, groups: the state's statistic groups) -> the reduced loss
    (0-d, or [R] for 'none').
    """

    @staticmethod
    def forward(ctx, logits, target, weight, ids, sw, grad_scale, acc, ignore_index, smoothing, reduction,
                inplace, denom, groups):
        if inplace:
            loss_rows, _ = cross_entropy_fwd_inplace(logits, target, weight, ids, sw, grad_scale, acc,
                                                     ignore_index, smoothing, groups)
            # The kernel wrote the gradient over the logits behind autograd's back (a C++ op has
            # no ADInplaceOrView kernel, and mark_dirty does not apply: the output is the loss,
            # not the logits). Bumping their version counter makes any other op that saved them
            # for backward (a z-loss computed first, say) raise autograd's "modified by an
            # inplace operation" error instead of using the overwritten values. Our own
            # save_for_backward below records the bumped version.
            torch.autograd.graph.increment_version(logits)
            grad = logits
        else:
            loss_rows, _, grad = cross_entropy_fwd(logits, target, weight, ids, sw, grad_scale, acc,
                                                   ignore_index, smoothing, True, groups)
        ctx.save_for_backward(grad)
        return reduce_rows(loss_rows, reduction, denom)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("cross_entropy (CartoLoss)", "torch.nn.functional.cross_entropy")
        _consume_once(ctx, "cross_entropy (CartoLoss)")
        (grad,) = ctx.saved_tensors
        _scale_grads_((grad,), grad_out)
        return grad, None, None, None, None, None, None, None, None, None, None, None, None


def _refuse_double_backward(op: str, alternative: str) -> None:
    """Refuses backward with create_graph=True over a fused op (``op`` names it; ``alternative``
    is the unfused computation that supports it).

    The gradients are computed by the kernel in forward, outside autograd, so they are constants
    to autograd: with create_graph=True the returned gradient would silently lack every
    second-order term through the loss (a gradient penalty on it would be wrong). The engine
    runs backward with grad mode set to create_graph, so grad mode here means create_graph=True.
    Checked before _consume_once, so the same graph can still be differentiated once without
    create_graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"gdc_ext {op}: double backward is not supported: backward was called with "
                           f"create_graph=True (a gradient penalty or another higher-order derivative), but the "
                           f"fused kernel computes the gradient in forward, so it is not differentiable and the "
                           f"second-order terms would be missing. Use {alternative} for higher-order gradients, "
                           f"or call backward / torch.autograd.grad without create_graph=True")


def _consume_once(ctx, op: str) -> None:
    """Refuses a second backward over one forward pass of a fused op (``op`` names it).

    The gradients were computed in forward and are scaled in place in backward, so a second
    backward over the same graph (retain_graph=True) would scale them twice."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(f"gdc_ext {op}: backward ran twice over one forward pass; the gradients are "
                           f"precomputed and scaled in place, so call the loss again instead of retain_graph=True")
    ctx.consumed = True


def _scale_grads_(grads: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> None:
    """Scales each precomputed gradient in place by the scalar grad_output of the reduced loss."""
    go = grad_out.to(torch.float32).contiguous()
    for g in grads:
        scale_grad_(g, go)


# ------------------------------------------------------------------ fused linear + cross-entropy
__all__ += ["linear_cross_entropy_fwd"]


@torch.library.register_fake("gdc::linear_cross_entropy_fwd")
def _lce_fwd_fake(input, weight, bias, target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                  ignore_index, label_smoothing, chunk_size, compute_grad_input, compute_grad_weight,
                  compute_grad_bias, groups=CORE):
    """The contract of gdc::linear_cross_entropy_fwd (csrc/linear_cross_entropy.cpp): input [R, H],
    weight [V, H] and bias [V] of one float dtype, then the cross-entropy contract on [R, V]."""
    _check_float_matrix(input, "gdc.linear_cross_entropy: input", "rows, hidden")
    R, H = input.shape
    _check_linear_param(weight, "linear_weight", weight.dim() == 2 and weight.shape[1] == H,
                        f"2-D [classes, hidden] with hidden = {H} (the input's last dimension)", input)
    V = weight.shape[0]
    if bias is not None:
        _check_linear_param(bias, "linear_bias", bias.dim() == 1 and bias.shape[0] == V,
                            f"1-D with one value per class ({V})", input)
    torch._check_value(chunk_size >= 0, lambda: f"gdc.linear_cross_entropy: chunk_size must be >= 0 (0: automatic), "
                                                f"got {chunk_size}")
    # The [R, V] logits the kernel never builds: a fake stands in for them in the shared checks.
    _check_ce_inputs(input.new_empty((R, V)), target, class_weight, sample_ids, sample_weight, grad_scale, acc,
                     label_smoothing, groups)
    loss = input.new_empty((R,), dtype=torch.float32)
    nll = input.new_empty((R,), dtype=torch.float32)
    # each gradient only if its flag is set (a bias gradient also needs a bias), else empty
    grad_input = input.new_empty((R, H)) if compute_grad_input else input.new_empty((0,))
    grad_weight = weight.new_empty((V, H)) if compute_grad_weight else input.new_empty((0,))
    grad_bias = input.new_empty((V,)) if compute_grad_bias and bias is not None else input.new_empty((0,))
    return loss, nll, grad_input, grad_weight, grad_bias


def _check_linear_param(param, name: str, shape_ok: bool, expected_shape: str, input) -> None:
    """A parameter of the linear layer (``name``): the shape described by ``expected_shape``
    (``shape_ok`` says whether it has it) and the input's dtype."""
    torch._check_value(shape_ok, lambda: f"gdc.linear_cross_entropy: {name} must be {expected_shape}, "
                                         f"got {param.shape}")
    torch._check_value(param.dtype == input.dtype,
                       lambda: f"gdc.linear_cross_entropy: {name} is {param.dtype} but input is {input.dtype} "
                               f"(expected the same dtype)")


def linear_cross_entropy_fwd(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             target: torch.Tensor, class_weight: Optional[torch.Tensor], sample_ids: torch.Tensor,
                             sample_weight: torch.Tensor, grad_scale: torch.Tensor, acc: torch.Tensor,
                             ignore_index: int, label_smoothing: float, chunk_size: int,
                             compute_grad: bool = False, *, compute_grad_input: Optional[bool] = None,
                             compute_grad_weight: Optional[bool] = None,
                             compute_grad_bias: Optional[bool] = None, groups: int = CORE) -> tuple[torch.Tensor, ...]:
    """Fused linear + cross-entropy over rows, without the [R, V] logits.

    Args:
        input: [R, H] float32/bfloat16/float16/float64 hidden states.
        weight: [V, H] output projection (input's dtype and device); bias: [V] or None.
        target, class_weight, sample_ids, sample_weight, grad_scale, acc, ignore_index,
            label_smoothing: as :func:`cross_entropy_fwd` (acc is updated once, after all chunks).
        chunk_size: rows per chunk; 0 chooses it from the shapes (the logits chunk takes at most
            CPU: max(64 MiB, min(weight bytes, logits bytes / 4)); CUDA: max(64 MiB, input bytes
            / 8); see csrc/linear_cross_entropy.cpp).
        compute_grad: also return the gradients of sum(loss_rows * grad_scale) (the default of
            each of the three flags below).
        compute_grad_input, compute_grad_weight, compute_grad_bias: compute that gradient (None:
            ``compute_grad``). A frozen weight (LoRA) skips the dW matmuls and the [V, H] buffer.
        groups: the statistic groups of the state that owns ``acc`` (``state.groups``).
    Returns:
        loss_rows [R] float32, nll_rows [R] float32, grad_input [R, H], grad_weight [V, H] and
        grad_bias [V] (input's dtype; each empty when not computed, grad_bias empty without bias).
    """
    flags = tuple(compute_grad if f is None else f
                  for f in (compute_grad_input, compute_grad_weight, compute_grad_bias))
    return _call(torch.ops.gdc.linear_cross_entropy_fwd, input, weight, bias, target, class_weight, sample_ids,
                 sample_weight, grad_scale, acc, ignore_index, label_smoothing, chunk_size, *flags, groups)


class _FusedLinearCE(torch.autograd.Function):
    """Autograd around gdc::linear_cross_entropy_fwd.

    'mean' and 'sum': the gradients (input, weight, bias) are computed in forward and only scaled
    by the scalar grad_output in backward, in place (skipped when it is 1), like _FusedCE.
    'none': a per-row grad_output cannot be applied to the weight gradient after the fact
    (dW = G^T diag(grad_output) X), so forward computes no gradient and backward runs the chunk
    loop again with grad_output folded in as per-row sample weights (ids = 0..R-1), without
    recording: one more forward's worth of matmuls, still without the [R, V] logits.

    Only the gradients asked for are computed (``needs``: input, weight, bias; the functional
    derives it from requires_grad, so a frozen LM head skips the dW matmuls and the [V, H]
    buffer); backward returns None for the others.

    forward(input [R, H], weight [V, H], bias [V] or None, target [R], class_weight [V] or None,
    ids [R] or empty, sw [N] or empty, grad_scale [1], acc [N, columns] or empty, ignore_index,
    smoothing, reduction, chunk_size, denom (0-d for 'mean', else None), needs (three bools, or
    None: ctx.needs_input_grad of input, weight, bias), groups (the state's statistic groups))
    -> the reduced loss (0-d, or [R] for 'none').
    """

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, ids, sw, grad_scale, acc, ignore_index, smoothing,
                reduction, chunk_size, denom, needs=None, groups=CORE):
        per_row = reduction == "none"
        if needs is None:
            needs = tuple(ctx.needs_input_grad[:3])
        # a bias gradient needs a bias
        needs = (bool(needs[0]), bool(needs[1]), bool(needs[2]) and bias is not None)
        flags = (False, False, False) if per_row else needs
        loss_rows, _, gx, gw, gb = linear_cross_entropy_fwd(input, weight, bias, target, class_weight, ids, sw,
                                                            grad_scale, acc, ignore_index, smoothing, chunk_size,
                                                            compute_grad_input=flags[0],
                                                            compute_grad_weight=flags[1],
                                                            compute_grad_bias=flags[2], groups=groups)
        ctx.per_row = per_row
        ctx.needs = needs
        if per_row:
            ctx.args = (ignore_index, smoothing, chunk_size)
            ctx.save_for_backward(input, weight, bias, target, class_weight, ids, sw)
        else:
            ctx.save_for_backward(gx, gw, gb)
        return reduce_rows(loss_rows, reduction, denom)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("linear_cross_entropy", "torch.nn.functional.linear + cross_entropy")
        _consume_once(ctx, "linear_cross_entropy")
        if ctx.per_row:
            grads = _per_row_backward(ctx, grad_out)
        else:
            grads = ctx.saved_tensors
            _scale_grads_(tuple(g for g, need in zip(grads, ctx.needs) if need), grad_out)
        gx, gw, gb = (g if need else None for g, need in zip(grads, ctx.needs))
        nones = (None,) * 13
        return (gx, gw, gb) + nones


def _per_row_backward(ctx, grad_out):
    """The gradients of sum(loss_rows * grad_out) for reduction='none' (see _FusedLinearCE)."""
    input, weight, bias, target, class_weight, ids, sw = ctx.saved_tensors
    ignore_index, smoothing, chunk_size = ctx.args
    R = input.shape[0]
    row_w = grad_out.to(torch.float32).reshape(R)
    if sw.numel() > 0:  # the loss of row r is sw[ids[r]] * ce_r
        row_w = row_w * sw.to(torch.float32)[ids.clamp(0, sw.numel() - 1)]
    row_ids = torch.arange(R, device=input.device)
    no_acc = torch.empty((0, ACC_COLS), dtype=torch.float64, device=input.device)
    ones = torch.ones(1, dtype=torch.float32, device=input.device)
    need_x, need_w, need_b = ctx.needs
    _, _, gx, gw, gb = linear_cross_entropy_fwd(input, weight, bias, target, class_weight, row_ids,
                                                row_w.contiguous(), ones, no_acc, ignore_index, smoothing,
                                                chunk_size, compute_grad_input=need_x,
                                                compute_grad_weight=need_w, compute_grad_bias=need_b)
    return gx, gw, gb
