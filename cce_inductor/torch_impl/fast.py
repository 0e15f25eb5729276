"""The fast path in plain PyTorch: the CPU implementation and the reference of the Triton one.

``forward(hidden, weight, bias, targets, opts, reduction, ...) -> (loss 0-d, d_hidden, d_weight, d_bias)``:
the loss (``reduction`` "mean" or "sum" of the per-token losses) and its gradients for an upstream
gradient of 1, computed together in one pass over token chunks with 3 matmuls per chunk (logits,
d_hidden rows, d_weight accumulation). Arithmetic is float32 (float64 for float64 inputs) from the
matmul on; d_weight is accumulated in that precision and rounded once at the end, so the result is at
least as exact as eager PyTorch's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.dtypes import stat_dtype
from ..core.reduce import reduce_loss, reduction_weight
from ..options import LossOptions
from .common import logits_chunk, per_row, rows_per_chunk, target_status, through_epilogue_


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: LossOptions,
            reduction: str, *, need_d_hidden: bool = True, need_d_weight: bool = True, need_d_bias: bool = True,
            tokens_per_chunk: Optional[int] = None):
    """(loss 0-d [stat dtype], d_hidden [N, D] input dtype | None, d_weight [V, D] | None,
    d_bias [V] stat dtype | None)."""
    n, v = hidden.shape[0], weight.shape[0]
    cd = stat_dtype(hidden)
    dev = hidden.device
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    eps = opts.label_smoothing
    coef = reduction_weight(targets, opts.ignore_index, reduction, cd)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_d_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=cd, device=dev) if need_d_weight else None
    d_bias = torch.zeros(v, dtype=cd, device=dev) if (need_d_bias and bias is not None) else None
    loss_rows = torch.empty(n, dtype=cd, device=dev)
    step = tokens_per_chunk or rows_per_chunk(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(cd)
        z, th = logits_chunk(h, w, b, opts)
        valid, bad, idx = target_status(targets[s:e], v, opts.ignore_index)
        target_z = z.gather(1, idx[:, None]).squeeze(1)
        mean_z = z.mean(dim=-1) if eps else None
        row_max = z.amax(dim=-1, keepdim=True)
        # z becomes exp(z - max) in place, then the softmax
        p = z.sub_(row_max).exp_()
        sum_exp = p.sum(dim=-1)
        lse = sum_exp.log().add_(row_max.squeeze(1))
        nll = lse - target_z
        if eps:
            nll = (1 - eps) * nll + eps * (lse - mean_z)
        loss_rows[s:e] = per_row(nll, valid, bad)
        g = per_row(coef.expand(e - s), valid, bad)  # the row weight
        dz = p.div_(sum_exp[:, None]).mul_(g[:, None])  # softmax * row weight, in place
        dz.scatter_add_(1, idx[:, None], (-(1 - eps) * g)[:, None])
        if eps:
            dz -= (g * (eps / v))[:, None]
        through_epilogue_(dz, th, opts)
        if d_hidden is not None:
            d_hidden[s:e] = (dz @ w).to(hidden.dtype)
        if d_weight is not None:
            d_weight += dz.T @ h
        if d_bias is not None:
            d_bias += dz.sum(dim=0)
    loss = reduce_loss(loss_rows, targets, opts.ignore_index, reduction, None)
    return loss, d_hidden, None if d_weight is None else d_weight.to(weight.dtype), d_bias
