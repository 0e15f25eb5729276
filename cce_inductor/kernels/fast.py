"""The fast path on the GPU: 3 matmuls, gradients formed in the forward, token chunks.

Per chunk of Nc tokens (``X_c = hidden[s:e]``):
  1. ``Z = X_c @ W^T (+ bias)`` by cuBLAS into one reusable [Nc, V] buffer, in the input dtype (exactly
     eager's logits: eager's are a 16-bit matmul output too).
  2. ``_rows_kernel``, one program per row: log-sum-exp (fp32), target logit, label-smoothing sum and the
     per-token loss; then Z is overwritten **in place** by G = coef * (softmax - (1-eps) onehot - eps/V)
     times the scale/softcap chain factors, rounded to the input dtype (coef = 1/count for "mean",
     1 for "sum", 0 for an ignored row, NaN for an out-of-range target). Scaling before the rounding is
     what eager does.
  3. ``d_hidden[s:e] = G @ W`` by cuBLAS, written once.
  4. ``d_weight += G^T @ X_c``, the fp32 sum kept across chunks in one of the accumulator formats the plan
     chose (``remainder``): "fp32", a float32 [V, D] buffer that cuBLAS reads and writes in its epilogue
     (``accumulate_fp32``; 4 bytes per weight element of memory, 8 of traffic per chunk), or the 16-bit
     gradient itself plus an int8/int4 rounding remainder (1 or 1/2 byte per element), filled as
     ``KernelConfig.weight_accumulate`` says: cuBLAS float32 products of a vocabulary slab folded into
     hi/lo (``accumulate_matmul_cublas``, the CUDA default: ~14 bytes of traffic per element per chunk) or
     one Triton matmul with the fold in its epilogue (``accumulate_matmul``); cuBLAS addmm for fp32 inputs,
     a plain cuBLAS matmul for one chunk.
  5. ``d_bias += G.sum(0)`` in fp32.
The count of non-ignored targets is computed on the device before the loop: no host synchronisation.

The same row kernel without step 2's write (``coef_ptr=None``) is the chunked no-grad forward
(``triton_chunked_forward``): cuBLAS logits per chunk, per-token loss and lse and, on request, the entropy
(one more running sum per lane in the same pass: ``Σ exp(z - m) (z - m)`` relative to the lane's max).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..core.reduce import reduce_loss, reduction_weight
from ..options import LossOptions
from ..paths import fold_slab_rows
from .accumulate import accumulate_fp32, accumulate_matmul, accumulate_matmul_cublas, new_remainder
from .common import tanh_f32, to_rne
from .config import KernelConfig, pick_config
from .launch import check_kernel_inputs, dot_precision


@triton.jit
def _logit_epilogue(z, b_ptr, offs, mask, scale, softcap,
                    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """fp32 logits from the matmul output: + bias (a bias not already added by cuBLAS), * scale, softcap."""
    z = z.to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        z = z * scale
    if HAS_SOFTCAP:
        z = softcap * tanh_f32(z / softcap)
    return z


@triton.heuristics({
    "HAS_BIAS": lambda a: a["b_ptr"] is not None,
    "HAS_SCALE": lambda a: a["scale"] != 1.0,
    "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
    "HAS_SMOOTHING": lambda a: a["eps"] > 0.0,
    "WRITE_GRAD": lambda a: a["coef_ptr"] is not None,
    "WRITE_LSE": lambda a: a["lse_ptr"] is not None,
    "WRITE_ENTROPY": lambda a: a["ent_ptr"] is not None,
})
@triton.jit
def _rows_kernel(
    z_ptr, b_ptr, t_ptr, coef_ptr, loss_ptr, lse_ptr, ent_ptr,
    V, stride_z, scale, softcap, ignore_index, eps,
    BLOCK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_LSE: tl.constexpr, WRITE_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0)
    zrow = z_ptr + row.to(tl.int64) * stride_z
    t = tl.load(t_ptr + row).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    z_sum = tl.zeros([BLOCK_V], tl.float32)
    ent_sum = tl.zeros([BLOCK_V], tl.float32)  # per lane: Σ exp(z - run_max) (z - run_max)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        mask = offs < V
        z = _logit_epilogue(tl.load(zrow + offs, mask=mask, other=0.0), b_ptr, offs, mask, scale, softcap,
                            HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(run_max, z)
        # A lane that has seen no column yet keeps max -inf and sum 0 (exp(-inf - -inf) would be NaN).
        alpha = tl.where(new_max == float("-inf"), 1.0, tl.exp(run_max - new_max))
        if WRITE_ENTROPY:
            moved = tl.where(run_max == float("-inf"), 0.0, run_max - new_max)  # no -inf * 0
            shifted = tl.where(mask, z - new_max, 0.0)
            p = tl.where(mask, tl.exp(shifted), 0.0)
            ent_sum = alpha * (ent_sum + moved * run_sum) + p * shifted
            run_sum = run_sum * alpha + p
        else:
            run_sum = run_sum * alpha + tl.where(mask, tl.exp(z - new_max), 0.0)
        run_max = new_max
        if HAS_SMOOTHING:
            z_sum += tl.where(mask, z, 0.0)
    row_max = tl.max(run_max, 0)
    lane_scale = tl.exp(run_max - row_max)  # 0 for a lane that saw no column
    total = tl.sum(run_sum * lane_scale, 0)
    lse = row_max + tl.log(total)
    if WRITE_ENTROPY:
        lane_moved = tl.where(run_max == float("-inf"), 0.0, run_max - row_max)
        s1 = tl.sum(lane_scale * (ent_sum + lane_moved * run_sum), 0)
        tl.store(ent_ptr + row, tl.log(total) - s1 / total)

    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    t_safe = tl.minimum(tl.maximum(t, 0), V - 1)
    z_t = _logit_epilogue(tl.load(zrow + t_safe), b_ptr, t_safe, t_safe >= 0, scale, softcap,
                          HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
    loss = (1.0 - eps) * (lse - z_t)
    if HAS_SMOOTHING:
        loss += eps * (lse - tl.sum(z_sum, 0) / V)
    loss = tl.where(ignored, 0.0, loss)
    loss = tl.where(in_range | ignored, loss, float("nan"))
    tl.store(loss_ptr + row, loss)
    if WRITE_LSE:
        tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        coef = tl.load(coef_ptr)
        coef = tl.where(ignored, 0.0, tl.where(in_range, coef, float("nan")))
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            mask = offs < V
            z = _logit_epilogue(tl.load(zrow + offs, mask=mask, other=0.0), b_ptr, offs, mask, scale, softcap,
                                HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
            g = tl.exp(z - lse) - tl.where(offs.to(tl.int64) == t, 1.0 - eps, 0.0)
            if HAS_SMOOTHING:
                g -= eps / V
            g = g * coef
            if HAS_SOFTCAP:
                zc = z / softcap
                g = g * (1.0 - zc * zc)
            if HAS_SCALE:
                g = g * scale
            tl.store(zrow + offs, to_rne(g, z_ptr.dtype.element_ty), mask=mask)


def _rows(z, bias_in_kernel, targets, coef, loss, lse, opts: LossOptions, cfg: KernelConfig, entropy=None):
    _rows_kernel[(z.shape[0],)](
        z_ptr=z, b_ptr=bias_in_kernel, t_ptr=targets, coef_ptr=coef, loss_ptr=loss, lse_ptr=lse, ent_ptr=entropy,
        V=z.shape[1], stride_z=z.stride(0), scale=float(opts.logit_scale),
        softcap=None if opts.softcap is None else float(opts.softcap),
        ignore_index=int(opts.ignore_index), eps=float(opts.label_smoothing),
        BLOCK_V=cfg.row_block, num_warps=cfg.row_warps,
    )


def _logits_into(out, x, weight, bias_mm):
    if bias_mm is not None:
        torch.addmm(bias_mm, x, weight.t(), out=out)
    else:
        torch.mm(x, weight.t(), out=out)


def _split_bias(bias, dtype):
    """(bias for cuBLAS's addmm, bias for the row kernel): a bias of the input dtype goes into addmm (as
    eager's F.linear does it); another dtype (fp32 with 16-bit inputs) is added in fp32 by the row kernel."""
    if bias is None:
        return None, None
    if bias.dtype == dtype:
        return bias, None
    return None, bias.contiguous()


def triton_fast_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, opts: LossOptions, *, reduction: str, tokens_per_chunk: int,
                        remainder: str, need_d_hidden: bool = True, need_d_weight: bool = True,
                        need_d_bias: bool = True, config: Optional[KernelConfig] = None):
    """(loss 0-d fp32, d_hidden [N, D] | None, d_weight [V, D] | None, d_bias fp32 [V] | None) of
    ``reduction`` ("mean" | "sum") of the per-token loss, for an upstream gradient of 1."""
    with torch.no_grad():
        return _fast_forward(hidden, weight, bias, targets, opts, reduction, tokens_per_chunk, remainder,
                             need_d_hidden, need_d_weight, need_d_bias, config)


def _fast_forward(hidden, weight, bias, targets, opts, reduction, tokens_per_chunk, remainder,
                  need_d_hidden, need_d_weight, need_d_bias, config):
    check_kernel_inputs(hidden, weight, bias, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    cfg = config if config is not None else pick_config(N, D, V, dtype, dev)
    targets = targets.contiguous()
    bias_mm, bias_row = _split_bias(bias, dtype)
    need_d_bias = need_d_bias and bias is not None

    loss_rows = torch.empty(N, device=dev, dtype=torch.float32)
    d_hidden = torch.empty((N, D), device=dev, dtype=dtype) if need_d_hidden else None
    d_weight = torch.empty((V, D), device=dev, dtype=weight.dtype) if need_d_weight else None
    d_bias = torch.zeros(V, device=dev, dtype=torch.float32) if need_d_bias else None
    coef = reduction_weight(targets, opts.ignore_index, reduction, torch.float32).reshape(1)
    if N == 0:
        if d_weight is not None:
            d_weight.zero_()
        return reduce_loss(loss_rows, targets, opts.ignore_index, reduction, None), d_hidden, d_weight, d_bias

    nc = max(1, min(int(tokens_per_chunk), N))
    n_chunks = -(-N // nc)
    exact_acc = dtype == torch.float32
    lo_mode = "none" if (exact_acc or n_chunks == 1) else remainder
    if lo_mode not in ("none", "int8", "int4", "float", "fp32"):
        raise ValueError(f"unknown d_weight accumulator format {remainder!r}")
    acc32 = None  # "fp32": the sum kept in a float32 [V, D] buffer by cuBLAS (beta = 1), rounded once at the end
    if lo_mode == "fp32":
        acc32 = torch.empty((V, D), device=dev, dtype=torch.float32) if d_weight is not None else None
        lo_mode = "none"
    lo = new_remainder(V, D, lo_mode, dtype, dev) if (d_weight is not None and lo_mode != "none") else None
    p_buf = None  # the cuBLAS + fold scheme's float32 product slab (cfg.weight_accumulate)
    if lo is not None and cfg.weight_accumulate == "cublas_fold":
        p_buf = torch.empty((min(V, fold_slab_rows(D, cfg.fold_slab_bytes)), D), device=dev, dtype=torch.float32)
    z_buf = torch.empty((nc, V), device=dev, dtype=dtype)
    prec = dot_precision(cfg, dtype)
    for i in range(n_chunks):
        s, e = i * nc, min(N, (i + 1) * nc)
        x = hidden[s:e]
        z = z_buf[:e - s]
        _logits_into(z, x, weight, bias_mm)
        _rows(z, bias_row, targets[s:e], coef, loss_rows[s:e], None, opts, cfg)
        if d_hidden is not None:
            torch.mm(z, weight, out=d_hidden[s:e])
        if d_weight is not None:
            if n_chunks == 1 or (exact_acc and i == 0):
                torch.mm(z.t(), x, out=d_weight)
            elif exact_acc:
                d_weight.addmm_(z.t(), x)
            elif acc32 is not None:
                accumulate_fp32(z.t(), x, acc32, first=i == 0)
            elif p_buf is not None:
                accumulate_matmul_cublas(z.t(), x, d_weight, lo, p_buf, first=i == 0, last=i == n_chunks - 1,
                                         lo_mode=lo_mode)
            else:
                accumulate_matmul(z.t(), x, d_weight, lo, first=i == 0, last=i == n_chunks - 1, lo_mode=lo_mode,
                                  tile=cfg.accumulate_tile, upcast=cfg.upcast_dot, dot_precision=prec,
                                  n_fastest=cfg.dhidden_d_fastest)
        if d_bias is not None:
            d_bias += z.sum(dim=0, dtype=torch.float32)
    if acc32 is not None:
        d_weight.copy_(acc32)
    return reduce_loss(loss_rows, targets, opts.ignore_index, reduction, None), d_hidden, d_weight, d_bias


def triton_chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           targets: torch.Tensor, opts: LossOptions, *, chunk_bytes: int = 512 << 20,
                           tokens_per_chunk: Optional[int] = None, config: Optional[KernelConfig] = None,
                           with_entropy: bool = False):
    """(loss [N] fp32, lse [N] fp32[, entropy [N] fp32]) like ``triton_forward``, computed as cuBLAS logits
    per token chunk (``chunk_bytes`` of them, or ``tokens_per_chunk``) + the row kernel. For the forward
    without grad."""
    with torch.no_grad():
        check_kernel_inputs(hidden, weight, bias, targets)
        N, D = hidden.shape
        V = weight.shape[0]
        dev, dtype = hidden.device, hidden.dtype
        loss = torch.empty(N, device=dev, dtype=torch.float32)
        lse = torch.empty(N, device=dev, dtype=torch.float32)
        entropy = torch.empty(N, device=dev, dtype=torch.float32) if with_entropy else None
        outputs = (loss, lse) if entropy is None else (loss, lse, entropy)
        if N == 0:
            return outputs
        cfg = config if config is not None else pick_config(N, D, V, dtype, dev)
        targets = targets.contiguous()
        bias_mm, bias_row = _split_bias(bias, dtype)
        if tokens_per_chunk is None:
            tokens_per_chunk = max(1, chunk_bytes // (V * hidden.element_size()))
        nc = max(1, min(int(tokens_per_chunk), N))
        z_buf = torch.empty((nc, V), device=dev, dtype=dtype)
        for s in range(0, N, nc):
            e = min(N, s + nc)
            z = z_buf[:e - s]
            _logits_into(z, hidden[s:e], weight, bias_mm)
            _rows(z, bias_row, targets[s:e], None, loss[s:e], lse[s:e], opts, cfg,
                  None if entropy is None else entropy[s:e])
        return outputs
