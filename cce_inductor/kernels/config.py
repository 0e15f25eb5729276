"""Tile sizes, warps, stages and memory budgets of the Triton kernels, in one frozen object.

Every kernel reads its launch shape from a :class:`KernelConfig`; :func:`pick_config` chooses one from
the problem (N, D, V, dtype, device). Tests pass a small config explicitly to force several vocabulary
splits / chunks on tiny shapes.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

MiB = 1 << 20


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

    @property
    def accumulate_tile(self) -> Tile:
        return self.accumulate if self.accumulate is not None else self.dhidden

    def with_(self, **kw) -> "KernelConfig":
        return replace(self, **kw)


def interpreted(device: torch.device) -> bool:
    """True when the kernels will run in the Triton interpreter (CPU tensors / TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type == "cpu"


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
)

# The backward may use this much memory beyond the two gradients it returns (fraction of their size);
# the draw buffer gets what the d_hidden remainder (lo) leaves, within [MIN, MAX]_CHUNK_BYTES. Larger
# chunks mean fewer read-modify-write passes over d_hidden and longer K loops (measured: 64 MiB is
# ~4 ms faster than 32 MiB at the gemma2 shape).
EXTRA_MEMORY_FRACTION = 0.10
MIN_CHUNK_BYTES = 16 * MiB
MAX_CHUNK_BYTES = 64 * MiB
SAFETY_BYTES = 8 * MiB


def chunk_budget(N: int, D: int, V: int, elem_bytes: int, remainder_bytes: int = 1) -> int:
    grads = (N + V) * D * elem_bytes
    lo = N * D * remainder_bytes if elem_bytes < 4 else 0
    spare = int(EXTRA_MEMORY_FRACTION * grads) - lo - SAFETY_BYTES
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, spare))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_target(device: torch.device) -> int:
    """How many programs a grid should have to run several full waves (tail effect < ~10%)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    return 8 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_config(N: int, D: int, V: int, dtype: torch.dtype, device) -> KernelConfig:
    if interpreted(device):
        return INTERPRETER_CONFIG
    from .device import config_for_device  # tiles that fit this device's shared memory

    base = config_for_device(device, dtype)
    elem = torch.finfo(dtype).bits // 8
    if elem == 4:
        return base.with_(chunk_bytes=chunk_budget(N, D, V, elem))
    # The float remainder has the cheaper epilogue (measured 2-3 ms faster at gemma2, where the buffer
    # is at its cap either way); the int8 one frees N*D bytes, worth it only when that grows the draw
    # buffer (llama3: 34.6 -> 64 MiB, backward 50.3 -> 47.2 ms).
    float_budget = chunk_budget(N, D, V, elem, elem)
    if float_budget >= MAX_CHUNK_BYTES:
        return base.with_(dhidden_remainder="float", chunk_bytes=float_budget)
    return base.with_(dhidden_remainder="int8", chunk_bytes=chunk_budget(N, D, V, elem, 1))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward_splits(cfg: KernelConfig, N: int, V: int, device) -> tuple[int, int]:
    """(splits, vocab tiles per split), with every split non-empty."""
    n_blocks = cdiv(N, cfg.forward.block_m)
    v_tiles = cdiv(V, cfg.forward.block_n)
    splits = cfg.splits if cfg.splits is not None else cdiv(num_programs_target(device), n_blocks)
    splits = max(1, min(splits, v_tiles))
    per_split = cdiv(v_tiles, splits)
    return cdiv(v_tiles, per_split), per_split


def chunk_width(cfg: KernelConfig, N: int, V: int, elem_bytes: int) -> int:
    """Vocabulary columns per backward chunk: a multiple of both kernels' vocab blocks, >= one block."""
    step = math.lcm(cfg.draw.block_n, cfg.dhidden.block_k)
    if cfg.chunk_cols is not None:
        cols = cfg.chunk_cols
    else:
        cols = max(cfg.chunk_bytes // max(1, N * elem_bytes), cfg.min_chunk_cols)
    cols = max(step, cols // step * step)
    return min(cols, cdiv(V, step) * step)
