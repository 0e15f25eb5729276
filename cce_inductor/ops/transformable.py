"""The low-memory op as an ``autograd.Function``, for torch.func transforms and forward-mode AD.

:mod:`cce_inductor.dispatch` routes here only inside a torch.func transform (grad, vjp, jacrev, vmap, jvp)
or when an input is a forward-AD dual tensor; everywhere else (eager autograd, torch.compile) the custom op
runs directly. The same ops compute it: forward = ``cce::linear_cross_entropy_forward``, backward = the
custom op's own autograd formula (:mod:`.low_memory`); ``jvp`` is the forward-mode formula (PyTorch, logits
a token chunk at a time); ``vmap`` comes from running these per batch element (``generate_vmap_rule``).
"""
from __future__ import annotations

import torch

from .. import select
from ..core.dtypes import autocast_off
from ..options import LossOptions
from .low_memory import input_grads, setup_context


class TransformableLinearCrossEntropy(torch.autograd.Function):
    """``apply(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale, with_entropy)``
    -> per-token (loss, lse, entropy), as ``torch.ops.cce.linear_cross_entropy_forward``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale,
                with_entropy=False):
        return torch.ops.cce.linear_cross_entropy_forward(hidden, weight, bias, targets, ignore_index,
                                                          label_smoothing, softcap, logit_scale,
                                                          with_entropy=with_entropy)[:3]

    @staticmethod
    def setup_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4], output[1], output[2])  # what the jvp formula reads: as the backward
        ctx.mark_non_differentiable()

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises a clear error, never zeros
    def backward(ctx, grad_loss, grad_lse, grad_entropy):
        return input_grads(ctx, grad_loss, grad_lse, grad_entropy) + (None,) * 6

    @staticmethod
    def jvp(ctx, t_hidden, t_weight, t_bias, *_):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        with autocast_off(hidden):
            t_loss, t_lse, t_entropy = select.jvp(hidden, weight, bias, targets, lse, t_hidden, t_weight, t_bias,
                                                  LossOptions(*ctx.loss_args),
                                                  entropy=entropy if entropy.numel() == lse.numel() else None)
        return t_loss, t_lse, (t_entropy if t_entropy is not None else torch.zeros_like(entropy))
