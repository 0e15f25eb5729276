"""The low-memory op in plain PyTorch, on any device: exact, memory bounded by a token chunk × vocabulary.

This is the CPU implementation (and the one for dtypes the Triton kernels do not take, e.g. float64, and
where they do not fit the device). Same contract as the Triton kernels (``kernels.triton_forward`` /
``kernels.triton_backward``):

    forward(hidden [N, D], weight [V, D], bias [V] | None, targets [N], opts) -> (loss [N], lse [N]; float32, float64 for float64 inputs)
        with_entropy=True: (loss, lse, entropy [N]), the entropy of softmax(z) per token
    backward(grad_loss [N], grad_lse [N] | None, hidden, weight, bias, targets, lse, opts,
             grad_entropy=None, entropy=None)
        -> (d_hidden [N, D], d_weight [V, D] | None (need_d_weight=False), d_bias [V] | None)
    jvp(hidden, weight, bias, targets, lse, t_hidden, t_weight, t_bias, opts, entropy=None)
        -> (t_loss [N], t_lse [N], t_entropy [N] | None)
        forward-mode AD (tangents may be None); any device, every input dtype.

Entropy: with p = softmax(z), ``H = lse - Σ_j p_j z_j = -Σ_j p_j log p_j``, computed per row from the same
pass as the lse (``H = log S0 - S1 / S0`` with ``S0 = Σ exp(z - m)``, ``S1 = Σ exp(z - m) (z - m)``,
``m`` the row max: no cancellation against ``lse``). Its gradient is ``dH/dz_k = -p_k (log p_k + H)``
(= ``p_k (E[z] - z_k)``), taken through the softcap and the scale as the loss's is.

bias may be float32 with 16-bit hidden/weight (it is added in float32).

Logits exist only one token chunk at a time (``common.rows_per_chunk``); arithmetic is float32 (float64 for
float64 inputs) from the matmul on, so the result is at least as exact as eager PyTorch's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.dtypes import stat_dtype
from ..options import LossOptions
from .common import logits_chunk, per_row, rows_per_chunk, target_status, through_epilogue_


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: LossOptions,
            with_entropy: bool = False):
    n, v = hidden.shape[0], weight.shape[0]
    cd = stat_dtype(hidden)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    loss = torch.empty(n, dtype=cd, device=hidden.device)
    lse = torch.empty(n, dtype=cd, device=hidden.device)
    entropy = torch.empty(n, dtype=cd, device=hidden.device) if with_entropy else None
    eps = opts.label_smoothing
    step = rows_per_chunk(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        z, _ = logits_chunk(hidden[s:e].to(cd), w, b, opts)
        valid, bad, idx = target_status(targets[s:e], v, opts.ignore_index)
        target_z = z.gather(1, idx[:, None]).squeeze(1)
        mean_z = z.mean(dim=-1) if eps else None
        row_max = z.amax(dim=-1, keepdim=True)
        if entropy is None:
            row_lse = z.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(1))  # z is consumed here
        else:
            shifted = z.sub_(row_max)  # z - m, in place
            p = shifted.exp()
            s0 = p.sum(dim=-1)
            s1 = p.mul_(shifted).sum(dim=-1)
            log_s0 = s0.log()
            row_lse = log_s0 + row_max.squeeze(1)
            entropy[s:e] = log_s0 - s1 / s0
        nll = row_lse - target_z
        if eps:
            nll = (1 - eps) * nll + eps * (row_lse - mean_z)
        loss[s:e] = per_row(nll, valid, bad)
        lse[s:e] = row_lse
    if entropy is not None:
        return loss, lse, entropy
    return loss, lse


def backward(grad_loss: Tensor, grad_lse: Optional[Tensor], hidden: Tensor, weight: Tensor,
             bias: Optional[Tensor], targets: Tensor, lse: Tensor, opts: LossOptions, need_d_weight: bool = True,
             grad_entropy: Optional[Tensor] = None, entropy: Optional[Tensor] = None):
    if grad_entropy is not None and entropy is None:
        raise ValueError("the entropy's gradient needs the forward's entropy output (entropy=...)")
    n, v = hidden.shape[0], weight.shape[0]
    cd = stat_dtype(hidden)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    d_weight = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_d_weight else None
    d_bias = None if bias is None else torch.zeros(v, dtype=cd, device=weight.device)
    eps = opts.label_smoothing
    step = rows_per_chunk(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(cd)
        z, th = logits_chunk(h, w, b, opts)
        valid, bad, idx = target_status(targets[s:e], v, opts.ignore_index)
        # g: weight of the loss term per row (0 on ignored rows; NaN propagates from out-of-range rows).
        g = per_row(grad_loss[s:e].to(cd), valid, bad)
        row_weight = g if grad_lse is None else g + grad_lse[s:e].to(cd)
        if grad_entropy is None:
            dz = z.sub_(lse[s:e, None].to(cd)).exp_().mul_(row_weight[:, None])  # softmax * row weight, in place
        else:  # p * (row weight - g_H (log p + H)): the entropy's term -g_H p (log p + H)
            log_p = z.sub_(lse[s:e, None].to(cd))
            p = log_p.exp()
            gh = grad_entropy[s:e].to(cd)[:, None]
            dz = log_p.add_(entropy[s:e].to(cd)[:, None]).mul_(gh.neg()).add_(row_weight[:, None]).mul_(p)
        dz.scatter_add_(1, idx[:, None], (-(1 - eps) * g)[:, None])
        if eps:
            dz -= (g * (eps / v))[:, None]
        through_epilogue_(dz, th, opts)
        d_hidden[s:e] = (dz @ w).to(hidden.dtype)
        if d_weight is not None:
            d_weight += dz.T @ h
        if d_bias is not None:
            d_bias += dz.sum(dim=0)
    return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


def jvp(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
        t_hidden: Optional[Tensor], t_weight: Optional[Tensor], t_bias: Optional[Tensor], opts: LossOptions,
        entropy: Optional[Tensor] = None):
    """Tangents of (loss, lse, entropy) for tangents of (hidden, weight, bias): with u = h @ W.T + b,
    z = softcap(a u) and p = softmax(z): dz = a (1 - tanh^2) du, dlse = sum_j p dz,
    dloss = (1 - eps) (dlse - dz[t]) + eps (dlse - mean_j dz); 0 on ignored rows, NaN on bad targets;
    dH = -sum_j p (log p + H) dz (None when ``entropy``, the forward's output, is not given)."""
    n, v = hidden.shape[0], weight.shape[0]
    cd = stat_dtype(hidden)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    tw = None if t_weight is None else t_weight.to(cd)
    tb = None if t_bias is None else t_bias.to(cd)
    t_loss = torch.zeros(n, dtype=cd, device=hidden.device)
    t_lse = torch.zeros(n, dtype=cd, device=hidden.device)
    t_entropy = None if entropy is None else torch.zeros(n, dtype=cd, device=hidden.device)
    eps = opts.label_smoothing
    step = rows_per_chunk(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(cd)
        du = torch.zeros(e - s, v, dtype=cd, device=hidden.device)
        if t_hidden is not None:
            du += t_hidden[s:e].to(cd) @ w.T
        if tw is not None:
            du += h @ tw.T
        if tb is not None:
            du += tb
        z, th = logits_chunk(h, w, b, opts)
        dz = du.mul_(opts.logit_scale)
        if th is not None:
            dz.mul_(1 - th * th)
        log_p = z.sub_(lse[s:e, None].to(cd))
        p = log_p.exp()
        d_lse = (p * dz).sum(dim=-1)
        if t_entropy is not None:
            t_entropy[s:e] = -(p * log_p.add_(entropy[s:e, None].to(cd)) * dz).sum(dim=-1)
        valid, bad, idx = target_status(targets[s:e], v, opts.ignore_index)
        d_loss = (1 - eps) * (d_lse - dz.gather(1, idx[:, None]).squeeze(1))
        if eps:
            d_loss = d_loss + eps * (d_lse - dz.mean(dim=-1))
        t_loss[s:e] = per_row(d_loss, valid, bad)
        t_lse[s:e] = d_lse
    return t_loss, t_lse, t_entropy
