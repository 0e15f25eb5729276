"""The one reference every test and benchmark compares with: the eager PyTorch expression the op equals.

* :func:`reference_linear_cross_entropy` — the eager code itself (materialises the logits); run it on
  float64 inputs for a float64 reference.
* :func:`reference_loss_and_grads` — that expression in float64, a token chunk at a time (so model
  shapes fit), with autograd for the gradients: per-token loss and lse, and d_hidden, d_weight, d_bias for
  given upstream gradients; :func:`reference_with_entropy` also the per-token entropy (eager's
  ``-(softmax(z) * log_softmax(z)).sum(-1)``) and its upstream gradient.
* :func:`rel_err` — ``||out - ref|| / ||ref||`` in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import LossOptions


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias=None, ignore_index=-100,
                                   reduction="mean", label_smoothing=0.0, softcap=None, logit_scale=1.0,
                                   return_lse=False, return_entropy=False):
    """The eager PyTorch expression ``linear_cross_entropy`` equals (materialises the logits)."""
    if bias is None or bias.dtype == hidden.dtype:
        z = F.linear(hidden, weight, bias)
    else:  # a float32 bias with 16-bit hidden/weight: added in float32, as eager's z + b promotes
        z = F.linear(hidden, weight) + bias
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.float() if z.dtype != torch.float64 else z
    loss = F.cross_entropy(z.flatten(0, -2) if z.dim() > 1 else z[None], targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    extra = [torch.logsumexp(z, dim=-1)] if return_lse else []
    if return_entropy:
        extra.append(-(F.softmax(z, dim=-1) * F.log_softmax(z, dim=-1)).sum(-1))
    return (loss, *extra) if extra else loss


def reference_loss_and_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                             opts: LossOptions, grad_loss: Optional[Tensor] = None, grad_lse: Optional[Tensor] = None,
                             rows_per_chunk: int = 1024):
    """Float64 (loss [N], lse [N], d_hidden, d_weight, d_bias or None) of the eager expression for 2-D
    hidden; the gradients (only when ``grad_loss`` is given) are those of
    ``sum(grad_loss * loss) + sum(grad_lse * lse)``. Out-of-range targets give NaN rows, as the op does."""
    loss, lse, _, dh, dw, db = reference_with_entropy(hidden, weight, bias, targets, opts, grad_loss, grad_lse,
                                                      rows_per_chunk=rows_per_chunk)
    return loss, lse, dh, dw, db


def reference_with_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                           opts: LossOptions, grad_loss: Optional[Tensor] = None, grad_lse: Optional[Tensor] = None,
                           grad_entropy: Optional[Tensor] = None, rows_per_chunk: int = 1024):
    """Float64 (loss, lse, entropy [N], d_hidden, d_weight, d_bias or None): :func:`reference_loss_and_grads`
    plus the per-token entropy, the gradients (when ``grad_loss`` is given) those of
    ``sum(grad_loss * loss) + sum(grad_lse * lse) + sum(grad_entropy * entropy)``."""
    h = hidden.detach().double()
    w = weight.detach().double().requires_grad_(grad_loss is not None)
    b = None if bias is None else bias.detach().double().requires_grad_(grad_loss is not None)
    N, V = h.shape[0], w.shape[0]
    t = targets.long()
    bad = (t != opts.ignore_index) & ((t < 0) | (t >= V))
    safe_t = torch.where(bad, torch.full_like(t, opts.ignore_index), t)
    loss = torch.empty(N, dtype=torch.float64, device=h.device)
    lse = torch.empty_like(loss)
    entropy = torch.empty_like(loss)
    dh = torch.empty_like(h) if grad_loss is not None else None
    dw = torch.zeros_like(w) if grad_loss is not None else None
    db = torch.zeros_like(b) if (grad_loss is not None and b is not None) else None
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        hc = h[r0:r1].requires_grad_(grad_loss is not None)
        with torch.enable_grad():
            li, lsei, enti = reference_linear_cross_entropy(
                hc, w, safe_t[r0:r1], bias=b, ignore_index=opts.ignore_index, reduction="none",
                label_smoothing=opts.label_smoothing, softcap=opts.softcap, logit_scale=opts.logit_scale,
                return_lse=True, return_entropy=True)
            if grad_loss is not None:
                total = (li * grad_loss[r0:r1].double()).sum()
                if grad_lse is not None:
                    total = total + (lsei * grad_lse[r0:r1].double()).sum()
                if grad_entropy is not None:
                    total = total + (enti * grad_entropy[r0:r1].double()).sum()
                grads = torch.autograd.grad(total, [hc, w] + ([b] if b is not None else []))
                dh[r0:r1] = grads[0]
                dw += grads[1]
                if db is not None:
                    db += grads[2]
        loss[r0:r1] = li.detach()
        lse[r0:r1] = lsei.detach()
        entropy[r0:r1] = enti.detach()
    loss[bad] = float("nan")
    if dh is not None:
        dh[bad] = float("nan")
    return loss, lse, entropy, dh, dw, db


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere in ``out`` gives NaN)."""
    ref = ref.detach().double()
    out = out.detach().to(device=ref.device, dtype=torch.float64)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
