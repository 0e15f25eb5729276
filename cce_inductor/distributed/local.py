"""The vocabulary-parallel loss on one rank's local tensors: the dispatch of the tensor-parallel entries
(checks, flattening, the op, the reduction), shared by the plain-tensor and the DTensor entry."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.checks import check_inputs, check_target_range
from ..core.reduce import reduce_loss
from ..options import LossOptions
from . import vocab_parallel as _vp  # noqa: F401  (registers torch.ops.cce.vocab_parallel_*)


def local_vocab_parallel_loss(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], *,
                              group_name: str, vocab_start: int, vocab_size: int, ignore_index: int,
                              reduction: str, label_smoothing: float, softcap: Optional[float],
                              logit_scale: float, return_lse: bool):
    """The op on local tensors, with flattening and the reduction around it (no autocast, no DTensor)."""
    check_inputs(hidden, weight, targets, bias, reduction=reduction, vocab_size=vocab_size)
    LossOptions(ignore_index, label_smoothing, softcap, logit_scale)  # validates the options
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()
    check_target_range(targets, vocab_size, ignore_index)
    lead_shape = hidden.shape[:-1]
    flat_t = targets.reshape(-1)
    loss, lse, _ = torch.ops.cce.vocab_parallel_forward(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_t, int(vocab_start), int(vocab_size), group_name,
        ignore_index, float(label_smoothing), None if softcap is None else float(softcap), float(logit_scale))
    # the targets are the same on every rank, so the mean's count is too
    loss = reduce_loss(loss, flat_t, ignore_index, reduction, lead_shape)
    if return_lse:
        return loss, lse.reshape(lead_shape)
    return loss
