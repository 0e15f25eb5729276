"""The low-memory custom ops ``torch.ops.cce.linear_cross_entropy_forward`` / ``..._backward`` and their
autograd: registration, fake implementations, autograd formula — nothing else.

Both ops work on flattened inputs (hidden [N, D], targets [N]) and per-token outputs; reductions and
reshapes live in :mod:`cce_inductor.dispatch` as plain PyTorch, so the compiler sees them and they need
no kernel. Each op is opaque to torch.compile (a single kernel call in the graph) with a fake
implementation for tracing and dynamic shapes. The forward saves hidden, weight, bias, targets and the
per-token log-sum-exp — never the logits. Which implementation computes them (Triton or PyTorch) is
:mod:`cce_inductor.select`'s decision.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import select
from ..core.dtypes import autocast_off, stat_dtype
from ..options import LossOptions


@torch.library.custom_op("cce::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                 ignore_index: int, label_smoothing: float, softcap: Optional[float],
                                 logit_scale: float, for_backward: bool = True) -> tuple[Tensor, Tensor]:
    """Per-token (loss, lse) [N], float32 (float64 for float64 inputs); loss is 0 on ignored tokens.
    ``for_backward=False``: no gradient will be computed from this call (picks the no-grad forward kernel)."""
    opts = LossOptions(ignore_index, label_smoothing, softcap, logit_scale)
    with autocast_off(hidden):
        return select.low_memory_forward(hidden, weight, bias, targets, opts, for_backward=for_backward)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale, for_backward=True):
    n, dtype = hidden.shape[0], stat_dtype(hidden)
    return hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype)


@torch.library.custom_op("cce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad_loss: Optional[Tensor], grad_lse: Optional[Tensor], hidden: Tensor,
                                  weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                                  ignore_index: int, label_smoothing: float, softcap: Optional[float],
                                  logit_scale: float, need_d_weight: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden, d_weight, d_bias); d_bias is an empty tensor when there is no bias, d_weight an empty
    tensor when ``need_d_weight`` is False (a frozen lm-head: its matmul is skipped)."""
    opts = LossOptions(ignore_index, label_smoothing, softcap, logit_scale)
    stat = stat_dtype(hidden)
    if grad_loss is None:  # only the lse was used (a z-loss alone): the loss term contributes nothing
        grad_loss = hidden.new_zeros(hidden.shape[0], dtype=stat)
    grad_loss = grad_loss.to(stat)
    if grad_lse is not None:
        grad_lse = grad_lse.to(stat)
    with autocast_off(hidden):
        d_hidden, d_weight, d_bias = select.low_memory_backward(grad_loss, grad_lse, hidden, weight, bias, targets,
                                                                lse, opts, need_d_weight=need_d_weight)
    if d_weight is None:
        d_weight = hidden.new_empty(0)
    if d_bias is None:
        d_bias = hidden.new_empty(0)
    return d_hidden, d_weight, d_bias


@linear_cross_entropy_backward.register_fake
def _(grad_loss, grad_lse, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, softcap,
      logit_scale, need_d_weight=True):
    d_bias = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_d_weight else hidden.new_empty(0)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), d_weight, d_bias


def setup_context(ctx, inputs, output):
    """Saves what the backward recomputes from (never the logits). Shared with the torch.func form."""
    hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale = inputs[:8]
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.loss_args = (ignore_index, label_smoothing, softcap, logit_scale)
    # An unused output (usually lse) then arrives as None instead of a materialised zero tensor.
    ctx.set_materialize_grads(False)


def input_grads(ctx, grad_loss, grad_lse) -> tuple:
    """(d_hidden, d_weight, d_bias) for the forward's first three inputs (None where not needed).
    Shared with the torch.func form."""
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    if grad_loss is None and grad_lse is None:
        return None, None, None
    need_d_weight = ctx.needs_input_grad[1]
    d_hidden, d_weight, d_bias = torch.ops.cce.linear_cross_entropy_backward(
        grad_loss, grad_lse, hidden, weight, bias, targets, lse, *ctx.loss_args, need_d_weight=need_d_weight)
    return d_hidden, d_weight if need_d_weight else None, d_bias if bias is not None else None


def _backward(ctx, grad_loss, grad_lse):
    return input_grads(ctx, grad_loss, grad_lse) + (None,) * 6  # no gradient for targets and the options


linear_cross_entropy_forward.register_autograd(_backward, setup_context=setup_context)
