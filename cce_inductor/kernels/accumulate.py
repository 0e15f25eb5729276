"""One kernel that adds a matmul into a 16-bit (or fp32) accumulator without losing the fp32 sum.

``hi (+ lo) [M, N] += A [M, K] @ B [K, N]`` with fp32 accumulation over K and arbitrary A/B strides.

* fp32 ``hi`` (or a single pass): plain read-add-write (LO_NONE).
* 16-bit ``hi``: hi is the value rounded to the 16-bit dtype after every pass (it is the returned
  gradient) and lo keeps the rounding remainder ``acc - hi`` so the next pass continues from the fp32 sum:
  - LO_INT8: int8, in units of 1/128 of hi's ulp (N bytes per row; error <= 2^-8 ulp per pass),
  - LO_INT4: two signed 4-bit values per byte, in units of 1/8 of hi's ulp (N/2 bytes per row; error
    <= 2^-4 ulp per pass),
  - LO_FLOAT: lo has hi's dtype (2 bytes per element; the remainder rounded to 16 bits).
  The unit is a power of two taken from hi's exponent bits, so scaling by it is exact; the ranges
  (+-127 and +-7 units) span +-1 ulp (round-to-nearest needs +-1/2 ulp: the margin covers a truncating
  conversion too).

Used twice: the low-memory backward's d_hidden (A = the d(logits) chunk [N, Vc], B = the weight chunk,
K = vocabulary columns) and the fast path's d_weight (A = d(logits)^T of a token chunk, a transposed view
[V, Nc], B = the token chunk of hidden, K = tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..core.errors import is_triton_out_of_resources
from ..logging_ import log
from .common import to_rne
from .device import TILES_16BIT, TILES_32BIT, tile_smem
from .tiles import Tile, cdiv

LO_NONE, LO_INT8, LO_FLOAT, LO_INT4 = 0, 1, 2, 3
LO_MODES = {"none": LO_NONE, "int8": LO_INT8, "float": LO_FLOAT, "int4": LO_INT4}


@triton.jit
def remainder_unit(hf, UNIT_SCALE: tl.constexpr, UNIT_MIN: tl.constexpr):
    """Unit of the integer remainder of the 16-bit value ``hf`` (given as fp32): 2^floor(log2|hf|) from
    the fp32 exponent bits times UNIT_SCALE (a power of two); UNIT_MIN covers zero and fp16 subnormals."""
    pow2 = (hf.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.maximum(pow2 * UNIT_SCALE, UNIT_MIN)


@triton.jit
def remainder_inv_unit(hf, UNIT_SCALE: tl.constexpr, UNIT_MIN: tl.constexpr):
    """1 / remainder_unit(hf), exactly (a power of two built from the exponent bits: no division, which
    the GPU would do approximately)."""
    ebits = hf.to(tl.int32, bitcast=True) & 0x7F800000
    inv_pow2 = (0x7F000000 - ebits).to(tl.float32, bitcast=True)  # 2^-e; 2^127 for zero/subnormal hf
    return tl.minimum(inv_pow2, UNIT_SCALE / UNIT_MIN) * (1.0 / UNIT_SCALE)


def remainder_constants(dtype: torch.dtype, lo_mode: int) -> tuple[float, float, float]:
    """(unit scale, unit min, clamp) of the integer remainders for a 16-bit accumulator dtype."""
    mant_bits = 10 if dtype == torch.float16 else 7
    extra, clamp = (3, 7.0) if lo_mode == LO_INT4 else (7, 127.0)
    # fp16: the subnormal spacing 2^-24 in units; bf16: the smallest normal fp32 number (a smaller unit
    # only matters for gradients below 2^-126, and stays clear of fp32 subnormals on the GPU).
    unit_min = 2.0 ** -24 / 2 ** extra if dtype == torch.float16 else 2.0 ** -126
    return 2.0 ** -(mant_bits + extra), unit_min, clamp


@triton.heuristics({
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
})
@triton.jit
def _accumulate_kernel(
    a_ptr, b_ptr, hi_ptr, lo_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_hi, stride_lo,
    UNIT_SCALE: tl.constexpr, UNIT_MIN: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, LO_MODE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, N_FASTEST: tl.constexpr, EVEN_K: tl.constexpr,
):
    if N_FASTEST:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # int64 offsets: M*K, K*N and M*N may pass 2^31 elements.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k).to(tl.int64)
        if EVEN_K:
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_cols + kk[:, None] * stride_bk, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = kk < K
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_cols + kk[:, None] * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)

    _fold(acc, hi_ptr, lo_ptr, offs_m, offs_n, m_mask, n_mask, pid_n, N, stride_hi, stride_lo,
          UNIT_SCALE, UNIT_MIN, CLAMP, BLOCK_M, BLOCK_N, FIRST, LAST, LO_MODE)


@triton.jit
def _fold(acc, hi_ptr, lo_ptr, offs_m, offs_n, m_mask, n_mask, pid_n, N, stride_hi, stride_lo,
          UNIT_SCALE: tl.constexpr, UNIT_MIN: tl.constexpr, CLAMP: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          FIRST: tl.constexpr, LAST: tl.constexpr, LO_MODE: tl.constexpr):
    """hi (+ lo) [offs_m, offs_n] += acc (a [BLOCK_M, BLOCK_N] fp32 tile): read the old value (unless
    FIRST), round the sum to hi's dtype, keep the remainder in lo (unless LAST)."""
    rows64 = offs_m.to(tl.int64)[:, None]
    offs = rows64 * stride_hi + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if LO_MODE == 3:  # int4: byte j of a row holds columns 2j (low nibble) and 2j+1 (high nibble)
        offs_p = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        lo_offs = rows64 * stride_lo + offs_p[None, :]
        lo_mask = m_mask[:, None] & (offs_p * 2 < N)[None, :]
    else:
        lo_offs = rows64 * stride_lo + offs_n[None, :]
        lo_mask = mask
    if not FIRST:
        old = tl.load(hi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += old
        if LO_MODE == 1:
            q = tl.load(lo_ptr + lo_offs, mask=lo_mask, other=0).to(tl.float32)
            acc += q * remainder_unit(old, UNIT_SCALE, UNIT_MIN)
        elif LO_MODE == 2:
            acc += tl.load(lo_ptr + lo_offs, mask=lo_mask, other=0.0).to(tl.float32)
        elif LO_MODE == 3:
            byte = tl.load(lo_ptr + lo_offs, mask=lo_mask, other=0).to(tl.int32)
            even = (byte << 28) >> 28  # sign-extend the low nibble
            odd = (byte << 24) >> 28
            q = tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_N)).to(tl.float32)
            acc += q * remainder_unit(old, UNIT_SCALE, UNIT_MIN)
    hi = to_rne(acc, hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi, mask=mask)
    if not LAST:
        if LO_MODE == 1 or LO_MODE == 3:
            hf = hi.to(tl.float32)
            q = (acc - hf) * remainder_inv_unit(hf, UNIT_SCALE, UNIT_MIN)  # exact: a power of two
            q = tl.minimum(tl.maximum(q, -CLAMP), CLAMP)
            q = q + tl.where(q >= 0, 0.5, -0.5)  # round half away from zero; the cast truncates
            if LO_MODE == 1:
                tl.store(lo_ptr + lo_offs, q.to(tl.int8), mask=lo_mask)
            else:
                qi = q.to(tl.int32)
                even, odd = tl.split(tl.reshape(qi, (BLOCK_M, BLOCK_N // 2, 2)))
                byte = (even & 0xF) | ((odd & 0xF) << 4)
                tl.store(lo_ptr + lo_offs, byte.to(tl.uint8), mask=lo_mask)
        elif LO_MODE == 2:
            tl.store(lo_ptr + lo_offs, to_rne(acc - hi.to(tl.float32), lo_ptr.dtype.element_ty), mask=lo_mask)


@triton.jit
def _fold_fp32_kernel(
    p_ptr, hi_ptr, lo_ptr, M, N, stride_p, stride_hi, stride_lo,
    UNIT_SCALE: tl.constexpr, UNIT_MIN: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, LO_MODE: tl.constexpr,
):
    """hi (+ lo) += p, elementwise: p is an fp32 matmul result (cuBLAS wrote it)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.load(p_ptr + offs_m.to(tl.int64)[:, None] * stride_p + offs_n[None, :],
                  mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    _fold(acc, hi_ptr, lo_ptr, offs_m, offs_n, m_mask, n_mask, pid_n, N, stride_hi, stride_lo,
          UNIT_SCALE, UNIT_MIN, CLAMP, BLOCK_M, BLOCK_N, FIRST, LAST, LO_MODE)


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a @ b with fp32 accumulation and no rounding of the result to the inputs' dtype:
    cuBLAS's float32 output for 16-bit inputs on CUDA (``out_dtype=``), an upcast matmul elsewhere."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)



def accumulate_fp32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor, *, first: bool) -> None:
    """``acc (fp32) = a @ b`` (first) or ``acc += a @ b``, with the sum kept in float32 throughout: on CUDA one
    cuBLAS call reading and writing the float32 accumulator in its epilogue (beta = 1; 16-bit operands on the
    tensor cores), elsewhere an upcast matmul."""
    if first:
        mm_fp32(a, b, acc)
    elif a.is_cuda and a.dtype != torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def accumulate_matmul_cublas(a: torch.Tensor, b: torch.Tensor, hi: torch.Tensor, lo: Optional[torch.Tensor],
                             p_buf: torch.Tensor, *, first: bool, last: bool, lo_mode: str) -> None:
    """Same contract as :func:`accumulate_matmul`, computed as cuBLAS float32 products of ``p_buf.shape[0]``
    rows of ``a`` at a time, each folded into hi (+ lo) by one elementwise pass."""
    M = a.shape[0]
    rows = p_buf.shape[0]
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        p = p_buf[:r1 - r0]
        mm_fp32(a[r0:r1], b, p)
        fold_fp32(p, hi[r0:r1], None if lo is None else lo[r0:r1], first=first, last=last, lo_mode=lo_mode)


# Tile of the elementwise fold: 16 KiB of fp32 per program, an even width (int4 packs column pairs).
FOLD_BLOCK_M, FOLD_BLOCK_N = 16, 256


def fold_fp32(p: torch.Tensor, hi: torch.Tensor, lo: Optional[torch.Tensor], *, first: bool, last: bool,
              lo_mode: str) -> None:
    """hi (+lo) [M, N] += p [M, N] (fp32), with hi's rounding remainder kept in lo as ``accumulate_matmul``
    keeps it: the same accumulator, filled from a cuBLAS float32 product instead of a Triton matmul."""
    M, N = p.shape
    assert hi.shape == (M, N) and hi.stride(1) == 1 and p.stride(1) == 1 and p.dtype == torch.float32
    mode = LO_MODES[lo_mode]
    if mode != LO_NONE:
        assert lo is not None and lo.stride(1) == 1 and lo.shape[0] == M
    unit_scale, unit_min, clamp = remainder_constants(hi.dtype, mode)
    grid = (cdiv(M, FOLD_BLOCK_M), cdiv(N, FOLD_BLOCK_N))
    _fold_fp32_kernel[grid](
        p_ptr=p, hi_ptr=hi, lo_ptr=lo if lo is not None else hi, M=M, N=N,
        stride_p=p.stride(0), stride_hi=hi.stride(0), stride_lo=lo.stride(0) if lo is not None else hi.stride(0),
        UNIT_SCALE=unit_scale, UNIT_MIN=unit_min, CLAMP=clamp, BLOCK_M=FOLD_BLOCK_M, BLOCK_N=FOLD_BLOCK_N,
        FIRST=first, LAST=last, LO_MODE=mode, num_warps=4,
    )


def new_remainder(rows: int, cols: int, mode: str, dtype: torch.dtype, device) -> torch.Tensor:
    """The lo buffer of an accumulator [rows, cols] of ``dtype`` (contents need no initialisation: the
    first pass does not read it)."""
    if mode == "int8":
        return torch.empty((rows, cols), dtype=torch.int8, device=device)
    if mode == "int4":
        return torch.empty((rows, (cols + 1) // 2), dtype=torch.uint8, device=device)
    if mode == "float":
        return torch.empty((rows, cols), dtype=dtype, device=device)
    raise ValueError(f"unknown remainder format {mode!r}")


def accumulate_matmul(a: torch.Tensor, b: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None, *,
                      first: bool, last: bool, lo_mode: str, tile: Tile, upcast: bool, dot_precision: str,
                      n_fastest: bool = False) -> None:
    """hi (+lo) += a @ b (hi: [M, N] with unit column stride; a: [M, K], b: [K, N], any strides).

    ``first``: hi and lo are not read (their contents are ignored); ``last``: lo is not written.
    ``lo_mode``: "none" (fp32 hi, or one pass only), "int8", "int4" or "float".
    """
    M, K = a.shape
    N = b.shape[1]
    assert b.shape[0] == K and hi.shape == (M, N) and hi.stride(1) == 1
    mode = LO_MODES[lo_mode]
    if mode != LO_NONE:
        assert lo is not None and lo.stride(1) == 1 and lo.shape[0] == M
    unit_scale, unit_min, clamp = remainder_constants(hi.dtype, mode)
    if mode == LO_INT4:
        assert tile.block_n % 2 == 0
    key = (tile, mode, hi.dtype, a.dtype)
    tile = _WORKING_TILE.get(key, tile)
    while True:
        try:
            _launch(a, b, hi, lo, M, N, K, first, last, mode, unit_scale, unit_min, clamp, tile, upcast,
                    dot_precision, n_fastest)
            _WORKING_TILE[key] = tile
            return
        except Exception as ex:  # noqa: BLE001 - Triton's OutOfResources: try the next smaller tile
            smaller = _smaller_tile(tile, a.element_size()) if is_triton_out_of_resources(ex) else None
            if smaller is None:
                raise
            log.info("cce_inductor: accumulate tile %s does not fit (%s); trying %s", tile, ex, smaller)
            tile = smaller


# A tile that ran out of resources (shared memory of the epilogue's layout conversions, registers) is
# replaced by the next smaller one of the device table, once per (tile, remainder, dtypes).
_WORKING_TILE: dict = {}


def _smaller_tile(tile: Tile, elem_bytes: int) -> Optional[Tile]:
    size = tile_smem(tile, elem_bytes)
    for t in (TILES_32BIT if elem_bytes >= 4 else TILES_16BIT):
        if tile_smem(t, elem_bytes) < size and t.block_n % 2 == 0:
            return t
    return None


def _launch(a, b, hi, lo, M, N, K, first, last, mode, unit_scale, unit_min, clamp, tile, upcast, dot_precision,
            n_fastest):
    grid = (cdiv(M, tile.block_m), cdiv(N, tile.block_n))
    _accumulate_kernel[grid[::-1] if n_fastest else grid](
        a_ptr=a, b_ptr=b, hi_ptr=hi, lo_ptr=lo if lo is not None else hi,
        M=M, N=N, K=K,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_hi=hi.stride(0), stride_lo=lo.stride(0) if lo is not None else hi.stride(0),
        UNIT_SCALE=unit_scale, UNIT_MIN=unit_min, CLAMP=clamp,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        FIRST=first, LAST=last, LO_MODE=mode, UPCAST=upcast, DOT_PREC=dot_precision, N_FASTEST=n_fastest,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
