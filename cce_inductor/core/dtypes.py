"""Dtypes: the op's arithmetic dtype, and casting as ``F.linear`` is cast under ``torch.autocast``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtypes the Triton kernels take (float64 runs the PyTorch implementation).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The dtypes autocast may cast (it never casts float64).
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def stat_dtype(t: Tensor) -> torch.dtype:
    """Arithmetic dtype of the op, and the dtype of its per-token loss and lse: float64 for float64
    inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def autocast_like_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast as ``F.linear`` is cast under ``torch.autocast``: floating inputs other than float64 go to the
    autocast dtype; anything else is left as it is."""
    device_type = hidden.device.type
    if device_type not in ("cuda", "cpu", "xpu") or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    amp = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(amp) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t
    return cast(hidden), cast(weight), cast(bias)


def autocast_off(t: Tensor):
    """The implementations choose their own precision: autocast (still on inside a custom op's body, and
    during a backward run under it) must not recast their internal matmuls."""
    return torch.autocast(t.device.type, enabled=False)
