"""Implementation selection: which implementation computes a call, with what settings, and the fallback.

The custom ops (:mod:`cce_inductor.ops`) call the three functions below. Each reads
:mod:`cce_inductor.config` once (:meth:`Settings.from_config`) and passes what the implementations need
down as arguments — the kernels never read the config themselves:

* **Triton or PyTorch**: the Triton kernels (:mod:`cce_inductor.kernels`) for CUDA tensors of 16/32-bit
  floats (and CPU tensors inside :func:`use_triton_on_cpu`, for the interpreter tests); the PyTorch
  implementations (:mod:`cce_inductor.torch_impl`) otherwise (CPU, float64).
* **Kernel variant**: the forward kernel (fused or chunked), the fast path's d_weight accumulation, the
  low-memory d_hidden scheme and the slab size, resolved into one :class:`~cce_inductor.kernels.tiles.KernelConfig`.
* **Scheme of the fast op**: its token chunks from :func:`cce_inductor.paths.plan_fast`; with
  ``path="auto"`` and a workspace over the budget, the low-memory scheme inside the same op.
* **Fallback**: where the Triton kernels do not fit the device (no tile fits its shared memory, or a
  launch runs out of resources: :func:`~cce_inductor.core.errors.kernel_does_not_fit`), the PyTorch
  implementation runs instead, with one log line per process.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from .core.dtypes import TRITON_DTYPES, stat_dtype
from .core.errors import kernel_does_not_fit
from .core.reduce import reduce_loss, reduction_weight
from .core.settings import Settings
from .logging_ import warn_once
from .options import LossOptions
from .paths import plan_fast
from .torch_impl import common as torch_common
from .torch_impl import fast as torch_fast
from .torch_impl import low_memory as torch_low_memory

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


def uses_triton(hidden: Tensor) -> bool:
    return hidden.dtype in TRITON_DTYPES and (hidden.is_cuda or _triton_on_cpu)


def _kernels():
    """The Triton kernels: triton is an optional dependency, imported only where the kernels run."""
    from . import kernels

    return kernels


def kernel_config(hidden: Tensor, weight: Tensor, settings: Settings):
    """The kernels' configuration for this problem and device, with the config's scheme choices resolved.
    Raises KernelDoesNotFit where no tile fits the device."""
    cfg = _kernels().pick_config(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.dtype, hidden.device)
    cfg = cfg.with_(dhidden_scheme=settings.low_memory_dhidden, fold_slab_bytes=settings.fold_slab_bytes)
    if settings.fast_path_weight_accumulate != "auto":  # "auto": the device's default (GPU_CONFIG, INTERPRETER_CONFIG)
        cfg = cfg.with_(weight_accumulate=settings.fast_path_weight_accumulate)
    return cfg


def _triton_or_torch(what: str, triton_call: Callable, torch_call: Callable):
    """``triton_call()``, or ``torch_call()`` with a log line (once per process) when the kernels do not fit."""
    try:
        return triton_call()
    except Exception as ex:  # noqa: BLE001 - only the does-not-fit conditions are caught below
        if not kernel_does_not_fit(ex):
            raise
        warn_once(f"cce_inductor: the Triton kernels of the {what} do not fit this device (%s); using its "
                  "PyTorch implementation", ex)
        return torch_call()


def _triton_low_memory_forward(hidden, weight, bias, targets, opts, for_backward: bool, settings: Settings,
                               with_entropy: bool = False):
    """``config.forward_kernel``: "auto" is the fused kernel when the backward will recompute the logits from
    this lse (its fp32 logits are the ones the backward recomputes, so softmax sums to 1 exactly there: with
    the chunked forward's bf16 logits the low-memory gradients were 1.3x eager's error on an H200), the
    chunked one (cuBLAS logits + row kernel: torch.compile's speed) for a forward without gradient on CUDA."""
    kernels = _kernels()
    cfg = kernel_config(hidden, weight, settings)
    choice = settings.forward_kernel
    if choice == "auto":
        choice = "chunked" if (hidden.is_cuda and not for_backward) else "fused"
    if choice == "chunked":
        return kernels.triton_chunked_forward(hidden, weight, bias, targets, opts,
                                              chunk_bytes=settings.forward_chunk_bytes, config=cfg,
                                              with_entropy=with_entropy)
    return kernels.triton_forward(hidden, weight, bias, targets, opts, config=cfg, with_entropy=with_entropy)


def _triton_low_memory_backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts, need_d_weight,
                                settings: Settings, grad_entropy=None, entropy=None):
    return _kernels().triton_backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts,
                                      config=kernel_config(hidden, weight, settings), need_d_weight=need_d_weight,
                                      grad_entropy=grad_entropy, entropy=entropy)


def low_memory_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: LossOptions,
                       *, for_backward: bool = True, with_entropy: bool = False,
                       settings: Optional[Settings] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-token (loss [N], lse [N], entropy [N] | None) in the op's arithmetic dtype; the entropy of
    softmax(logits) only with ``with_entropy``. ``for_backward=False``: no gradient will be computed from
    this call (which picks the no-grad forward kernel on CUDA)."""
    s = settings if settings is not None else Settings.from_config()

    def on_torch():
        return torch_low_memory.forward(hidden, weight, bias, targets, opts, with_entropy=with_entropy)
    if not uses_triton(hidden):
        out = on_torch()
    else:
        out = _triton_or_torch("low-memory path", lambda: _triton_low_memory_forward(
            hidden, weight, bias, targets, opts, for_backward, s, with_entropy), on_torch)
    return out if with_entropy else (*out, None)


def low_memory_backward(grad_loss: Tensor, grad_lse: Optional[Tensor], hidden: Tensor, weight: Tensor,
                        bias: Optional[Tensor], targets: Tensor, lse: Tensor, opts: LossOptions, *,
                        need_d_weight: bool = True, grad_entropy: Optional[Tensor] = None,
                        entropy: Optional[Tensor] = None, settings: Optional[Settings] = None):
    """(d_hidden, d_weight | None, d_bias | None) for per-token upstream gradients of the loss, the lse and
    (``grad_entropy``, with the forward's ``entropy``) the entropy."""
    s = settings if settings is not None else Settings.from_config()

    def on_torch():
        return torch_low_memory.backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts,
                                         need_d_weight=need_d_weight, grad_entropy=grad_entropy, entropy=entropy)
    if not uses_triton(hidden):
        return on_torch()
    return _triton_or_torch("low-memory path", lambda: _triton_low_memory_backward(
        grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts, need_d_weight, s, grad_entropy, entropy),
        on_torch)


def scale_in_place(d: Tensor, g: Tensor) -> Tensor:
    """``d *= g`` with one rounding (the fast path's eager backward): one Triton pass where the kernels run,
    float32 blocks in PyTorch elsewhere."""
    if uses_triton(d) and d.is_contiguous():
        return _triton_or_torch("gradient scaling", lambda: _kernels().scale_in_place(d, g),
                                lambda: torch_common.scale_in_place(d, g))
    return torch_common.scale_in_place(d, g)


def jvp(hidden, weight, bias, targets, lse, t_hidden, t_weight, t_bias, opts: LossOptions, entropy=None):
    """Forward-mode tangents of (loss, lse, entropy | None): the PyTorch formula on every device."""
    return torch_low_memory.jvp(hidden, weight, bias, targets, lse, t_hidden, t_weight, t_bias, opts,
                                entropy=entropy)


def _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden, need_d_weight,
                           triton: bool, settings: Settings):
    """The fast op's outputs from the low-memory scheme (forward, then the backward with the reduction's
    per-token weight): for shapes whose fast-path workspace does not fit the budget."""
    if triton:
        loss_rows, lse = _triton_low_memory_forward(hidden, weight, bias, targets, opts, True, settings)
    else:
        loss_rows, lse = torch_low_memory.forward(hidden, weight, bias, targets, opts)
    coef = reduction_weight(targets, opts.ignore_index, reduction, loss_rows.dtype)
    grads = (coef.expand(hidden.shape[0]).contiguous(), None, hidden, weight, bias, targets, lse, opts)
    if triton:
        d_hidden, d_weight, d_bias = _triton_low_memory_backward(*grads, need_d_weight, settings)
    else:
        d_hidden, d_weight, d_bias = torch_low_memory.backward(*grads, need_d_weight=need_d_weight)
    loss = reduce_loss(loss_rows, targets, opts.ignore_index, reduction, None)
    return loss, (d_hidden if need_d_hidden else None), d_weight, d_bias


def fast_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: LossOptions,
                 reduction: str, need_d_hidden: bool, need_d_weight: bool, need_d_bias: bool, path: str = "auto",
                 *, settings: Optional[Settings] = None):
    """(loss 0-d, d_hidden | None, d_weight | None, d_bias | None) of a "mean"/"sum" loss for an upstream
    gradient of 1, by the scheme the actual sizes allow; loss and d_bias in the op's arithmetic dtype."""
    s = settings if settings is not None else Settings.from_config()
    N, D = hidden.shape
    plan = plan_fast(N, D, weight.shape[0], hidden.dtype, force=path == "fast", settings=s)
    wants = dict(need_d_hidden=need_d_hidden, need_d_weight=need_d_weight, need_d_bias=need_d_bias)

    def on_torch(tokens_per_chunk):
        if plan is None:
            return _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden,
                                          need_d_weight, False, s)
        return torch_fast.forward(hidden, weight, bias, targets, opts, reduction, tokens_per_chunk=tokens_per_chunk,
                                  **wants)

    def on_triton():
        if plan is None:
            return _low_memory_in_forward(hidden, weight, bias, targets, opts, reduction, need_d_hidden,
                                          need_d_weight, True, s)
        return _kernels().triton_fast_forward(hidden, weight, bias, targets, opts, reduction=reduction,
                                   tokens_per_chunk=plan.tokens_per_chunk, remainder=plan.remainder,
                                   config=kernel_config(hidden, weight, s), **wants)

    if uses_triton(hidden):
        out = _triton_or_torch("fast path", on_triton, lambda: on_torch(plan.tokens_per_chunk if plan else None))
    else:  # PyTorch picks cache-sized token chunks itself unless the knob asks for a size
        out = on_torch(s.fast_path_tokens_per_chunk)
    loss, d_hidden, d_weight, d_bias = out
    stat = stat_dtype(hidden)
    return loss.to(stat), d_hidden, d_weight, (d_bias.to(stat) if (need_d_bias and d_bias is not None) else None)
