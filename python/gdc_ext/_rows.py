"""From nn.CrossEntropyLoss's input conventions to the kernel's rows: [R, V] logits, [R] targets
and [R] sample ids. Shared by the fused path and the torch fallback."""
from __future__ import annotations

import torch

from gdc_ext.ops import ArgumentError

__all__ = ["as_rows", "expand_sample_ids"]


def as_rows(input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] logits and [R] targets: class dimension moved last, like nn.CrossEntropyLoss reads it.

    input: [V] (one unbatched row), [B, V], or [B, V, d1, ..., dk]; target: [], [B] or
    [B, d1, ..., dk] to match. Raises ArgumentError naming the expected target shape.
    """
    if input.dim() == 1:
        return input.reshape(1, -1), target.reshape(1)
    if input.dim() == 2:
        if target.shape[0] != input.shape[0]:
            raise ArgumentError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0]}).")
        return input, target
    if input.shape[0] != target.shape[0] or input.shape[2:] != target.shape[1:]:
        raise ArgumentError(f"Expected target size {(input.shape[0],) + tuple(input.shape[2:])}, got "
                         f"{tuple(target.shape)}")
    return input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1)


def expand_sample_ids(sample_ids: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row int64 sample ids [rows] from the ids a caller passes.

    Two forms:
      * one id per token: any shape with ``rows`` elements, read in row-major order like the
        flattened target (the shape of ``target``, or e.g. [B, L] ids for a flattened [B*L]
        target);
      * one id per sequence: 1-D [B] with B dividing ``rows``, the rows being B equal
        consecutive groups (each sequence's tokens).
    Raises ArgumentError for anything else, naming both forms.
    """
    if not isinstance(sample_ids, torch.Tensor):
        try:
            sample_ids = torch.as_tensor(sample_ids, device=target.device)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError(f"sample_ids must be a tensor of integer ids, got "
                                f"{type(sample_ids).__name__}") from None
    if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
        raise ArgumentError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if sample_ids.device != target.device:
        raise ArgumentError(f"sample_ids is on {sample_ids.device} but target is on {target.device}")
    if sample_ids.numel() == rows:
        return sample_ids.reshape(-1).to(torch.int64).contiguous()
    if sample_ids.dim() == 1 and sample_ids.numel() > 0 and rows % sample_ids.numel() == 0:
        return sample_ids.to(torch.int64).repeat_interleave(rows // sample_ids.numel()).contiguous()
    raise ArgumentError(
        f"sample_ids must hold one id per token ({rows} ids in any shape, e.g. the shape of target "
        f"{tuple(target.shape)} or [B, L] for a flattened target) or be 1-D with one id per sequence, B "
        f"dividing the {rows} rows into equal groups; got shape {tuple(sample_ids.shape)}")
