"""The float64 references the distributed tests compare with: eager PyTorch with the whole weight on one
process. Self-contained (no other test helper) so these tests do not depend on how the rest of the suite
organises its helpers."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(n_shape, d, v, dtype, *, bias=False, ignore_frac=0.2, seed=0, scale=1.0):
    """Random (never zero) hidden [*n_shape, d], weight [v, d], bias [v] and targets (some ignored, -100)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (scale / d**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, v, n_shape, generator=g)
    targets[torch.rand(n_shape, generator=g) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


def reference_lce(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  softcap=None, logit_scale=1.0, return_lse=False):
    """``F.cross_entropy(softcap(logit_scale * F.linear(hidden, weight, bias)).float(), targets)`` (logits
    materialised; float64 stays float64)."""
    z = logit_scale * F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z if z.dtype == torch.float64 else z.float()
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    return (loss, torch.logsumexp(z, dim=-1)) if return_lse else loss


def loss_and_grads(fn, hidden, weight, bias, targets, upstream_seed=1, **kw):
    """(loss, lse | None, grads of hidden, weight[, bias]) of ``fn``; the upstream gradient is random (seeded,
    also through the lse when returned), or plain ``loss.backward()`` with ``upstream_seed=None``."""
    out = fn(hidden, weight, targets, bias=bias, **kw)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    params = [p for p in (hidden, weight, bias) if p is not None]
    if upstream_seed is None:
        return loss, lse, torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(upstream_seed)
    total = (loss * torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss)).sum()
    if lse is not None:
        total = total + (lse * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse)).sum()
    return loss, lse, torch.autograd.grad(total, params)


def float64_reference(hidden, weight, bias, targets, **kw):
    up = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()  # noqa: E731
    return loss_and_grads(reference_lce, up(hidden), up(weight), up(bias), targets.cpu(), **kw)
