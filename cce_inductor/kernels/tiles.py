"""The Triton kernels' launch shapes and options, in one frozen object (:class:`KernelConfig`), and the
two configurations measured so far: tiny tiles for the interpreter, Hopper tiles for the GPU.

:mod:`.device` derives a configuration that fits a given device from these; :mod:`.config` picks one for a
problem. Tests pass a small configuration explicitly to force several vocabulary splits / chunks on tiny
shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

MiB = 1 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Tile:
    """One matmul-shaped launch: an output tile of ``block_m x block_n`` built from ``block_k``-deep steps.

    tl.dot needs every block dimension >= 16.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelConfig:
    # Forward logits/LSE kernel: block_m = tokens, block_n = vocabulary columns, block_k = hidden dim.
    forward: Tile
    # Backward kernel that recomputes logits and writes d(raw logits) for a vocab chunk (same axes).
    draw: Tile
    # Backward d_hidden += draw_chunk @ W_chunk: block_m = tokens, block_n = hidden dim, block_k = vocab.
    dhidden: Tile
    # Rows per program of the tiny kernel that merges the per-split partial LSE state.
    merge_block: int = 128
    # Forward vocabulary splits (grid axis 1). None: derived so the grid fills the GPU several times.
    splits: Optional[int] = None
    # Byte budget of the reusable [N, Vc] draw buffer of the backward (the only N x V-ish allocation).
    # pick_config derives it from the memory target (see chunk_budget).
    chunk_bytes: int = 32 * MiB
    # Floor on the derived chunk width Vc: keeps the number of d_hidden read-modify-write passes
    # (V / Vc) from growing with N, at the price of a draw buffer of N * min_chunk_cols elements.
    # Without it, 32k tokens at llama3 got Vc = 256 and ran 9x slower than 8k (measured 591 ms).
    min_chunk_cols: int = 0
    # Explicit chunk width Vc (tests); None: derived from chunk_bytes.
    chunk_cols: Optional[int] = None
    # Upcast 16-bit operands to fp32 before tl.dot. Needed under TRITON_INTERPRET (its 16-bit dot is
    # wrong); on the GPU it would forfeit the tensor cores' 16-bit rate, so it stays off there.
    upcast_dot: bool = False
    # tl.dot precision for fp32 inputs: "ieee" matches eager fp32 matmuls (no TF32) at a speed cost.
    fp32_precision: str = "ieee"
    # Launch order of the backward grids (which tile index varies fastest among co-resident programs,
    # i.e. which operand they share in L2).
    # Vocab-fastest draw grid measured ~1-2 ms faster at both model shapes (programs share h rows).
    draw_vocab_fastest: bool = True
    dhidden_d_fastest: bool = False
    # Format of the d_hidden rounding remainder for 16-bit inputs: "int8" (1 byte/element, in units of
    # 1/128 ulp of hi), "int4" (half a byte, 1/8 ulp), "float" (hi's dtype, 2 bytes/element) or "none" (no
    # remainder: lossy, for tests that show what the remainder buys). The bytes saved go to the draw buffer.
    dhidden_remainder: str = "int8"
    # Fast path (kernels/fast.py): d_weight += d(logits)^T @ hidden per token chunk (block_m = vocabulary
    # rows, block_n = hidden dim, block_k = tokens); None: the dhidden tile.
    accumulate: Optional[Tile] = None
    # Fast path / chunked no-grad forward: the row kernel walks a logits row in blocks of row_block columns.
    row_block: int = 16
    row_warps: int = 4
    # Schemes (cce_inductor.config's knobs, resolved by the implementation selection and set here, so no
    # kernel reads the config itself):
    # how the fast path adds each token chunk's d_weight into its 16-bit hi + remainder accumulator:
    # "triton" (one Triton matmul with the fold in its epilogue) or "cublas_fold" (cuBLAS float32 products
    # of a vocabulary slab of fold_slab_bytes, folded in by one elementwise pass);
    weight_accumulate: str = "triton"
    # how the low-memory backward accumulates d_hidden over vocabulary chunks: "triton" (the accumulate
    # kernel), "cublas_fold" (as above) or "cublas_fp32" (cuBLAS into an fp32 [N, D] buffer, CUDA only);
    dhidden_scheme: str = "triton"
    # bytes of the float32 product slab of the cublas_fold schemes.
    fold_slab_bytes: int = 64 * MiB

    @property
    def accumulate_tile(self) -> Tile:
        return self.accumulate if self.accumulate is not None else self.dhidden

    def with_(self, **kw) -> "KernelConfig":
        return replace(self, **kw)


# Tiny tiles for the interpreter: every program is a numpy step, so few elements per block keep it fast.
INTERPRETER_CONFIG = KernelConfig(
    forward=Tile(16, 16, 16),
    draw=Tile(16, 16, 16),
    dhidden=Tile(16, 16, 16),
    merge_block=16,
    splits=None,
    chunk_bytes=8 * 1024,
    upcast_dot=True,
)

# Hopper (H100/H200) bf16/fp16. Measured on an H200 (benchmarks/NOTES.md): 128x256 output tiles with
# 64-deep K steps, 8 warps (two warpgroups), 3 stages beat 128x128 and 256x128 for all three kernels.
GPU_CONFIG = KernelConfig(
    forward=Tile(128, 256, 64, num_warps=8, num_stages=3),
    draw=Tile(128, 256, 64, num_warps=8, num_stages=3),
    dhidden=Tile(128, 256, 64, num_warps=8, num_stages=3),
    merge_block=256,
    min_chunk_cols=2048,
    row_block=2048,
    row_warps=8,
    # cuBLAS float32 products + one fold pass: the Triton matmul ran at 45% of cuBLAS on the H200 (NOTES.md)
    weight_accumulate="cublas_fold",
)
