"""``linear_cross_entropy``: the public function — checks, flattening, autocast, reduction around the op."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import fast_path as _fast_path  # noqa: F401  (registers torch.ops.cce.fast_linear_cross_entropy)
from . import op as _op  # noqa: F401  (registers torch.ops.cce.*)
from .chunked_torch import stat_dtype
from .options import LossOptions
from .reference import reference_linear_cross_entropy  # noqa: F401  (kept importable from here)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], reduction: str):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D]; got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D]; got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight's second dim "
                         f"(weight is [V, D] = {tuple(weight.shape)})")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating-point tensor (fp16, bf16, fp32, fp64); got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}; "
                        "cast them to one dtype (or run under torch.autocast)")
    if bias is not None and bias.dtype not in (hidden.dtype, stat_dtype(hidden)):
        raise TypeError(f"bias dtype {bias.dtype} must be hidden's dtype ({hidden.dtype}) or the op's arithmetic "
                        f"dtype ({stat_dtype(hidden)}: a bias eager would add in that precision)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices; got {targets.dtype} "
                        "(probability/soft targets are not supported: use F.cross_entropy for those)")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])} (hidden is [..., D] = {tuple(hidden.shape)})")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, bias and targets must be on one device; got {sorted(map(str, devices))}")


def _is_tracing(t: Tensor) -> bool:
    """True under Dynamo, AOTAutograd/make_fx tracing or fake tensors: values are not available there."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return torch.compiler.is_compiling() or get_proxy_mode() is not None or is_fake(t)


def _check_target_range(targets: Tensor, vocab: int, ignore_index: int):
    """A clear error for labels outside [0, V) that are not ignore_index.

    Runs in eager mode only (it needs the values on the host: on CUDA that is one synchronisation).
    Under torch.compile or CUDA-graph capture it is skipped and such rows give a NaN loss instead, so
    a bad label is never a silent wrong number. ``CCE_INDUCTOR_CHECK_TARGETS=0`` turns it off.
    """
    if targets.device.type == "meta" or _is_tracing(targets) or os.environ.get("CCE_INDUCTOR_CHECK_TARGETS", "1") == "0":
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"target {targets[tuple(where)].item()} at position {tuple(where)} is outside the "
                         f"vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # autocast never casts float64


def _autocast_like_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast as ``F.linear`` is cast under ``torch.autocast``: floating inputs other than float64 go to the
    autocast dtype; anything else is left as it is."""
    device_type = hidden.device.type
    if device_type not in ("cuda", "cpu", "xpu") or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    amp = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(amp) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t
    return cast(hidden), cast(weight), cast(bias)


def _is_dtensor(t) -> bool:
    from .distributed.functional import _is_dtensor as is_dtensor

    return is_dtensor(t)


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
    ``cce_inductor.paths``.

    A DTensor weight sharded on the vocabulary (``Shard(0)``, tensor parallel) with DTensor hidden states
    on the same 1-D mesh runs the vocabulary-parallel op (``cce_inductor.distributed``); it has one scheme
    (the low-memory one), so ``path`` is checked but has no effect there.
    """
    if any(_is_dtensor(t) for t in (weight, hidden, bias, targets)):  # a tensor-parallel lm-head
        from .distributed.dtensor import dtensor_vocab_parallel_linear_cross_entropy
        from .paths import PATHS

        if path is not None and path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")

        return dtensor_vocab_parallel_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
    hidden, weight, bias = _autocast_like_linear(hidden, weight, bias)
    return _linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
                                 return_lse=return_lse, path=path)


def _needs_transformable_op(*tensors: Optional[Tensor]) -> bool:
    """True inside a torch.func transform or with forward-mode AD dual tensors: the custom op's autograd
    formula covers neither, so an autograd.Function with a setup_context and a jvp runs instead.
    Never while torch.compile traces (the rewrite leaves losses inside transforms alone)."""
    if torch.compiler.is_compiling() or any(t is not None and _is_tracing(t) for t in tensors):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) >= 0:
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def _linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                          ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                          softcap: Optional[float] = None, logit_scale: float = 1.0, return_lse: bool = False,
                          path: Optional[str] = None):
    """:func:`linear_cross_entropy` without the autocast casts: what the graph rewrite inserts (its plan
    already chose the dtypes each input is handed over in)."""
    _check_inputs(hidden, weight, targets, bias, reduction)
    LossOptions(ignore_index, label_smoothing, softcap, logit_scale)  # validates the options
    if targets.dtype not in (torch.int32, torch.int64):  # the kernels index with int32/int64 labels
        targets = targets.long()
    _check_target_range(targets, weight.shape[0], ignore_index)

    lead_shape = hidden.shape[:-1]
    flat_targets = targets.reshape(-1)
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, ignore_index, float(label_smoothing),
            None if softcap is None else float(softcap), float(logit_scale))
    if _needs_transformable_op(hidden, weight, bias):
        loss, lse = _op.TransformableLinearCrossEntropy.apply(*args)
    else:
        fast = _fast_path_call(hidden, weight, bias, flat_targets, ignore_index, label_smoothing, softcap,
                               logit_scale, reduction, return_lse, path)
        if fast is not None:
            return fast
        grad_follows = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        loss, lse = torch.ops.cce.linear_cross_entropy_forward(*args, for_backward=grad_follows)
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:  # eager's mean: sum over non-ignored tokens / their count (nan when every token is ignored)
        loss = loss.sum() / (flat_targets != ignore_index).sum()
    if return_lse:
        return loss, lse.reshape(lead_shape)
    return loss


def _fast_path_call(hidden, weight, bias, flat_targets, ignore_index, label_smoothing, softcap, logit_scale,
                    reduction, return_lse, path):
    """The fast path's op when it applies (decided from flags only, never from sizes: static under
    torch.compile; the op itself picks its scheme from the actual sizes), else None."""
    from . import config
    from .paths import PATHS

    path = config.path if path is None else path
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    wants = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    if path == "low_memory" or reduction == "none" or return_lse or not (torch.is_grad_enabled() and any(wants)):
        return None
    loss, _, _, _ = torch.ops.cce.fast_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, ignore_index, float(label_smoothing),
        None if softcap is None else float(softcap), float(logit_scale), reduction, wants[0], wants[1], wants[2],
        path)
    return loss
