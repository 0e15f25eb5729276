"""Host-side helpers shared by the forward and backward wrappers (validation, dot precision)."""
from __future__ import annotations

from typing import Optional

import torch

from .config import KernelConfig

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 targets: torch.Tensor) -> None:
    """Shape/dtype checks only (no data-dependent checks: no host synchronisation)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype in {FLOAT_DTYPES}, got {hidden.dtype} "
                        f"and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype not in (hidden.dtype, torch.float32)):
        raise ValueError(f"bias must be [V] in {hidden.dtype} or float32, got {tuple(bias.shape)} {bias.dtype}")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be [N] int64/int32, got {tuple(targets.shape)} {targets.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("vocabulary size V must be >= 1")


def dot_precision(cfg: KernelConfig, dtype: torch.dtype) -> str:
    """tl.dot input precision: only meaningful for fp32 operands (16-bit operands ignore it)."""
    if dtype == torch.float32 or cfg.upcast_dot:
        return cfg.fp32_precision
    return "tf32"
