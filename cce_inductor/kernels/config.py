"""Which :class:`~.tiles.KernelConfig` a problem gets, and the sizes derived from it.

:func:`pick_config` chooses one from the problem (N, D, V, dtype, device): the interpreter's tiny tiles on
CPU tensors, else tiles that fit the device (:mod:`.device`) with the backward's chunk budget
(:func:`chunk_budget`); :func:`forward_splits` and :func:`chunk_width` derive the grids.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .device import config_for_device
from .tiles import GPU_CONFIG, INTERPRETER_CONFIG, MiB, KernelConfig, Tile, cdiv  # noqa: F401  (re-exported)


def interpreted(device: torch.device) -> bool:
    """True when the kernels will run in the Triton interpreter (CPU tensors / TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type == "cpu"


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
