"""Backward over vocabulary chunks of Vc columns; nothing N x V is allocated beyond one [N, Vc] buffer.

Per chunk [v0, v0 + w):
  1. ``_draw_kernel`` recomputes the chunk's logits tile by tile and writes d(loss)/d(raw logits)
     ("draw", rounded to the input dtype like eager's grad_output) into the reusable buffer (with an
     entropy output: plus its term ``-g_H p (log p + H)``, ``log p = z - lse``);
  2. d_weight[v0:v0+w] = draw.T @ hidden by cuBLAS (fp32 accumulation, each element written once);
  3. ``accumulate_matmul`` (kernels/accumulate.py) adds draw @ weight[v0:v0+w] to the d_hidden accumulator;
  4. d_bias[v0:v0+w] = draw.sum(0) in fp32.
For 16-bit inputs the d_hidden accumulator is a pair (hi, lo): hi is the returned gradient (rounded to
nearest from the fp32 sum after every chunk) and lo keeps the rounding remainder acc - hi, so nothing of
the fp32 sum is lost between chunks without an fp32 N x D buffer. lo is int8 in units of 1/128
of hi's ulp (default; N*D bytes, error <= 2^-8 ulp(hi) per chunk, i.e. ~2^-16 relative for bf16), int4 (N*D/2
bytes, 1/8 ulp) or a tensor of hi's dtype (N*D*2 bytes). fp32 inputs accumulate straight into the fp32 output.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from ..paths import fold_slab_rows
from .accumulate import accumulate_fp32, accumulate_matmul, accumulate_matmul_cublas, new_remainder
from .common import logits_tile, to_rne
from .config import KernelConfig, cdiv, chunk_width, pick_config
from .launch import check_kernel_inputs, dot_precision


@triton.heuristics({
    "HAS_BIAS": lambda a: a["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
    "HAS_GLSE": lambda a: a["glse_ptr"] is not None,
    "HAS_GENT": lambda a: a["gent_ptr"] is not None,
})
@triton.jit
def _draw_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, gloss_ptr, glse_ptr, gent_ptr, ent_ptr, out_ptr,
    N, D, V, v0, width,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_out,
    scale, softcap, ignore_index, one_minus_eps, eps_over_v,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr, HAS_GENT: tl.constexpr,
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
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    is_tgt = (v0 + offs_c)[None, :].to(tl.int64) == tgt[:, None]
    dz = coef[:, None] * p - g[:, None] * (tl.where(is_tgt, one_minus_eps, 0.0) + eps_over_v)
    if HAS_GENT:  # the entropy H = -Σ p log p: dH/dz = -p (log p + H)
        g_ent = tl.load(gent_ptr + offs_n, mask=n_mask, other=0.0)
        ent = tl.load(ent_ptr + offs_n, mask=n_mask, other=0.0)
        dz -= g_ent[:, None] * p * (log_p + ent[:, None])
    if HAS_SOFTCAP:
        zs = z / softcap
        dz = dz * (scale * (1.0 - zs * zs))
    else:
        dz = dz * scale
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_out + offs_c[None, :]
    tl.store(out, to_rne(dz, out_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


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
    grad_entropy: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(d_hidden, d_weight, d_bias); see cce_inductor.kernels for the contract.

    ``need_d_weight=False`` (a frozen weight) skips the d_weight matmul and returns None for it.
    ``grad_entropy`` (with the forward's ``entropy``): the upstream gradient of the entropy output.
    """
    if grad_entropy is not None and entropy is None:
        raise ValueError("the entropy's gradient needs the forward's entropy output (entropy=...)")
    with torch.no_grad():  # torch.mm(out=...) refuses inputs that require grad under grad mode
        return _backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts, config, need_d_weight,
                         grad_entropy, entropy)


def _backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts, config, need_d_weight,
              grad_entropy, entropy):
    check_kernel_inputs(hidden, weight, bias, targets)
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
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
        entropy = entropy.to(torch.float32).contiguous()
    else:
        entropy = None
    if bias is not None:
        bias = bias.contiguous()

    vc = chunk_width(cfg, N, V, hidden.element_size())
    n_chunks = cdiv(V, vc)
    buf = torch.empty((N, min(vc, V)), device=dev, dtype=dtype)
    # A remainder only matters when more than one chunk is summed into a 16-bit accumulator.
    # ("none" drops the remainder: lossy, kept only to show in tests what the remainder buys.)
    lo_mode = "none" if (dtype == torch.float32 or n_chunks == 1 or cfg.dhidden_remainder == "none") else (
        cfg.dhidden_remainder)
    # Variant (cfg.dhidden_scheme == "cublas_fp32", CUDA only): cuBLAS accumulates d_hidden into an
    # fp32 [N, D] buffer (N*D*4 bytes instead of the remainder's N*D), rounded once at the end.
    acc32 = None
    if lo_mode != "none" and dev.type == "cuda" and cfg.dhidden_scheme == "cublas_fp32":
        acc32 = torch.empty((N, D), device=dev, dtype=torch.float32)
        lo_mode = "none"
    d_hidden_lo = new_remainder(N, D, lo_mode, dtype, dev) if lo_mode != "none" else None
    p_buf = None  # cfg.dhidden_scheme == "cublas_fold": cuBLAS float32 products folded into hi + lo
    if lo_mode != "none" and cfg.dhidden_scheme == "cublas_fold":
        p_buf = torch.empty((min(N, fold_slab_rows(D, cfg.fold_slab_bytes)), D), device=dev, dtype=torch.float32)
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
            h_ptr=hidden, w_ptr=w_chunk, b_ptr=bias[v0:v0 + w] if bias is not None else None, t_ptr=targets,
            lse_ptr=lse, gloss_ptr=grad_loss, glse_ptr=grad_lse, gent_ptr=grad_entropy, ent_ptr=entropy,
            out_ptr=buf,
            N=N, D=D, V=V, v0=v0, width=w,
            stride_hn=hidden.stride(0), stride_hd=hidden.stride(1), stride_wv=weight.stride(0),
            stride_wd=weight.stride(1), stride_out=buf.stride(0),
            scale=float(opts.logit_scale), softcap=None if opts.softcap is None else float(opts.softcap),
            ignore_index=int(opts.ignore_index), one_minus_eps=1.0 - eps, eps_over_v=eps / V,
            BLOCK_N=td.block_m, BLOCK_V=td.block_n, BLOCK_K=td.block_k,
            UPCAST=cfg.upcast_dot, DOT_PREC=prec, VOCAB_FASTEST=cfg.draw_vocab_fastest,
            num_warps=td.num_warps, num_stages=td.num_stages,
        )
        if d_weight is not None:
            torch.mm(draw.t(), hidden, out=d_weight[v0:v0 + w])
        if acc32 is not None:
            accumulate_fp32(draw, w_chunk, acc32, first=c == 0)
        elif p_buf is not None:
            accumulate_matmul_cublas(draw, w_chunk, d_hidden, d_hidden_lo, p_buf, first=c == 0,
                                     last=c == n_chunks - 1, lo_mode=lo_mode)
        else:
            accumulate_matmul(draw, w_chunk, d_hidden, d_hidden_lo, first=c == 0, last=c == n_chunks - 1,
                              lo_mode=lo_mode, tile=th, upcast=cfg.upcast_dot, dot_precision=prec,
                              n_fastest=cfg.dhidden_d_fastest)
        if bias is not None:
            torch.sum(draw, dim=0, dtype=torch.float32, out=d_bias32[v0:v0 + w])
    if acc32 is not None:
        d_hidden.copy_(acc32)
    d_bias = d_bias32.to(bias.dtype) if bias is not None else None
    return d_hidden, d_weight, d_bias
