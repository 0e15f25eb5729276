"""The low-memory custom ops ``torch.ops.cce.linear_cross_entropy_forward`` / ``..._backward`` and their
autograd: registration, fake implementations, autograd formula — nothing else.

Both ops work on flattened inputs (hidden [N, D], targets [N]) and per-token outputs; reductions and
reshapes live in :mod:`cce_inductor.dispatch` as plain PyTorch, so the compiler sees them and they need
no kernel. Each op is opaque to torch.compile (a single kernel call in the graph) with a fake
implementation for tracing and dynamic shapes. The forward saves hidden, weight, bias, targets and the
per-token log-sum-exp (and, when it computes it, the per-token entropy) — never the logits.

The entropy output (``with_entropy=True``; an empty tensor otherwise) is the entropy of softmax(logits) per
token, from the same pass over the vocabulary; its upstream gradient is one more input of the backward op
(``grad_entropy``, with the forward's ``entropy``), given after the older arguments so that calls written
before it existed still bind. Which implementation computes them (Triton or PyTorch) is
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
                                 logit_scale: float, for_backward: bool = True,
                                 with_entropy: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token (loss, lse, entropy, saved lse, saved entropy) [N], float32 (float64 for float64 inputs); loss
    is 0 on ignored tokens; entropy is an empty tensor unless ``with_entropy``. The last two are copies that
    only the autograd formula keeps (empty when ``for_backward=False``): a caller may write to the returned
    lse / entropy in place, and under torch.compile a saved tensor that is also a returned one is not protected
    by autograd's version check (the gradient would silently use the written values). ``for_backward=False``:
    no gradient will be computed from this call (picks the no-grad forward kernel)."""
    opts = LossOptions(ignore_index, label_smoothing, softcap, logit_scale)
    with autocast_off(hidden):
        loss, lse, entropy = select.low_memory_forward(hidden, weight, bias, targets, opts, for_backward=for_backward,
                                                       with_entropy=with_entropy)
    entropy = entropy if entropy is not None else hidden.new_empty(0, dtype=loss.dtype)
    if not for_backward:
        return loss, lse, entropy, lse.new_empty(0), entropy.new_empty(0)
    return loss, lse, entropy, lse.clone(), entropy.clone()


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale, for_backward=True,
      with_entropy=False):
    n, dtype = hidden.shape[0], stat_dtype(hidden)
    kept = n if for_backward else 0
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype),
            hidden.new_empty(n if with_entropy else 0, dtype=dtype), hidden.new_empty(kept, dtype=dtype),
            hidden.new_empty(kept if with_entropy else 0, dtype=dtype))


@torch.library.custom_op("cce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad_loss: Optional[Tensor], grad_lse: Optional[Tensor], hidden: Tensor,
                                  weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                                  ignore_index: int, label_smoothing: float, softcap: Optional[float],
                                  logit_scale: float, need_d_weight: bool = True,
                                  grad_entropy: Optional[Tensor] = None,
                                  entropy: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden, d_weight, d_bias); d_bias is an empty tensor when there is no bias, d_weight an empty
    tensor when ``need_d_weight`` is False (a frozen lm-head: its matmul is skipped). ``grad_entropy``: the
    upstream gradient of the forward's entropy output, which is then passed as ``entropy``."""
    opts = LossOptions(ignore_index, label_smoothing, softcap, logit_scale)
    stat = stat_dtype(hidden)
    if grad_entropy is not None and (entropy is None or entropy.shape != grad_entropy.shape):
        raise ValueError("grad_entropy needs the forward's entropy output of the same shape (entropy=...)")
    if grad_loss is None:  # only the lse / entropy was used (a z-loss or an entropy alone): no loss term
        grad_loss = hidden.new_zeros(hidden.shape[0], dtype=stat)
    grad_loss = grad_loss.to(stat)
    if grad_lse is not None:
        grad_lse = grad_lse.to(stat)
    if grad_entropy is not None:
        grad_entropy, entropy = grad_entropy.to(stat), entropy.to(stat)
    with autocast_off(hidden):
        d_hidden, d_weight, d_bias = select.low_memory_backward(grad_loss, grad_lse, hidden, weight, bias, targets,
                                                                lse, opts, need_d_weight=need_d_weight,
                                                                grad_entropy=grad_entropy,
                                                                entropy=entropy if grad_entropy is not None else None)
    if d_weight is None:
        d_weight = hidden.new_empty(0)
    if d_bias is None:
        d_bias = hidden.new_empty(0)
    return d_hidden, d_weight, d_bias


@linear_cross_entropy_backward.register_fake
def _(grad_loss, grad_lse, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, softcap,
      logit_scale, need_d_weight=True, grad_entropy=None, entropy=None):
    d_bias = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_d_weight else hidden.new_empty(0)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), d_weight, d_bias


def setup_context(ctx, inputs, output):
    """Saves what the backward recomputes from (never the logits): the op's own copies of lse and entropy
    (outputs 4 and 5), or, for the torch.func form's three outputs (an eager autograd.Function, where
    autograd's version check protects saved outputs), lse and entropy themselves."""
    hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale = inputs[:8]
    lse, entropy = (output[3], output[4]) if len(output) == 5 else (output[1], output[2])
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.loss_args = (ignore_index, label_smoothing, softcap, logit_scale)
    # An unused output (usually lse, or the entropy) then arrives as None instead of a materialised zero tensor.
    ctx.set_materialize_grads(False)


def input_grads(ctx, grad_loss, grad_lse, grad_entropy=None) -> tuple:
    """(d_hidden, d_weight, d_bias) for the forward's first three inputs (None where not needed).
    Shared with the torch.func form."""
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    if grad_entropy is not None and entropy.numel() != lse.numel():  # the empty placeholder: never computed
        grad_entropy = None
    if grad_loss is None and grad_lse is None and grad_entropy is None:
        return None, None, None
    if lse.numel() != hidden.shape[0]:
        raise RuntimeError("cce::linear_cross_entropy_forward was called with for_backward=False: it kept nothing "
                           "for a backward")
    need_d_weight = ctx.needs_input_grad[1]
    d_hidden, d_weight, d_bias = torch.ops.cce.linear_cross_entropy_backward(
        grad_loss, grad_lse, hidden, weight, bias, targets, lse, *ctx.loss_args, need_d_weight=need_d_weight,
        grad_entropy=grad_entropy, entropy=entropy if grad_entropy is not None else None)
    return d_hidden, d_weight if need_d_weight else None, d_bias if bias is not None else None


def _backward(ctx, grad_loss, grad_lse, grad_entropy, _grad_saved_lse=None, _grad_saved_entropy=None):
    # (the saved copies are the backward's own: nothing differentiates them)
    return input_grads(ctx, grad_loss, grad_lse, grad_entropy) + (None,) * 7  # targets, options and flags


linear_cross_entropy_forward.register_autograd(_backward, setup_context=setup_context)
