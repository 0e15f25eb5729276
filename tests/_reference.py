"""Shared helpers for tests: float64 references and relative errors."""
import torch

from cce_inductor.api import reference_linear_cross_entropy


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(n_shape, d, v, dtype, *, bias=False, ignore_frac=0.2, seed=0, scale=1.0):
    """Random (never zero) inputs with some ignored targets; logits of O(scale) magnitude."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (scale / d**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, v, n_shape, generator=g)
    ignored = torch.rand(n_shape, generator=g) < ignore_frac
    targets[ignored] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


def loss_and_grads(fn, hidden, weight, bias, targets, upstream_seed=1, **kw):
    """Run fn, backprop a non-trivial upstream gradient (also through lse when returned)."""
    out = fn(hidden, weight, targets, bias=bias, **kw)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    if upstream_seed is None:  # plain loss.backward()
        return loss, lse, torch.autograd.grad(loss, [p for p in (hidden, weight, bias) if p is not None])
    g = torch.Generator().manual_seed(upstream_seed)
    total = (loss * torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)).sum()
    if lse is not None:
        total = total + (lse * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)).sum()
    params = [p for p in (hidden, weight, bias) if p is not None]
    grads = torch.autograd.grad(total, params)
    return loss, lse, grads


def float64_reference(hidden, weight, bias, targets, **kw):
    up = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return loss_and_grads(reference_linear_cross_entropy, up(hidden), up(weight), up(bias), targets, **kw)
