"""Host-side helpers shared by the kernels' wrappers: the entry check and the tl.dot precision."""
from __future__ import annotations

from typing import Optional

import torch

from ..core.checks import check_inputs
from ..core.dtypes import TRITON_DTYPES
from .tiles import KernelConfig


def check_kernel_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor) -> None:
    """The op's one input check in its flat form (hidden [N, D], targets [N] int32/int64), plus the dtypes
    the kernels take. Metadata only: no host synchronisation."""
    check_inputs(hidden, weight, targets, bias, flat=True)
    if hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton kernels take {TRITON_DTYPES}, got {hidden.dtype}")


def dot_precision(cfg: KernelConfig, dtype: torch.dtype) -> str:
    """tl.dot input precision: only meaningful for fp32 operands (16-bit operands ignore it)."""
    if dtype == torch.float32 or cfg.upcast_dot:
        return cfg.fp32_precision
    return "tf32"
