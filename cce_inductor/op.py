"""The custom ops ``torch.ops.cce.linear_cross_entropy_forward`` / ``..._backward`` and their autograd.

Both ops work on flattened inputs (hidden [N, D], targets [N]) and per-token outputs; reductions and
reshapes live in ``cce_inductor.api`` as plain PyTorch, so the compiler sees them and they need no
kernel. Each op is opaque to torch.compile (a single kernel call in the graph) with a fake
implementation for tracing and dynamic shapes. The forward saves hidden, weight, bias, targets and
the per-token log-sum-exp — never the logits.

Which implementation runs: the Triton kernels for CUDA tensors of 16/32-bit floats, the chunked
PyTorch path otherwise. ``use_triton_on_cpu()`` routes CPU tensors to the Triton kernels too (for
testing them under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import chunked_torch
from .options import LossOptions

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_triton_on_cpu = False


@contextlib.contextmanager
def use_triton_on_cpu(enabled: bool = True):
    """Run the Triton kernels on CPU tensors (only meaningful with ``TRITON_INTERPRET=1``)."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, enabled
    try:
        yield
    finally:
        _triton_on_cpu = previous


def _uses_triton(hidden: Tensor) -> bool:
    return hidden.dtype in _TRITON_DTYPES and (hidden.is_cuda or _triton_on_cpu)


def _forward_impl(hidden: Tensor, for_backward: bool = True):
    """The per-token forward for these inputs: a Triton kernel, or the chunked PyTorch one."""
    return _triton_forward(hidden, for_backward) if _uses_triton(hidden) else chunked_torch.forward


def _backward_impl(hidden: Tensor):
    if _uses_triton(hidden):
        from . import kernels  # imported lazily: triton is not needed for the CPU path

        return kernels.triton_backward
    return chunked_torch.backward


def _triton_forward(hidden: Tensor, for_backward: bool = True):
    """The per-token forward kernel ``cce_inductor.config.forward_kernel`` asks for (see config.py).

    "auto": the fused kernel when the backward will recompute the logits from this lse (its fp32 logits are
    the ones the backward recomputes, so softmax sums to 1 exactly there: with the chunked forward's bf16
    logits the low-memory gradients were 1.3x eager's error on an H200), the chunked one for a forward
    without gradient on CUDA (torch.compile's speed)."""
    from . import config, kernels

    choice = config.forward_kernel
    if choice == "auto":
        choice = "chunked" if (hidden.is_cuda and not for_backward) else "fused"
    if choice == "chunked":
        chunk_bytes = config.forward_chunk_bytes
        return lambda h, w, b, t, opts: kernels.triton_chunked_forward(h, w, b, t, opts, chunk_bytes=chunk_bytes)
    if choice != "fused":
        raise ValueError(f"config.forward_kernel must be 'auto', 'fused' or 'chunked', got {choice!r}")
    return kernels.triton_forward


def _or_pytorch(impl, fallback, *args, **kwargs):
    """impl(...), or the PyTorch path with a log line when the Triton kernels do not fit the device
    (Triton's OutOfResources, or no tile configuration fits its shared memory)."""
    if impl is fallback:
        return impl(*args, **kwargs)
    try:
        return impl(*args, **kwargs)
    except Exception as ex:  # noqa: BLE001
        from .fast_path import _is_out_of_resources

        if not _is_out_of_resources(ex):
            raise
        from .logging_ import warn_once

        warn_once("cce_inductor: the Triton kernels do not fit this device (%s); using the PyTorch path", ex)
        return fallback(*args, **kwargs)


def _autocast_off(hidden: Tensor):
    """The implementations choose their own precision: autocast (still on inside a custom op's body,
    and during a backward run under it) must not recast their internal matmuls."""
    return torch.autocast(hidden.device.type, enabled=False)


def _options(ignore_index, label_smoothing, softcap, logit_scale) -> LossOptions:
    return LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                       logit_scale=logit_scale)


@torch.library.custom_op("cce::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                 ignore_index: int, label_smoothing: float, softcap: Optional[float],
                                 logit_scale: float, for_backward: bool = True) -> tuple[Tensor, Tensor]:
    """Per-token (loss, lse) [N], float32 (float64 for float64 inputs); loss is 0 on ignored tokens.
    ``for_backward=False``: no gradient will be computed from this call (picks the no-grad forward kernel)."""
    fwd = _forward_impl(hidden, for_backward)
    opts = _options(ignore_index, label_smoothing, softcap, logit_scale)
    with _autocast_off(hidden):
        return _or_pytorch(fwd, chunked_torch.forward, hidden, weight, bias, targets, opts)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale, for_backward=True):
    n, dtype = hidden.shape[0], chunked_torch.stat_dtype(hidden)
    return hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype)


@torch.library.custom_op("cce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad_loss: Optional[Tensor], grad_lse: Optional[Tensor], hidden: Tensor,
                                  weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                                  ignore_index: int, label_smoothing: float, softcap: Optional[float],
                                  logit_scale: float, need_d_weight: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden, d_weight, d_bias); d_bias is an empty tensor when there is no bias, d_weight an empty
    tensor when ``need_d_weight`` is False (a frozen lm-head: its matmul is skipped)."""
    bwd = _backward_impl(hidden)
    opts = _options(ignore_index, label_smoothing, softcap, logit_scale)
    stat = chunked_torch.stat_dtype(hidden)
    if grad_loss is None:  # only the lse was used (a z-loss alone): the loss term contributes nothing
        grad_loss = hidden.new_zeros(hidden.shape[0], dtype=stat)
    grad_loss = grad_loss.to(stat)
    if grad_lse is not None:
        grad_lse = grad_lse.to(stat)
    with _autocast_off(hidden):
        d_hidden, d_weight, d_bias = _or_pytorch(bwd, chunked_torch.backward, grad_loss, grad_lse, hidden, weight,
                                                 bias, targets, lse, opts, need_d_weight=need_d_weight)
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


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale = inputs[:8]
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.loss_args = (ignore_index, label_smoothing, softcap, logit_scale)
    # An unused output (usually lse) then arrives as None instead of a materialised zero tensor.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    if grad_loss is None and grad_lse is None:
        return (None,) * 9
    need_d_weight = ctx.needs_input_grad[1]
    d_hidden, d_weight, d_bias = linear_cross_entropy_backward(grad_loss, grad_lse, hidden, weight, bias, targets,
                                                               lse, *ctx.loss_args, need_d_weight=need_d_weight)
    return (d_hidden, d_weight if need_d_weight else None, d_bias if bias is not None else None) + (None,) * 6


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


class TransformableLinearCrossEntropy(torch.autograd.Function):
    """The forward op as an ``autograd.Function`` for torch.func transforms and forward-mode AD.

    ``linear_cross_entropy`` routes here only inside a torch.func transform (grad, vjp, jacrev, vmap, jvp)
    or when an input is a forward-AD dual tensor; everywhere else (eager autograd, torch.compile) the custom
    op above runs. Same kernels: forward = the forward op, backward = the backward op; ``jvp`` is the
    forward-mode formula (``chunked_torch.jvp``, logits a token chunk at a time); ``vmap`` comes from
    running these per batch element (``generate_vmap_rule``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale):
        return torch.ops.cce.linear_cross_entropy_forward(hidden, weight, bias, targets, ignore_index,
                                                          label_smoothing, softcap, logit_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, logit_scale = inputs
        _, lse = output
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.save_for_forward(hidden, weight, bias, targets, lse)
        ctx.loss_args = (ignore_index, label_smoothing, softcap, logit_scale)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable()

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises a clear error, never zeros
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        if grad_loss is None and grad_lse is None:
            return None, None, None, None, None, None, None, None
        need_d_weight = ctx.needs_input_grad[1]
        d_hidden, d_weight, d_bias = torch.ops.cce.linear_cross_entropy_backward(
            grad_loss, grad_lse, hidden, weight, bias, targets, lse, *ctx.loss_args, need_d_weight=need_d_weight)
        return (d_hidden, d_weight if need_d_weight else None, d_bias if bias is not None else None,
                None, None, None, None, None)

    @staticmethod
    def jvp(ctx, t_hidden, t_weight, t_bias, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        with _autocast_off(hidden):
            return chunked_torch.jvp(hidden, weight, bias, targets, lse, t_hidden, t_weight, t_bias,
                                     _options(*ctx.loss_args))
