"""``linear_cross_entropy``: the public function — checks, flattening, autocast, reduction around the op."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import op as _op  # noqa: F401  (registers torch.ops.cce.*)
from .options import LossOptions

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
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match hidden dtype {hidden.dtype}; "
                            "cast them to one dtype (or run under torch.autocast)")
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
    if _is_tracing(targets) or os.environ.get("CCE_INDUCTOR_CHECK_TARGETS", "1") == "0":
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"target {targets[tuple(where)].item()} at position {tuple(where)} is outside the "
                         f"vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _is_dtensor(t) -> bool:
    from .distributed.functional import _is_dtensor as is_dtensor

    return is_dtensor(t)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: Optional[float] = None, logit_scale: float = 1.0, return_lse: bool = False):
    """Cross-entropy of ``softcap(logit_scale * F.linear(hidden, weight, bias))`` without storing the logits.

    Equal to::

        z = logit_scale * F.linear(hidden, weight, bias)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        F.cross_entropy(z.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    hidden is ``[..., D]``, weight ``[V, D]``, bias ``[V]``, targets ``hidden.shape[:-1]`` (integer class
    indices). ``reduction="none"`` returns ``hidden.shape[:-1]``. The result is float32 (as with the
    ``.float()`` above). ``return_lse=True`` also returns the per-token log-sum-exp of the logits
    (float32, ``hidden.shape[:-1]``, differentiable: a z-loss can use it).

    Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype, as ``F.linear`` would.

    A DTensor ``weight`` sharded on the vocabulary (``Shard(0)`` on a 1-D mesh, ``ColwiseParallel``) with a
    DTensor ``hidden`` takes the vocabulary-parallel path (:mod:`cce_inductor.distributed`).
    """
    if _is_dtensor(weight) or _is_dtensor(hidden):  # a vocabulary-sharded (tensor-parallel) lm-head
        from .distributed.dtensor import dtensor_vocab_parallel_linear_cross_entropy

        return dtensor_vocab_parallel_linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
    amp_dtype = _autocast_dtype(hidden.device.type)
    if amp_dtype is not None:
        hidden, weight = hidden.to(amp_dtype), weight.to(amp_dtype)
        bias = None if bias is None else bias.to(amp_dtype)
    _check_inputs(hidden, weight, targets, bias, reduction)
    LossOptions(ignore_index, label_smoothing, softcap, logit_scale)  # validates the options
    if targets.dtype not in (torch.int32, torch.int64):  # the kernels index with int32/int64 labels
        targets = targets.long()
    _check_target_range(targets, weight.shape[0], ignore_index)

    lead_shape = hidden.shape[:-1]
    flat_targets = targets.reshape(-1)
    loss, lse = torch.ops.cce.linear_cross_entropy_forward(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, ignore_index, float(label_smoothing),
        None if softcap is None else float(softcap), float(logit_scale))
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:  # eager's mean: sum over non-ignored tokens / their count (nan when every token is ignored)
        loss = loss.sum() / (flat_targets != ignore_index).sum()
    if return_lse:
        return loss, lse.reshape(lead_shape)
    return loss


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias=None, ignore_index=-100,
                                   reduction="mean", label_smoothing=0.0, softcap=None, logit_scale=1.0,
                                   return_lse=False):
    """The eager PyTorch expression ``linear_cross_entropy`` equals (materialises the logits)."""
    z = logit_scale * F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.float() if z.dtype != torch.float64 else z
    loss = F.cross_entropy(z.flatten(0, -2) if z.dim() > 1 else z[None], targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    if return_lse:
        return loss, torch.logsumexp(z, dim=-1)
    return loss
