"""Errors against the float64 reference (``cce_inductor.reference``), for the benchmarks and the CUDA tests."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Reference(NamedTuple):
    loss: float         # mean loss over the tokens
    dE: torch.Tensor    # float64 gradients of upstream * mean loss
    dC: torch.Tensor

    def scaled(self, k: float) -> "Reference":
        """The reference of ``k * loss``."""
        return Reference(self.loss * k, self.dE * k, self.dC * k)


def per_token_reference(e, c, t, grad_loss=None):
    """Float64 per-token cross-entropy of ``e @ c.T`` [N] and, with ``grad_loss`` [N], the gradients
    (dE, dC) of ``sum(grad_loss * loss)`` (token chunks, on ``e``'s device); else (loss, None, None)."""
    from cce_inductor.options import LossOptions  # imported when used: `import harness` stays light
    from cce_inductor.reference import reference_loss_and_grads

    loss, _, dE, dC, _ = reference_loss_and_grads(e.detach(), c.detach(), None, t, LossOptions(), grad_loss=grad_loss)
    return loss, dE, dC


def float64_reference(e, c, t, upstream: float = 1.0) -> Reference:
    """Float64 mean cross-entropy of ``e @ c.T`` and the gradients of ``upstream * loss``."""
    N = e.shape[0]
    loss, dE, dC = per_token_reference(e, c, t, torch.full((N,), upstream / N, dtype=torch.float64, device=e.device))
    return Reference(loss.mean().item(), dE, dC)


def errors(ref: Reference, loss, dE, dC) -> dict:
    """Relative errors: ``loss_err`` |loss - ref| / |ref|, ``dE_err`` and ``dC_err`` ||g - ref|| / ||ref||."""
    from cce_inductor.reference import rel_err

    return dict(loss_err=abs(float(loss) - ref.loss) / abs(ref.loss), dE_err=rel_err(dE, ref.dE),
                dC_err=rel_err(dC, ref.dC))


def loss_and_grads(fn, h, w, t, upstream: float = 1.0):
    """``(loss, dE, dC)`` of a method: ``fn(e, c, t)`` returns the mean loss, whose gradients come by
    autograd (of ``upstream * loss``) on fresh leaf copies of ``h`` and ``w``; or it returns
    ``(loss, dE, dC)`` itself (kernels called without autograd)."""
    e, c = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(e, c, t)
    if isinstance(out, tuple):
        return out
    (out * upstream).backward()
    return out.detach(), e.grad, c.grad


def compare(h, w, t, methods: dict, upstream: float = 1.0) -> dict:
    """Errors of each ``name: fn`` in ``methods`` against one float64 reference, as ``{name}_loss``,
    ``{name}_dE``, ``{name}_dC``."""
    ref = float64_reference(h, w, t, upstream)
    out = {}
    for name, fn in methods.items():
        err = errors(ref, *loss_and_grads(fn, h, w, t, upstream))
        out.update({f"{name}_loss": err["loss_err"], f"{name}_dE": err["dE_err"], f"{name}_dC": err["dC_err"]})
    return out
