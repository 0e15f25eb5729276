"""Backward over vocabulary chunks of Vc columns; nothing N x V is allocated beyond one [N, Vc] buffer.

Per chunk [v0, v0 + w):
  1. ``_draw_kernel`` recomputes the chunk's logits tile by tile and writes d(loss)/d(raw logits)
     ("draw", rounded to the input dtype like eager's grad_output) into the reusable buffer;
  2. d_weight[v0:v0+w] = draw.T @ hidden by cuBLAS (fp32 accumulation, each element written once);
  3. ``_dhidden_kernel`` adds draw @ weight[v0:v0+w] to the d_hidden accumulator;
  4. d_bias[v0:v0+w] = draw.sum(0) in fp32.
For 16-bit inputs the d_hidden accumulator is a pair (hi, lo): hi is the returned gradient (rounded to
nearest from the fp32 sum after every chunk) and lo keeps the rounding remainder acc - hi, so nothing of
the fp32 sum is lost between chunks without an fp32 N x D buffer. lo is either int8 in units of 1/128
of hi's ulp (default; N*D bytes, error <= 2^-8 ulp(hi) per chunk, i.e. ~2^-16 relative for bf16) or a tensor of
hi's dtype (N*D*2 bytes). fp32 inputs accumulate straight into the fp32 output.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from .common import logits_tile
from .config import KernelConfig, cdiv, chunk_width, pick_config
from .launch import check_inputs, dot_precision


@triton.jit
def _draw_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, gloss_ptr, glse_ptr, out_ptr,
    N, D, V, v0, width,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_out,
    scale, softcap, ignore_index, one_minus_eps, eps_over_v,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VOCAB_FASTEST: tl.constexpr,
):
    """out[n, c] = draw[n, v0 + c] for c < width. w_ptr/b_ptr point at the chunk's first row."""
    if VOCAB_FASTEST:
        pid_c = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_n = tl.program_id(0)
        pid_c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = offs_c < width
    z = logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n, n_mask, offs_c, c_mask,
        D, stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap,
        BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PREC,
    )
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    tgt = tl.load(t_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    ignored = tgt == ignore_index
    g = tl.load(gloss_ptr + offs_n, mask=n_mask, other=0.0)
    g = tl.where(ignored, 0.0, g)
    # An out-of-range target has NaN loss; poison its gradient too rather than return garbage.
    g = tl.where(ignored | ((tgt >= 0) & (tgt < V)), g, float("nan"))
    coef = g
    if HAS_GLSE:
        coef += tl.load(glse_ptr + offs_n, mask=n_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    is_tgt = (v0 + offs_c)[None, :].to(tl.int64) == tgt[:, None]
    dz = coef[:, None] * p - g[:, None] * (tl.where(is_tgt, one_minus_eps, 0.0) + eps_over_v)
    if HAS_SOFTCAP:
        zs = z / softcap
        dz = dz * (scale * (1.0 - zs * zs))
    else:
        dz = dz * scale
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_out + offs_c[None, :]
    tl.store(out, dz.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


# Remainder formats of the 16-bit d_hidden accumulator (value = hi + remainder, in fp32).
LO_NONE, LO_INT8, LO_FLOAT = 0, 1, 2


@triton.jit
def _remainder_step(hf, STEP_SCALE: tl.constexpr, STEP_MIN: tl.constexpr):
    """Step of the int8 remainder of the 16-bit value ``hf`` (given as fp32): 1/128 of its ulp.

    2^floor(log2|hf|) from the fp32 exponent bits, times 2^-(mantissa bits + 7); a power of two, so
    scaling by it is exact. The int8 range then spans +-1 ulp: enough for round-to-nearest (+-1/2 ulp)
    and for truncating conversions too (the Triton interpreter's fp32->bf16 cast truncates).
    STEP_MIN covers fp16 subnormals (fixed spacing) and zero.
    """
    pow2 = (hf.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.maximum(pow2 * STEP_SCALE, STEP_MIN)


@triton.jit
def _dhidden_kernel(
    a_ptr, w_ptr, hi_ptr, lo_ptr,
    N, D, width,
    stride_a, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, LO_MODE: tl.constexpr,
    STEP_SCALE: tl.constexpr, STEP_MIN: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, D_FASTEST: tl.constexpr,
):
    """hi (+lo) [N, D] (contiguous) += a[N, width] @ w[width, D]; w_ptr points at the chunk's first row.

    LO_MODE: LO_NONE (fp32 hi, or a single chunk), LO_FLOAT (lo has hi's dtype: lo = round(acc - hi)),
    LO_INT8 (lo = round((acc - hi) / step(hi)) in int8; |acc - hi| < ulp(hi) = 128 steps).
    """
    if D_FASTEST:
        pid_d = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_a
    w_cols = w_ptr + offs_d.to(tl.int64)[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < width
        a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wv, mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    offs = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    mask = m_mask[:, None] & d_mask[None, :]
    if not FIRST:
        old = tl.load(hi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += old
        if LO_MODE == 1:
            q = tl.load(lo_ptr + offs, mask=mask, other=0).to(tl.float32)
            acc += q * _remainder_step(old, STEP_SCALE, STEP_MIN)
        elif LO_MODE == 2:
            acc += tl.load(lo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hi = acc.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi, mask=mask)
    if not LAST:
        if LO_MODE == 1:
            hf = hi.to(tl.float32)
            q = (acc - hf) / _remainder_step(hf, STEP_SCALE, STEP_MIN)
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            q = q + tl.where(q >= 0, 0.5, -0.5)  # round half away from zero; the cast truncates
            tl.store(lo_ptr + offs, q.to(tl.int8), mask=mask)
        elif LO_MODE == 2:
            tl.store(lo_ptr + offs, (acc - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=mask)


def triton_backward(
    grad_loss: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    opts: LossOptions,
    config: Optional[KernelConfig] = None,
    need_d_weight: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(d_hidden, d_weight, d_bias); see cce_inductor.kernels for the contract.

    ``need_d_weight=False`` (a frozen weight) skips the d_weight matmul and returns None for it.
    """
    with torch.no_grad():  # torch.mm(out=...) refuses inputs that require grad under grad mode
        return _backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts, config, need_d_weight)


def _backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts, config, need_d_weight):
    check_inputs(hidden, weight, bias, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    d_hidden = torch.empty((N, D), device=dev, dtype=dtype)
    d_weight = torch.empty((V, D), device=dev, dtype=weight.dtype) if need_d_weight else None
    d_bias32 = torch.empty(V, device=dev, dtype=torch.float32) if bias is not None else None
    if N == 0:
        return (d_hidden, None if d_weight is None else d_weight.zero_(),
                d_bias32.zero_().to(bias.dtype) if bias is not None else None)
    cfg = config if config is not None else pick_config(N, D, V, dtype, dev)
    targets = targets.contiguous()
    lse = lse.contiguous()
    grad_loss = grad_loss.to(torch.float32).contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    if bias is not None:
        bias = bias.contiguous()

    vc = chunk_width(cfg, N, V, hidden.element_size())
    n_chunks = cdiv(V, vc)
    buf = torch.empty((N, min(vc, V)), device=dev, dtype=dtype)
    # A remainder only matters when more than one chunk is summed into a 16-bit accumulator.
    # ("none" drops the remainder: lossy, kept only to show in tests what the remainder buys.)
    lo_mode = LO_NONE if (dtype == torch.float32 or n_chunks == 1 or cfg.dhidden_remainder == "none") else (
        LO_INT8 if cfg.dhidden_remainder == "int8" else LO_FLOAT)
    lo_dtype = torch.int8 if lo_mode == LO_INT8 else dtype
    d_hidden_lo = torch.empty((N, D), device=dev, dtype=lo_dtype) if lo_mode != LO_NONE else d_hidden
    mant_bits = 10 if dtype == torch.float16 else 7
    step_scale = 2.0 ** -(mant_bits + 7)
    step_min = 2.0 ** -31 if dtype == torch.float16 else 2.0 ** -126  # fp16 subnormal spacing 2^-24 / 128
    eps = float(opts.label_smoothing)
    prec = dot_precision(cfg, dtype)
    td, th = cfg.draw, cfg.dhidden
    for c in range(n_chunks):
        v0 = c * vc
        w = min(vc, V - v0)
        w_chunk = weight[v0:v0 + w]
        draw = buf[:, :w]
        grid = (cdiv(N, td.block_m), cdiv(w, td.block_n))
        _draw_kernel[grid[::-1] if cfg.draw_vocab_fastest else grid](
            hidden, w_chunk, bias[v0:v0 + w] if bias is not None else hidden, targets, lse, grad_loss,
            grad_lse if grad_lse is not None else grad_loss, buf,
            N, D, V, v0, w,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), buf.stride(0),
            float(opts.logit_scale), float(opts.softcap or 1.0), int(opts.ignore_index), 1.0 - eps, eps / V,
            BLOCK_N=td.block_m, BLOCK_V=td.block_n, BLOCK_K=td.block_k,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_GLSE=grad_lse is not None,
            UPCAST=cfg.upcast_dot, DOT_PREC=prec, VOCAB_FASTEST=cfg.draw_vocab_fastest,
            num_warps=td.num_warps, num_stages=td.num_stages,
        )
        if d_weight is not None:
            torch.mm(draw.t(), hidden, out=d_weight[v0:v0 + w])
        grid = (cdiv(N, th.block_m), cdiv(D, th.block_n))
        _dhidden_kernel[grid[::-1] if cfg.dhidden_d_fastest else grid](
            buf, w_chunk, d_hidden, d_hidden_lo,
            N, D, w,
            buf.stride(0), weight.stride(0), weight.stride(1),
            BLOCK_M=th.block_m, BLOCK_D=th.block_n, BLOCK_K=th.block_k,
            FIRST=c == 0, LAST=c == n_chunks - 1, LO_MODE=lo_mode, STEP_SCALE=step_scale, STEP_MIN=step_min,
            UPCAST=cfg.upcast_dot, DOT_PREC=prec, D_FASTEST=cfg.dhidden_d_fastest,
            num_warps=th.num_warps, num_stages=th.num_stages,
        )
        if bias is not None:
            torch.sum(draw, dim=0, dtype=torch.float32, out=d_bias32[v0:v0 + w])
    d_bias = d_bias32.to(bias.dtype) if bias is not None else None
    return d_hidden, d_weight, d_bias
