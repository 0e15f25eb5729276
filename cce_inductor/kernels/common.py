"""Triton device helpers shared by the forward and backward kernels: one logits tile, and tanh."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh_f32(x):
    # tanh via one exp: saturates cleanly to +-1 (exp overflow -> 2/inf = 0), and is available on every
    # Triton version and in the interpreter (tl has no portable tanh).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr,
    offs_n, n_mask, offs_v, v_mask,
    D, stride_hn, stride_hd, stride_wv, stride_wd,
    scale, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] = softcap(scale * (h[offs_n] @ w[offs_v].T + b[offs_v])), fp32 accumulation.

    ``offs_v`` indexes rows of ``w_ptr``/``b_ptr`` (the caller may pass a chunk's base pointer).
    Masked rows/columns read zeros; the caller masks their results.
    """
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: N*D and V*D may pass 2^31 elements.
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < D
        kk64 = kk.to(tl.int64)
        h = tl.load(h_rows + kk64[None, :] * stride_hd, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        # W^T tile [BLOCK_K, BLOCK_V] loaded directly, so tl.dot needs no transpose.
        w = tl.load(w_cols + kk64[:, None] * stride_wd, mask=k_mask[:, None] & v_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    acc = acc * scale
    if HAS_SOFTCAP:
        acc = softcap * tanh_f32(acc / softcap)
    return acc


@triton.jit
def to_rne(x, DTYPE: tl.constexpr):
    """fp32 ``x`` converted to ``DTYPE`` rounding to nearest even, on every backend: for bf16 the rounding
    is done on the bits first (the Triton interpreter's own fp32 -> bf16 conversion truncates, the GPU's
    rounds to nearest: this makes the interpreter tests see the GPU's numbers). NaNs are kept as they are:
    adding the rounding bias to a NaN whose mantissa is all ones (0x7FFFFFFF, the GPU's NaN) would carry
    into the sign and give +-0."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = tl.where(x != x, x, ((bits >> 16) << 16).to(tl.float32, bitcast=True))
    return x.to(DTYPE)
