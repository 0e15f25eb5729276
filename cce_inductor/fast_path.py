"""The fast path as a custom op: ``torch.ops.cce.fast_linear_cross_entropy``.

The forward returns the scalar loss ("mean" or "sum" of the per-token losses) **and** its gradients for
an upstream gradient of 1 (d_hidden, d_weight, and d_bias in float32), computed together with 3 matmuls
per token chunk (``kernels/fast.py`` on the GPU, ``fast_torch.py`` on the CPU). The backward only scales
the saved gradients by the upstream scalar gradient, **in place**: no second V x D tensor.

* Eager autograd: ``mul_`` on the saved tensors, returned as the gradients (AccumulateGrad then takes
  them without a copy). A second backward through the same graph (``retain_graph=True``) would scale
  twice: it raises instead.
* torch.compile: AOTAutograd traces the same backward; the saved gradients are donated buffers (saved
  tensors used only by the backward), and Inductor writes the scaled result into the buffer it reads
  (``del buf # reuse``): one pointwise pass, no new allocation (tested in tests/test_fast_path.py).
  AOTAutograd refuses ``retain_graph=True`` with donated buffers, which also rules out double scaling.

Which scheme the op runs is decided when it runs, from the actual sizes (``paths.plan_fast``): with
``path="auto"`` and a workspace that does not fit the memory budget it forms the same gradients with the
low-memory scheme (fused forward + the vocabulary-chunked backward, 4 matmuls) inside the forward, so the
op's outputs never depend on the decision and a compiled graph stays valid for every size.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import chunked_torch, fast_torch
from .logging_ import warn_once
from .options import LossOptions

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(hidden: Tensor) -> bool:
    from . import op

    return hidden.dtype in _TRITON_DTYPES and (hidden.is_cuda or op._triton_on_cpu)


def _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden, need_d_weight, triton):
    """The same outputs from the low-memory scheme (forward, then the backward with per-token gradient
    coef): for shapes whose fast-path workspace does not fit the budget."""
    if triton:
        from . import kernels
        from .op import _triton_forward

        fwd, bwd = _triton_forward(hidden, for_backward=True), kernels.triton_backward
    else:
        fwd, bwd = chunked_torch.forward, chunked_torch.backward
    loss_rows, lse = fwd(hidden, weight, bias, targets, opts)
    count = (targets != opts.ignore_index).sum()
    stat = loss_rows.dtype
    if reduction == "mean":
        coef = 1.0 / count.clamp_min(1).to(stat)
    else:
        coef = torch.ones((), dtype=stat, device=hidden.device)
    d_hidden, d_weight, d_bias = bwd(coef.expand(hidden.shape[0]).contiguous(), None, hidden, weight, bias, targets,
                                     lse, opts, need_d_weight=need_d_weight)
    loss = loss_rows.sum()
    loss = loss / count if reduction == "mean" else loss
    return loss, (d_hidden if need_d_hidden else None), d_weight, d_bias


def run_fast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: LossOptions,
             reduction: str, need_d_hidden: bool, need_d_weight: bool, need_d_bias: bool, path: str = "auto"):
    """(loss, d_hidden | None, d_weight | None, d_bias (float32/float64) | None) by the scheme the sizes allow."""
    from .paths import plan_fast

    N, D = hidden.shape
    V = weight.shape[0]
    triton = _use_triton(hidden)
    if not triton:
        from . import config

        if path == "auto" and plan_fast(N, D, V, hidden.dtype) is None:
            out = _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden,
                                         need_d_weight, triton=False)
        else:  # PyTorch picks cache-sized token chunks itself unless the knob asks for a size
            out = fast_torch.forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden=need_d_hidden,
                                     need_d_weight=need_d_weight, need_d_bias=need_d_bias,
                                     tokens_per_chunk=config.fast_path_tokens_per_chunk)
    else:
        plan = plan_fast(N, D, V, hidden.dtype, force=path == "fast")
        try:
            if plan is not None:
                from .kernels.fast import triton_fast_forward

                out = triton_fast_forward(hidden, weight, bias, targets, opts, reduction=reduction,
                                          tokens_per_chunk=plan.tokens_per_chunk, remainder=plan.remainder,
                                          need_d_hidden=need_d_hidden, need_d_weight=need_d_weight,
                                          need_d_bias=need_d_bias)
            else:
                out = _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden,
                                             need_d_weight, triton=True)
        except Exception as ex:  # noqa: BLE001 - e.g. triton OutOfResources on an unknown device
            if not _is_out_of_resources(ex):
                raise
            warn_once("cce_inductor: the fast path's Triton kernels do not fit this device (%s); using its "
                      "PyTorch implementation", ex)
            if plan is None:  # the budget asked for the low-memory scheme: its PyTorch form
                out = _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden,
                                             need_d_weight, triton=False)
            else:
                out = fast_torch.forward(hidden, weight, bias, targets, opts, reduction,
                                         need_d_hidden=need_d_hidden, need_d_weight=need_d_weight,
                                         need_d_bias=need_d_bias, tokens_per_chunk=plan.tokens_per_chunk)
    loss, d_hidden, d_weight, d_bias = out
    stat = chunked_torch.stat_dtype(hidden)
    if d_bias is not None:
        d_bias = d_bias.to(stat)
    return loss.to(stat), d_hidden, d_weight, (d_bias if need_d_bias else None)


def _is_out_of_resources(ex: Exception) -> bool:
    """Triton's OutOfResources (a launch needs more shared memory/registers than the device has) or our
    KernelDoesNotFit (no tile configuration fits): the PyTorch path runs instead."""
    return type(ex).__name__ in ("OutOfResources", "KernelDoesNotFit") or "out of resource" in str(ex).lower()


@torch.library.custom_op("cce::fast_linear_cross_entropy", mutates_args=())
def fast_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                              ignore_index: int, label_smoothing: float, softcap: Optional[float],
                              logit_scale: float, reduction: str, need_d_hidden: bool, need_d_weight: bool,
                              need_d_bias: bool, path: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, d_hidden [N, D], d_weight [V, D], d_bias [V] float32) for an upstream gradient of 1;
    a gradient not asked for is an empty tensor. loss and d_bias are float64 for float64 inputs."""
    from .op import _autocast_off, _options

    opts = _options(ignore_index, label_smoothing, softcap, logit_scale)
    with _autocast_off(hidden), torch.no_grad():
        loss, dh, dw, db = run_fast(hidden, weight, bias, targets, opts, reduction, need_d_hidden, need_d_weight,
                                    need_d_bias and bias is not None, path)
    empty = hidden.new_empty  # a distinct empty tensor per missing output (outputs may not alias)
    return loss, (empty(0) if dh is None else dh), (empty(0) if dw is None else dw), (empty(0) if db is None else db)


@fast_linear_cross_entropy.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale, reduction, need_d_hidden,
      need_d_weight, need_d_bias, path="auto"):
    stat = chunked_torch.stat_dtype(hidden)
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


# Rows of a 16-bit gradient scaled per step of the eager backward (a float32 copy of this many elements).
_SCALE_BLOCK_ELEMENTS = 16 << 20


def _scale_in_place(d: Tensor, g: Tensor) -> Tensor:
    """``d *= g`` with one rounding: the product in float32, then rounded to d's dtype.

    Traced by torch.compile this is ``mul_``, which Inductor computes in float32 with g as a float32 value,
    in the buffer it reads. Eagerly, a 16-bit ``mul_`` by a 0-d float32 CUDA tensor may round g to 16 bits
    first (a systematic error of up to 2^-9 in every gradient), so blocks of rows are multiplied in float32.
    """
    if d.dtype not in (torch.float16, torch.bfloat16) or torch.compiler.is_compiling() or d.numel() == 0:
        return d.mul_(g)
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        return d.mul_(g)
    flat = d.view(d.shape[0], -1)
    rows = max(1, _SCALE_BLOCK_ELEMENTS // max(1, flat.shape[1]))
    for s in range(0, flat.shape[0], rows):
        block = flat[s:s + rows]
        block.copy_(block.float().mul_(g))
    return d


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
