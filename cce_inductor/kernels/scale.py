"""``d *= g`` in place for a 16-bit gradient and a float32 scalar on the device, with one rounding.

The fast path's eager backward scales the gradients it formed in the forward by the upstream gradient.
A plain 16-bit ``mul_`` by a 0-d float32 tensor rounds ``g`` to 16 bits first (a systematic error of up to
2^-9 in every gradient); this kernel multiplies in float32 and rounds the product once (round to nearest
even, as the GPU converts), reading and writing each element once (4 bytes of traffic per element for
bf16/fp16, where a float32 copy of blocks moved ~18).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import to_rne
from .tiles import cdiv

# Elements per program: 8 KiB of bf16 in flight per program, enough to saturate memory bandwidth.
SCALE_BLOCK = 4096


@triton.jit
def _scale_kernel(d_ptr, g_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2^31
    mask = offs < n
    g = tl.load(g_ptr).to(tl.float32)
    x = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_ptr + offs, to_rne(x * g, d_ptr.dtype.element_ty), mask=mask)


def scale_in_place(d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``d *= g`` (d contiguous, 16-bit or float32; g a 0-d float tensor on d's device), in place."""
    assert d.is_contiguous() and g.numel() == 1
    n = d.numel()
    if n:
        _scale_kernel[(cdiv(n, SCALE_BLOCK),)](d, g.reshape(1).to(torch.float32), n, BLOCK=SCALE_BLOCK,
                                               num_warps=4)
    return d
