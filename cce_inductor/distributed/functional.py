"""``vocab_parallel_linear_cross_entropy``: the vocabulary-parallel loss on plain (local) tensors.

Megatron-style tensor parallelism: every rank of ``group`` holds the same ``hidden`` and ``targets`` and
its own rows of the lm-head weight (and bias). DTensor arguments are handled by
:mod:`cce_inductor.distributed.dtensor` (this function forwards to it); both end in :mod:`.local`.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from ..core.checks import is_dtensor
from ..core.dtypes import autocast_like_linear
from . import vocab_parallel as _vp
from .dtensor import dtensor_vocab_parallel_linear_cross_entropy
from .local import local_vocab_parallel_loss


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
    if is_dtensor(weight) or is_dtensor(hidden) or is_dtensor(bias):
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
    hidden, weight, bias = autocast_like_linear(hidden, weight, bias)
    return local_vocab_parallel_loss(
        hidden, weight, targets, bias, group_name=group_name, vocab_start=-1 if vocab_start is None else vocab_start,
        vocab_size=vocab_size, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
