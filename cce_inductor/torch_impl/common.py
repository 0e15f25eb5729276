"""What the PyTorch implementations share: a logits chunk with the op's epilogue, its derivative, the
per-row masks and the chunk size.

Logits exist only one token chunk at a time. Arithmetic is float32 (float64 for float64 inputs) from the
matmul on, so the result is at least as exact as eager PyTorch's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..options import LossOptions

# Elements of one float32 logits chunk (rows × V): 2M elements = 8 MiB, small enough to stay in the CPU's
# caches between the in-place passes (measured 4x faster than 32 MiB chunks at N=2048, V=32768, D=64).
CHUNK_ELEMENTS = 2 * 2**20


def rows_per_chunk(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(v, 1)))


def logits_chunk(h: Tensor, w: Tensor, b: Optional[Tensor], opts: LossOptions) -> tuple[Tensor, Optional[Tensor]]:
    """z = softcap(scale * (h @ w.T + b)); also returns tanh(.) for the softcap derivative (None without softcap).

    In-place epilogue: on the CPU these passes over a chunk cost as much as the matmul itself.
    """
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    if opts.softcap is None:
        return z, None
    th = z.div_(opts.softcap).tanh_()
    return th * opts.softcap, th


def through_epilogue_(dz: Tensor, th: Optional[Tensor], opts: LossOptions) -> Tensor:
    """d(loss)/d(logits) -> d(loss)/d(raw logits), in place: times 1 - tanh^2 for the softcap (``th`` is the
    tanh ``logits_chunk`` returned; it is consumed), times the logit scale."""
    if th is not None:
        dz.mul_(th.mul_(th).neg_().add_(1))
    if opts.logit_scale != 1.0:
        dz.mul_(opts.logit_scale)
    return dz


# Elements of a 16-bit gradient scaled per step of ``scale_in_place`` (a float32 copy of this many elements).
SCALE_BLOCK_ELEMENTS = 16 << 20


def scale_in_place(d: Tensor, g: Tensor) -> Tensor:
    """``d *= g`` with one rounding: the product in float32, a block of rows at a time, then rounded to d's
    dtype (a 16-bit ``mul_`` by a 0-d float32 tensor would round g to 16 bits first)."""
    flat = d.view(d.shape[0], -1) if d.dim() else d.view(1, 1)
    rows = max(1, SCALE_BLOCK_ELEMENTS // max(1, flat.shape[1]))
    for s in range(0, flat.shape[0], rows):
        block = flat[s:s + rows]
        block.copy_(block.float().mul_(g))
    return d


def per_row(x: Tensor, valid: Tensor, bad: Tensor) -> Tensor:
    """``x`` on valid rows, 0 on ignored rows, NaN on rows whose target is out of range (as the op's loss)."""
    return torch.where(bad, torch.full_like(x, float("nan")), torch.where(valid, x, torch.zeros_like(x)))


def target_status(t: Tensor, v: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(valid, out_of_range, clamped index): valid rows are in [0, V); ignored rows are neither."""
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < v)
    return in_range & ~ignored, ~in_range & ~ignored, t.clamp(0, max(v - 1, 0))
