"""The public function ``linear_cross_entropy``: autocast, then a tensor-parallel lm-head (DTensor) to the
vocabulary-parallel op, everything else to :mod:`cce_inductor.dispatch`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import dispatch
from .core.checks import is_dtensor
from .core.dtypes import autocast_like_linear
from .core.settings import PATHS, check_choice
from .distributed.dtensor import dtensor_vocab_parallel_linear_cross_entropy


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: Optional[float] = None, logit_scale: float = 1.0, return_lse: bool = False,
                         path: Optional[str] = None):
    """Cross-entropy of ``softcap(logit_scale * F.linear(hidden, weight, bias))`` without storing the logits.

    Equal to::

        z = logit_scale * F.linear(hidden, weight, bias)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        F.cross_entropy(z.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    hidden is ``[..., D]``, weight ``[V, D]``, bias ``[V]``, targets ``hidden.shape[:-1]`` (integer class
    indices). ``reduction="none"`` returns ``hidden.shape[:-1]``. The result is float32 (as with the
    ``.float()`` above; float64 for float64 inputs). ``return_lse=True`` also returns the per-token
    log-sum-exp of the logits (float32, ``hidden.shape[:-1]``, differentiable: a z-loss can use it).

    hidden and weight share one dtype. The bias has that dtype too, or float32 with 16-bit hidden/weight:
    it is then added in float32, as ``h @ W.T + b`` with a float32 ``b`` computes under autocast.
    ``logit_scale`` is a finite non-zero number, ``softcap`` None or a finite positive one.

    Under ``torch.autocast`` hidden, weight and bias are cast as ``F.linear`` casts them (float64 is not
    cast). Reverse-mode autograd, ``torch.func.grad``/``vjp``/``jacrev``/``vmap`` and forward-mode AD
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) are supported.

    ``path``: "auto" | "fast" | "low_memory" (None: ``cce_inductor.config.path``). The fast path (3 matmuls,
    gradients formed in the forward) serves scalar losses ("mean"/"sum", no lse) that need a gradient; see
    ``cce_inductor.paths`` and, for how a call reaches its kernels, ``cce_inductor/README.md``.

    A DTensor weight sharded on the vocabulary (``Shard(0)``, tensor parallel) with DTensor hidden states
    on the same 1-D mesh runs the vocabulary-parallel op (``cce_inductor.distributed``); it has one scheme
    (the low-memory one), so ``path`` is checked but has no effect there.
    """
    if any(is_dtensor(t) for t in (weight, hidden, bias, targets)):  # a tensor-parallel lm-head
        if path is not None:
            check_choice("path", path, PATHS)
        return dtensor_vocab_parallel_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
    hidden, weight, bias = autocast_like_linear(hidden, weight, bias)
    return dispatch.linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                         reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                                         logit_scale=logit_scale, return_lse=return_lse, path=path)
