"""Dispatch: from the public call to one custom op, and the reduction after it.

:func:`linear_cross_entropy` is the public function minus the autocast casts and the DTensor entry (the
graph rewrite inserts it: its plan has already chosen the dtypes each input is handed over in). In order:

1. the one input check, the options, the label range (eager only);
2. flatten to ``hidden [N, D]``, ``targets [N]``;
3. which op — inside a torch.func transform or with forward-AD dual tensors the ``autograd.Function`` form;
   where the fast-path rule allows (:func:`cce_inductor.paths.fast_path_refusal`: a scalar loss that needs a
   gradient) ``cce::fast_linear_cross_entropy``, which returns the reduced loss itself; else
   ``cce::linear_cross_entropy_forward``;
4. the reduction of the per-token loss (:func:`~cce_inductor.core.reduce.reduce_loss`), as plain PyTorch the
   compiler sees.

Outputs: the loss, then the per-token lse (``return_lse``), then the per-token entropy of softmax(logits)
(``return_entropy``), each differentiable. ``targets=None`` (the graph rewrite's entropy / lse reads, which
have no labels) counts every row as ignored: the loss is then all zeros and only the other outputs are read.

The decision is made from flags only (never sizes), so it is static under torch.compile; the op picks its
scheme from the actual sizes when it runs (:mod:`cce_inductor.select`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import config, ops
from .core.checks import check_inputs, check_target_range, is_tracing
from .core.reduce import reduce_loss
from .options import LossOptions
from .paths import fast_path_refusal


def needs_transformable_op(*tensors: Optional[Tensor]) -> bool:
    """True inside a torch.func transform or with forward-mode AD dual tensors: the custom op's autograd
    formula covers neither, so an autograd.Function with a setup_context and a jvp runs instead.
    Never while torch.compile traces (the rewrite leaves losses inside transforms alone)."""
    if torch.compiler.is_compiling() or any(t is not None and is_tracing(t) for t in tensors):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Optional[Tensor], *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: Optional[float] = None, logit_scale: float = 1.0, return_lse: bool = False,
                         return_entropy: bool = False, path: Optional[str] = None):
    """:func:`cce_inductor.linear_cross_entropy` on plain tensors already in the dtypes to compute in
    (no autocast casts). ``path=None``: ``cce_inductor.config.path``. ``targets=None``: no labels (see the
    module docstring)."""
    no_targets = targets is None
    if no_targets:
        targets = torch.full(hidden.shape[:-1], ignore_index, dtype=torch.int64, device=hidden.device)
    check_inputs(hidden, weight, targets, bias, reduction=reduction)
    opts = LossOptions(ignore_index, label_smoothing, softcap, logit_scale)  # validates the options
    path = config.path if path is None else path  # (a plain read: Dynamo traces this function)
    if targets.dtype not in (torch.int32, torch.int64) or (  # the kernels index with int32/int64 labels
            targets.dtype == torch.int32 and not -2**31 <= opts.ignore_index < 2**31):  # (NO_IGNORE_INDEX)
        targets = targets.long()
    if not no_targets:
        check_target_range(targets, weight.shape[0], ignore_index)

    lead_shape = hidden.shape[:-1]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    args = (flat_hidden, weight, bias, flat_targets, opts.ignore_index, float(opts.label_smoothing),
            None if opts.softcap is None else float(opts.softcap), float(opts.logit_scale))
    wants = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    needs_grad = torch.is_grad_enabled() and any(wants)
    fast_refused = fast_path_refusal(path, reduction, return_lse, needs_grad, return_entropy)  # also checks ``path``
    if needs_transformable_op(hidden, weight, bias):
        loss, lse, entropy = ops.TransformableLinearCrossEntropy.apply(*args, return_entropy)
    elif fast_refused is None:
        loss, _, _, _ = torch.ops.cce.fast_linear_cross_entropy(*args, reduction, *wants, path)
        return loss
    else:
        loss, lse, entropy, _, _ = torch.ops.cce.linear_cross_entropy_forward(*args, for_backward=needs_grad,
                                                                              with_entropy=return_entropy)
    loss = reduce_loss(loss, flat_targets, opts.ignore_index, reduction, lead_shape)
    if not (return_lse or return_entropy):
        return loss
    return (loss, *([lse.reshape(lead_shape)] if return_lse else []),
            *([entropy.reshape(lead_shape)] if return_entropy else []))
