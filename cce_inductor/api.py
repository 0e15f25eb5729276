"""The public functions: ``linear_cross_entropy`` (autocast, then a tensor-parallel lm-head (DTensor) to the
vocabulary-parallel op, everything else to :mod:`cce_inductor.dispatch`) and ``linear_log_probs`` (the same
op read as per-token log-probabilities, with the entropy on request: RL scoring)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .core.checks import is_dtensor
from .core.dtypes import autocast_like_linear
from .core.settings import PATHS, check_choice
from .distributed.dtensor import dtensor_vocab_parallel_linear_cross_entropy
from .options import NO_IGNORE_INDEX


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: Optional[float] = None, logit_scale: float = 1.0, return_lse: bool = False,
                         return_entropy: bool = False, path: Optional[str] = None):
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
    ``return_entropy=True`` also returns the per-token entropy of ``softmax(z)`` (after the lse when both are
    asked for; float32, ``hidden.shape[:-1]``, differentiable: an entropy bonus), from the same pass over the
    vocabulary. Per-token outputs take the low-memory path (see ``path``).

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
        if return_entropy:
            raise NotImplementedError("return_entropy=True is not supported with a vocabulary-sharded (DTensor) "
                                      "lm-head: the vocabulary-parallel op computes the loss and the lse only")
        if targets is None:
            raise ValueError("targets are required with a vocabulary-sharded (DTensor) lm-head")
        return dtensor_vocab_parallel_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
    hidden, weight, bias = autocast_like_linear(hidden, weight, bias)
    return dispatch.linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                         reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                                         logit_scale=logit_scale, return_lse=return_lse,
                                         return_entropy=return_entropy, path=path)


def linear_log_probs(hidden: Tensor, weight: Tensor, targets: Optional[Tensor], *, bias: Optional[Tensor] = None,
                     softcap: Optional[float] = None, logit_scale: float = 1.0, ignore_index: Optional[int] = None,
                     return_lse: bool = False, return_entropy: bool = False, path: Optional[str] = None):
    """Per-token log-probabilities ``log softmax(z)[..., t]`` of ``z = softcap(logit_scale * F.linear(hidden,
    weight, bias))`` without storing the logits — what RL scoring (GRPO/PPO/DPO, a reference model) computes as::

        torch.gather(z.float().log_softmax(-1), -1, targets[..., None]).squeeze(-1)

    ``targets`` (``hidden.shape[:-1]``) are class indices; ``ignore_index=None`` (default) reads every row (an
    index outside [0, V) raises eagerly, as ``torch.gather`` does, and is NaN under torch.compile); an int
    gives log-probability 0 to the rows whose target equals it (as ``-F.cross_entropy(..., reduction="none")``
    does). A sampling temperature ``z / T`` is ``logit_scale=1 / T``.

    ``return_lse`` adds the per-token log-sum-exp, ``return_entropy`` the per-token entropy of ``softmax(z)``
    (both from the same pass over the vocabulary). Returns, in this order, the log-probabilities (unless
    ``targets`` is None: then only the other outputs are computed), the lse, the entropy — one tensor when only
    one is asked for. Each is float32 (float64 for float64 inputs), ``hidden.shape[:-1]``, differentiable with
    exact gradients: the upstream gradient is per token (the clipped ratio ``exp(logp - old_logp)``, an
    entropy bonus, masks), so this takes the low-memory path; under ``torch.no_grad()`` it is a forward only.
    Equal to ``-linear_cross_entropy(hidden, weight, targets, reduction="none", ...)`` for the log-probabilities.
    """
    if targets is None and not (return_lse or return_entropy):
        raise ValueError("linear_log_probs without targets computes nothing: ask for return_entropy or return_lse")
    if ignore_index is None:
        ignore_index = NO_IGNORE_INDEX
        if targets is not None and targets.dtype != torch.int64 and not is_dtensor(targets):
            targets = targets.long()  # (the sentinel is outside int32's range)
    # targets=None: entropy / lse only (dispatch counts every row as ignored)
    out = linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction="none",
                               softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
                               return_entropy=return_entropy, path=path)
    outs = list(out) if isinstance(out, tuple) else [out]
    outs[0] = -outs[0]
    if targets is None:
        outs = outs[1:]
    return outs[0] if len(outs) == 1 else tuple(outs)
