"""Float64 reference of the kernels' contract, chunked over tokens so large shapes fit (tests, benchmarks).

Written straight from the formulas (not from the kernels): logits per token chunk in float64, softmax,
the analytic gradient, then the two products. Memory: one [chunk, V] float64 block plus float64 copies
of the inputs and of d_weight.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..options import LossOptions


def reference_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    opts: LossOptions,
    grad_loss: Optional[torch.Tensor] = None,
    grad_lse: Optional[torch.Tensor] = None,
    rows_per_chunk: int = 1024,
):
    """Returns float64 (loss, lse, d_hidden, d_weight, d_bias or None); grads only if grad_loss is given."""
    h = hidden.double()
    w = weight.double()
    b = bias.double() if bias is not None else None
    N, V = h.shape[0], w.shape[0]
    eps = opts.label_smoothing
    loss = torch.empty(N, dtype=torch.float64, device=h.device)
    lse = torch.empty_like(loss)
    want_grad = grad_loss is not None
    dh = torch.empty_like(h) if want_grad else None
    dw = torch.zeros_like(w) if want_grad else None
    db = torch.zeros(V, dtype=torch.float64, device=h.device) if (want_grad and b is not None) else None
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        raw = h[r0:r1] @ w.T
        if b is not None:
            raw = raw + b
        x = raw * opts.logit_scale
        z = opts.softcap * torch.tanh(x / opts.softcap) if opts.softcap is not None else x
        l = torch.logsumexp(z, dim=1)
        t = targets[r0:r1].long()
        ignored = t == opts.ignore_index
        valid = (t >= 0) & (t < V)
        zt = z.gather(1, t.clamp(0, V - 1)[:, None])[:, 0]
        li = (1 - eps) * (l - zt) + eps * (l - z.mean(dim=1))
        li = torch.where(ignored, torch.zeros_like(li), li)
        li = torch.where(valid | ignored, li, torch.full_like(li, float("nan")))
        loss[r0:r1] = li
        lse[r0:r1] = l
        if want_grad:
            g = torch.where(ignored, torch.zeros_like(li), grad_loss[r0:r1].double())
            coef = g + (grad_lse[r0:r1].double() if grad_lse is not None else 0.0)
            p = torch.exp(z - l[:, None])
            onehot = torch.zeros_like(z)
            onehot.scatter_(1, t.clamp(0, V - 1)[:, None], 1.0)
            onehot = onehot * (valid & ~ignored)[:, None]
            dz = coef[:, None] * p - g[:, None] * ((1 - eps) * onehot + eps / V)
            if opts.softcap is not None:
                dz = dz * (1 - (z / opts.softcap) ** 2)
            draw = dz * opts.logit_scale
            dh[r0:r1] = draw @ w
            dw += draw.T @ h[r0:r1]
            if db is not None:
                db += draw.sum(0)
            del raw, x, z, p, onehot, dz, draw
    return loss, lse, dh, dw, db


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere in out gives NaN)."""
    out = out.double()
    return ((out - ref).norm() / ref.norm()).item()
