"""Forward: per-token loss and log-sum-exp without materialising the N x V logits.

Step 1 (``_partial_lse_kernel``): grid (token blocks, vocab splits), token block fastest so programs
running together stream the same weight tiles through L2. Each program walks its contiguous range of
vocab tiles, keeping per-row online max / sum-exp, the target logit (when the target falls in a tile),
with label smoothing the running sum of logits and, for the entropy, ``Σ exp(z - m) (z - m)`` (kept
relative to the running max ``m``: when it moves to ``m'`` the sum becomes
``α (S1 + (m - m') S0)`` with ``α = exp(m - m')``). It writes one value of each per (split, row).
Step 2 (``_merge_kernel``): merges the splits into lse, loss and entropy ``H = log S0 - S1 / S0`` (both
relative to the row max); flags out-of-range targets with NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from .common import logits_tile
from .config import KernelConfig, cdiv, forward_splits, pick_config
from .launch import check_kernel_inputs, dot_precision


@triton.heuristics({
    "HAS_BIAS": lambda a: a["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
})
@triton.jit
def _partial_lse_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, part_ptr,
    N, D, V, tiles_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    scale, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, ENT_PLANE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tgt = tl.load(t_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    tgt_logit = tl.zeros((BLOCK_N,), tl.float32)
    z_sum = tl.zeros((BLOCK_N,), tl.float32)
    ent_sum = tl.zeros((BLOCK_N,), tl.float32)  # Σ exp(z - run_max) (z - run_max)

    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(tile_lo, tile_hi):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        z = logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, n_mask, offs_v, v_mask,
            D, stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap,
            BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PREC,
        )
        # Every tile has >= 1 valid column, so new_max is finite and exp(-inf - new_max) == 0.
        z = tl.where(v_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        alpha = tl.exp(run_max - new_max)
        if HAS_ENTROPY:
            # masked columns: shifted 0 and p 0 (never -inf * 0)
            shifted = tl.where(v_mask[None, :], z - new_max[:, None], 0.0)
            p = tl.where(v_mask[None, :], tl.exp(shifted), 0.0)
            # before the first tile run_max is -inf and run_sum 0: no correction (avoids -inf * 0)
            moved = tl.where(run_max == float("-inf"), 0.0, run_max - new_max)
            ent_sum = alpha * (ent_sum + moved * run_sum) + tl.sum(p * shifted, axis=1)
            run_sum = run_sum * alpha + tl.sum(p, axis=1)
        else:
            run_sum = run_sum * alpha + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        is_tgt = offs_v[None, :].to(tl.int64) == tgt[:, None]
        tgt_logit += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)

    # part layout: [3 + smoothing + entropy, splits, N] fp32 = (max, sumexp, target logit[, logit sum][, S1])
    plane = n_splits * N
    out = part_ptr + pid_s * N + offs_n
    tl.store(out, run_max, mask=n_mask)
    tl.store(out + plane, run_sum, mask=n_mask)
    tl.store(out + 2 * plane, tgt_logit, mask=n_mask)
    if HAS_SMOOTHING:
        tl.store(out + 3 * plane, z_sum, mask=n_mask)
    if HAS_ENTROPY:
        tl.store(out + ENT_PLANE * plane, ent_sum, mask=n_mask)


@triton.heuristics({"HAS_SMOOTHING": lambda a: a["eps"] > 0.0, "HAS_ENTROPY": lambda a: a["ent_ptr"] is not None})
@triton.jit
def _merge_kernel(
    part_ptr, t_ptr, loss_ptr, lse_ptr, ent_ptr,
    N, V, n_splits, ignore_index, eps,
    BLOCK: tl.constexpr, ENT_PLANE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ENTROPY: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    plane = n_splits * N
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_ptr + s * N + offs, mask=mask, other=0.0))
    total = tl.zeros((BLOCK,), tl.float32)
    zt = tl.zeros((BLOCK,), tl.float32)
    zs = tl.zeros((BLOCK,), tl.float32)
    s1 = tl.zeros((BLOCK,), tl.float32)  # Σ exp(z - m) (z - m) over the whole row
    for s in range(0, n_splits):
        p = part_ptr + s * N + offs
        m_s = tl.load(p, mask=mask, other=0.0)
        sum_s = tl.load(p + plane, mask=mask, other=1.0)
        scale_s = tl.exp(m_s - m)
        total += sum_s * scale_s
        zt += tl.load(p + 2 * plane, mask=mask, other=0.0)
        if HAS_SMOOTHING:
            zs += tl.load(p + 3 * plane, mask=mask, other=0.0)
        if HAS_ENTROPY:
            s1_s = tl.load(p + ENT_PLANE * plane, mask=mask, other=0.0)
            # a split whose max is -inf holds nothing (its sum is 0): no correction (avoids -inf * 0)
            moved = tl.where(m_s == float("-inf"), 0.0, m_s - m)
            s1 += scale_s * (s1_s + moved * sum_s)
    lse = m + tl.log(total)
    if HAS_ENTROPY:
        tl.store(ent_ptr + offs, tl.log(total) - s1 / total, mask=mask)
    loss = (1.0 - eps) * (lse - zt)
    if HAS_SMOOTHING:
        loss += eps * (lse - zs / V)
    t = tl.load(t_ptr + offs, mask=mask, other=0).to(tl.int64)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    loss = tl.where(ignored, 0.0, loss)
    loss = tl.where(in_range | ignored, loss, float("nan"))
    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(loss_ptr + offs, loss, mask=mask)


def triton_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    opts: LossOptions,
    config: Optional[KernelConfig] = None,
    with_entropy: bool = False,
):
    """(loss [N] fp32, lse [N] fp32), and the entropy [N] fp32 with ``with_entropy=True``; see
    cce_inductor.kernels for the contract."""
    check_kernel_inputs(hidden, weight, bias, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    loss = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    entropy = torch.empty(N, device=dev, dtype=torch.float32) if with_entropy else None
    outputs = (loss, lse) if entropy is None else (loss, lse, entropy)
    if N == 0:
        return outputs
    cfg = config if config is not None else pick_config(N, D, V, hidden.dtype, dev)
    targets = targets.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    smoothing = opts.label_smoothing > 0.0
    splits, per_split = forward_splits(cfg, N, V, dev)
    part = torch.empty((3 + smoothing + with_entropy, splits, N), device=dev, dtype=torch.float32)
    t = cfg.forward
    _partial_lse_kernel[(cdiv(N, t.block_m), splits)](
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, t_ptr=targets, part_ptr=part,
        N=N, D=D, V=V, tiles_per_split=per_split,
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1), stride_wv=weight.stride(0),
        stride_wd=weight.stride(1),
        scale=float(opts.logit_scale), softcap=None if opts.softcap is None else float(opts.softcap),
        BLOCK_N=t.block_m, BLOCK_V=t.block_n, BLOCK_K=t.block_k, HAS_SMOOTHING=smoothing,
        HAS_ENTROPY=with_entropy, ENT_PLANE=3 + smoothing,
        UPCAST=cfg.upcast_dot, DOT_PREC=dot_precision(cfg, hidden.dtype),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    _merge_kernel[(cdiv(N, cfg.merge_block),)](
        part_ptr=part, t_ptr=targets, loss_ptr=loss, lse_ptr=lse, ent_ptr=entropy,
        N=N, V=V, n_splits=splits, ignore_index=int(opts.ignore_index), eps=float(opts.label_smoothing),
        BLOCK=cfg.merge_block, ENT_PLANE=3 + smoothing,
    )
    return outputs
