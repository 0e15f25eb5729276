"""``vocab_parallel_linear_cross_entropy``: the vocabulary-parallel loss on plain (local) tensors.

Megatron-style tensor parallelism: every rank of ``group`` holds the same ``hidden`` and ``targets`` and
its own rows of the lm-head weight (and bias). DTensor arguments are handled by
:mod:`cce_inductor.distributed.dtensor` (this function forwards to it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..api import _autocast_like_linear, _check_target_range
from ..options import LossOptions
from . import vocab_parallel as _vp  # noqa: F401  (registers torch.ops.cce.vocab_parallel_*)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def check_local_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], reduction: str,
                       vocab_size: int) -> None:
    """Shape/dtype checks on one rank's local tensors (hidden [..., D], weight [V_local, D], bias [V_local])."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden must be [..., D] and the local weight [V_local, D]; got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"the local bias must have shape [V_local] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating-point tensor; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    stat = _vp._stat_dtype(hidden)
    if bias is not None and bias.dtype not in (hidden.dtype, stat):
        raise TypeError(f"bias dtype {bias.dtype} must be hidden's dtype ({hidden.dtype}) or the op's arithmetic "
                        f"dtype ({stat}: a bias eager would add in that precision)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices; got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if not isinstance(vocab_size, int) or vocab_size < weight.shape[0] or vocab_size < 1:
        raise ValueError(f"vocab_size must be the global vocabulary size (>= the {weight.shape[0]} local rows); "
                         f"got {vocab_size!r}")


def local_vocab_parallel_loss(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], *,
                              group_name: str, vocab_start: int, vocab_size: int, ignore_index: int,
                              reduction: str, label_smoothing: float, softcap: Optional[float],
                              logit_scale: float, return_lse: bool):
    """The op on local tensors, with flattening and the reduction around it (no autocast, no DTensor)."""
    check_local_inputs(hidden, weight, targets, bias, reduction, vocab_size)
    LossOptions(ignore_index, label_smoothing, softcap, logit_scale)  # validates the options
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()
    _check_target_range(targets, vocab_size, ignore_index)
    lead_shape = hidden.shape[:-1]
    flat_t = targets.reshape(-1)
    loss, lse = torch.ops.cce.vocab_parallel_forward(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_t, int(vocab_start), int(vocab_size), group_name,
        ignore_index, float(label_smoothing), None if softcap is None else float(softcap), float(logit_scale))
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:  # eager's mean: over non-ignored tokens (the targets are the same on every rank)
        loss = loss.sum() / (flat_t != ignore_index).sum()
    if return_lse:
        return loss, lse.reshape(lead_shape)
    return loss


def vocab_parallel_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                        bias: Optional[Tensor] = None, group: Optional[dist.ProcessGroup] = None,
                                        group_name: Optional[str] = None, vocab_size: Optional[int] = None,
                                        vocab_start: Optional[int] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        softcap: Optional[float] = None, logit_scale: float = 1.0,
                                        return_lse: bool = False):
    """Cross-entropy of ``softcap(logit_scale * F.linear(hidden, W, b))`` with ``W`` split by rows over a
    process group, without materialising the logits (at most a token chunk × V_local at a time).

    Plain tensors (Megatron style): ``hidden [..., D]`` and ``targets`` (global class ids) are the same on
    every rank of ``group`` (default: the world; or give its ``group_name``); ``weight [V_local, D]`` and
    ``bias [V_local]`` are this rank's rows ``[vocab_start, vocab_start + V_local)`` of the ``[V, D]`` weight.
    ``vocab_size`` (the global ``V``) is required; ``vocab_start=None`` means the ``torch.chunk`` layout
    (``ceil(V / world)`` rows per rank, in rank order).

    DTensors: ``weight`` (and ``bias``) ``Shard(0)`` on a 1-D mesh — the lm-head of ``ColwiseParallel`` —
    with ``hidden`` a DTensor on that mesh (any placement; it is made ``Replicate``) or a plain tensor that
    is the same on every rank. The result is then a ``Replicate`` DTensor when ``hidden`` is a DTensor.

    Returns the loss as ``cce_inductor.linear_cross_entropy`` would on the whole weight (the same on every
    rank; ``return_lse`` adds the per-token log-sum-exp over the whole vocabulary). In the backward each
    rank gets the gradient of its own weight/bias rows and the full (all-reduced) gradient of ``hidden``.
    """
    if _is_dtensor(weight) or _is_dtensor(hidden) or _is_dtensor(bias):
        from .dtensor import dtensor_vocab_parallel_linear_cross_entropy

        if group is not None or group_name is not None or vocab_start is not None:
            raise ValueError("with DTensor arguments the group and the vocabulary layout come from the DTensor; "
                             "do not pass group / group_name / vocab_start")
        return dtensor_vocab_parallel_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
            allow_plain_hidden=True, vocab_size=vocab_size)
    if vocab_size is None:
        raise ValueError("vocab_size (the global vocabulary size V) is required with plain tensors")
    if group_name is None:
        group_name = _vp.group_name_of(group)
    elif group is not None:
        raise ValueError("pass group or group_name, not both")
    hidden, weight, bias = _autocast_like_linear(hidden, weight, bias)
    return local_vocab_parallel_loss(
        hidden, weight, targets, bias, group_name=group_name, vocab_start=-1 if vocab_start is None else vocab_start,
        vocab_size=vocab_size, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
