"""Per-token loss -> the ``reduction`` eager ``F.cross_entropy`` applies (plain PyTorch: the compiler sees it)."""
from __future__ import annotations

from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(per_token: Tensor, flat_targets: Tensor, ignore_index: int, reduction: str, lead_shape) -> Tensor:
    """``per_token`` [N] (0 on ignored tokens) reduced as eager does: "none" -> ``lead_shape``, "sum", or
    "mean" = sum over the non-ignored tokens / their count (NaN when every token is ignored)."""
    if reduction == "none":
        return per_token.reshape(lead_shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (flat_targets != ignore_index).sum()


def reduction_weight(targets: Tensor, ignore_index: int, reduction: str, dtype) -> Tensor:
    """The 0-d factor d(reduced loss)/d(per-token loss) of a valid token: 1/count for "mean" (count = the
    non-ignored tokens, at least 1, computed on the device: no host synchronisation), 1 for "sum"."""
    if reduction == "mean":
        return 1.0 / (targets != ignore_index).sum().clamp_min(1).to(dtype)
    if reduction == "sum":
        return targets.new_ones((), dtype=dtype)
    raise ValueError(f"a scalar loss is 'mean' or 'sum', got {reduction!r}")
