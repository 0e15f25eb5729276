"""The one input check of the op (every entry point calls it), and the tests it needs.

``check_inputs`` raises a clear error for mismatched shapes, dtypes or devices and for option values
the op refuses; it looks only at metadata (no host synchronisation), so it also runs on fake tensors
while the graph rewrite evaluates what it emits. ``check_target_range`` is the one data-dependent
check (labels outside the vocabulary), done eagerly only.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..options import NO_IGNORE_INDEX
from .dtypes import FLOAT_DTYPES, stat_dtype
from .reduce import REDUCTIONS


def check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], *,
                 reduction: str = "mean", vocab_size: Optional[int] = None, flat: bool = False) -> None:
    """Shapes, dtypes and devices of ``hidden [..., D]``, ``weight [V, D]``, ``targets hidden.shape[:-1]``
    (integer class ids) and ``bias [V]`` (hidden's dtype, or the op's float32/float64 arithmetic dtype:
    a bias eager adds in that precision).

    ``vocab_size``: ``weight`` is one rank's rows of a vocabulary-parallel lm-head (it may have no rows);
    ``vocab_size`` is the global V. ``flat``: the kernel entry's form — hidden ``[N, D]``, targets ``[N]``
    of int32/int64 (the public entry has converted them).
    """
    local = vocab_size is not None
    wname, wshape = ("the local weight", "[V_local, D]") if local else ("weight", "[V, D]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1 or (flat and hidden.dim() != 2):
        raise ValueError(f"hidden must have shape {'[N, D]' if flat else '[..., D]'}; got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{wname} must have shape {wshape}; got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal {wname}'s second dim "
                         f"({wname} is {wshape} = {tuple(weight.shape)})")
    if not local and weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [{'V_local' if local else 'V'}] = [{weight.shape[0]}]; "
                         f"got {tuple(bias.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
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
    if flat and targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int64 or int32 here; got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])} (hidden is [..., D] = {tuple(hidden.shape)})")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, bias and targets must be on one device; got {sorted(map(str, devices))}")
    if local and (not isinstance(vocab_size, int) or vocab_size < max(1, weight.shape[0])):
        raise ValueError(f"vocab_size must be the global vocabulary size (>= the {weight.shape[0]} local rows); "
                         f"got {vocab_size!r}")


def is_tracing(t: Tensor) -> bool:
    """True under Dynamo, AOTAutograd/make_fx tracing or fake tensors: values are not available there."""
    return torch.compiler.is_compiling() or get_proxy_mode() is not None or is_fake(t)


def check_target_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """A clear error for labels outside [0, V) that are not ignore_index.

    Runs in eager mode only (it needs the values on the host: on CUDA that is one synchronisation).
    Under torch.compile or CUDA-graph capture it is skipped and such rows give a NaN loss instead, so
    a bad label is never a silent wrong number. ``CCE_INDUCTOR_CHECK_TARGETS=0`` turns it off.
    """
    if targets.device.type == "meta" or is_tracing(targets) or os.environ.get("CCE_INDUCTOR_CHECK_TARGETS", "1") == "0":
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        why = "(every row is read: no ignore_index)" if ignore_index == NO_IGNORE_INDEX else \
            f"and is not ignore_index ({ignore_index})"
        raise ValueError(f"target {targets[tuple(where)].item()} at position {tuple(where)} is outside the "
                         f"vocabulary [0, {vocab}) {why}")


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False where torch has no DTensor)."""
    if t is None or not isinstance(t, Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)
