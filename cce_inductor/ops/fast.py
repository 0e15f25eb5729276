"""The fast path as a custom op: ``torch.ops.cce.fast_linear_cross_entropy``.

The forward returns the scalar loss ("mean" or "sum" of the per-token losses) **and** its gradients for
an upstream gradient of 1 (d_hidden, d_weight, and d_bias in float32), computed together with 3 matmuls
per token chunk (``kernels/fast.py`` on the GPU, ``torch_impl/fast.py`` on the CPU: :mod:`cce_inductor.select`
decides). The backward only scales the saved gradients by the upstream scalar gradient, **in place**: no
second V x D tensor.

* Eager autograd: ``mul_`` on the saved tensors, returned as the gradients (AccumulateGrad then takes
  them without a copy). A second backward through the same graph (``retain_graph=True``) would scale
  twice: it raises instead.
* torch.compile: AOTAutograd traces the same backward; the saved gradients are donated buffers (saved
  tensors used only by the backward), and Inductor writes the scaled result into the buffer it reads
  (``del buf # reuse``): one pointwise pass, no new allocation (tested in tests/test_fast_path.py).
  AOTAutograd refuses ``retain_graph=True`` with donated buffers, which also rules out double scaling.

Which scheme the op runs is decided when it runs, from the actual sizes (``select.fast_forward``,
``paths.plan_fast``): with ``path="auto"`` and a workspace that does not fit the memory budget it forms the
same gradients with the low-memory scheme (fused forward + the vocabulary-chunked backward, 4 matmuls)
inside the forward, so the op's outputs never depend on the decision and a compiled graph stays valid for
every size.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from .. import select
from ..core.dtypes import autocast_off, stat_dtype
from ..options import LossOptions


@torch.library.custom_op("cce::fast_linear_cross_entropy", mutates_args=())
def fast_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                              ignore_index: int, label_smoothing: float, softcap: Optional[float],
                              logit_scale: float, reduction: str, need_d_hidden: bool, need_d_weight: bool,
                              need_d_bias: bool, path: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, d_hidden [N, D], d_weight [V, D], d_bias [V] float32) for an upstream gradient of 1;
    a gradient not asked for is an empty tensor. loss and d_bias are float64 for float64 inputs."""
    opts = LossOptions(ignore_index, label_smoothing, softcap, logit_scale)
    with autocast_off(hidden), torch.no_grad():
        loss, dh, dw, db = select.fast_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden,
                                               need_d_weight, need_d_bias and bias is not None, path)
    empty = hidden.new_empty  # a distinct empty tensor per missing output (outputs may not alias)
    return loss, (empty(0) if dh is None else dh), (empty(0) if dw is None else dw), (empty(0) if db is None else db)


@fast_linear_cross_entropy.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale, reduction, need_d_hidden,
      need_d_weight, need_d_bias, path="auto"):
    stat = stat_dtype(hidden)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_d_hidden else hidden.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_d_weight else hidden.new_empty(0)
    db = hidden.new_empty(weight.shape[0], dtype=stat) if (need_d_bias and bias is not None) else hidden.new_empty(0)
    return hidden.new_empty((), dtype=stat), dh, dw, db


def _setup_context(ctx, inputs, output):
    bias = inputs[2]
    need_d_hidden, need_d_weight, need_d_bias = inputs[9], inputs[10], inputs[11]
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.wants = (need_d_hidden, need_d_weight, need_d_bias and bias is not None)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.consumed = False
    ctx.set_materialize_grads(False)


def _scale_in_place(d: Tensor, g: Tensor) -> Tensor:
    """``d *= g`` with one rounding: the product in float32, then rounded to d's dtype.

    Traced by torch.compile this is ``mul_``, which Inductor computes in float32 with g as a float32 value,
    in the buffer it reads. Eagerly, a 16-bit ``mul_`` by a 0-d float32 tensor may round g to 16 bits first
    (a systematic error of up to 2^-9 in every gradient): ``select.scale_in_place`` multiplies in float32.
    """
    if d.dtype not in (torch.float16, torch.bfloat16) or torch.compiler.is_compiling() or d.numel() == 0:
        return d.mul_(g)
    if get_proxy_mode() is not None:
        return d.mul_(g)
    return select.scale_in_place(d, g)


def _backward(ctx, grad_loss, *_unused):
    nones = [None] * 13
    if grad_loss is None:
        return tuple(nones)
    if ctx.consumed:
        raise RuntimeError(
            "cce_inductor's fast path scales its saved gradients in place in the backward, so it can run "
            "only once per forward (retain_graph=True and a second backward are not supported): pass "
            "path='low_memory' for this loss (or set cce_inductor.config.path = 'low_memory' before it is "
            "called or compiled)")
    ctx.consumed = True
    dh, dw, db = ctx.saved_tensors
    want_h, want_w, want_b = ctx.wants
    grads = list(nones)
    if want_h:
        grads[0] = _scale_in_place(dh, grad_loss)
    if want_w:
        grads[1] = _scale_in_place(dw, grad_loss)
    if want_b:
        grads[2] = (db * grad_loss).to(ctx.bias_dtype)
    return tuple(grads)


fast_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
