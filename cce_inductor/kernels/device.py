"""Tile configurations that fit the device: chosen from its limits by shared-memory arithmetic.

A Triton matmul with ``num_stages`` pipeline stages keeps ``stages * (BM*BK + BK*BN) * element bytes`` of
operand tiles in shared memory. The Hopper-tuned tile (128x256x64, 3 stages: 144 KiB) fits H100/H200
(227 KiB per block) and A100 (163 KiB) but not sm_86/sm_89 GPUs (RTX 30/40, A10, L4, L40: 99 KiB), where
a launch would fail with Triton's OutOfResources. ``config_for(limits, dtype)`` takes the first tile of
a preference list that fits with a margin; ``device_limits(device)`` reads the limits from
``torch.cuda.get_device_properties`` (falling back on the table of known devices by compute capability).
When nothing fits, ``KernelDoesNotFit`` is raised and the op falls back to its PyTorch path with a log line.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.errors import KernelDoesNotFit
from .tiles import GPU_CONFIG, KernelConfig, Tile

KiB = 1024


@dataclass(frozen=True)
class DeviceLimits:
    capability: tuple[int, int]
    smem_per_block: int  # bytes a block may use (the opt-in maximum)
    sms: int


# Known devices (CUDA programming guide's per-block opt-in shared memory by compute capability; SM counts
# of the common SKUs, kept for reference): the table the CPU tests check the selection against. When the
# driver does not report the opt-in, SMEM_BY_CAPABILITY is used.
KNOWN_DEVICES = {
    "V100": DeviceLimits((7, 0), 96 * KiB, 80),
    "T4": DeviceLimits((7, 5), 64 * KiB, 40),
    "A100": DeviceLimits((8, 0), 163 * KiB, 108),
    "A10": DeviceLimits((8, 6), 99 * KiB, 72),
    "RTX 3090": DeviceLimits((8, 6), 99 * KiB, 82),
    "L4": DeviceLimits((8, 9), 99 * KiB, 58),
    "L40S": DeviceLimits((8, 9), 99 * KiB, 142),
    "RTX 4090": DeviceLimits((8, 9), 99 * KiB, 128),
    "H100": DeviceLimits((9, 0), 227 * KiB, 132),
    "H200": DeviceLimits((9, 0), 227 * KiB, 132),
    "B200": DeviceLimits((10, 0), 227 * KiB, 148),
    "RTX 5090": DeviceLimits((12, 0), 99 * KiB, 170),
}
SMEM_BY_CAPABILITY = {(7, 0): 96 * KiB, (7, 2): 96 * KiB, (7, 5): 64 * KiB, (8, 0): 163 * KiB, (8, 6): 99 * KiB,
                      (8, 7): 163 * KiB, (8, 9): 99 * KiB, (9, 0): 227 * KiB, (10, 0): 227 * KiB,
                      (12, 0): 99 * KiB}

# Shared memory Triton may need beyond the operand stages (layout conversions, barriers).
SMEM_MARGIN = 8 * KiB

# Preference order (largest first). The first entry is the H200-measured tile (benchmarks/NOTES.md).
TILES_16BIT = (
    Tile(128, 256, 64, num_warps=8, num_stages=3),   # 144 KiB
    Tile(128, 128, 64, num_warps=8, num_stages=3),   # 96 KiB
    Tile(128, 128, 32, num_warps=4, num_stages=4),   # 64 KiB
    Tile(64, 128, 32, num_warps=4, num_stages=3),    # 36 KiB
    Tile(64, 64, 32, num_warps=4, num_stages=2),     # 16 KiB
)
TILES_32BIT = (
    Tile(128, 128, 32, num_warps=8, num_stages=3),   # 96 KiB
    Tile(64, 128, 32, num_warps=4, num_stages=3),    # 72 KiB
    Tile(64, 64, 32, num_warps=4, num_stages=3),     # 48 KiB
    Tile(32, 64, 32, num_warps=4, num_stages=2),     # 24 KiB
)


def tile_smem(tile: Tile, elem_bytes: int) -> int:
    """Bytes of operand tiles a pipelined matmul tile keeps in shared memory."""
    return tile.num_stages * (tile.block_m * tile.block_k + tile.block_k * tile.block_n) * elem_bytes


def pick_tile(limits: DeviceLimits, elem_bytes: int) -> Optional[Tile]:
    for tile in (TILES_32BIT if elem_bytes >= 4 else TILES_16BIT):
        if tile_smem(tile, elem_bytes) + SMEM_MARGIN <= limits.smem_per_block:
            return tile
    return None


def config_for(limits: DeviceLimits, dtype: torch.dtype) -> KernelConfig:
    """The kernel configuration for a device with these limits (raises KernelDoesNotFit)."""
    elem = torch.finfo(dtype).bits // 8
    if limits.capability < (7, 0):
        raise KernelDoesNotFit(f"compute capability {limits.capability} is below 7.0 (no tensor-core tl.dot)")
    tile = pick_tile(limits, elem)
    if tile is None:
        raise KernelDoesNotFit(f"no tile fits {limits.smem_per_block // KiB} KiB of shared memory per block")
    return GPU_CONFIG.with_(forward=tile, draw=tile, dhidden=tile, accumulate=None)


def limits_from(capability: tuple[int, int], smem_optin: Optional[int], sms: int) -> DeviceLimits:
    """Limits from what the driver reports; the opt-in shared memory from the table when not reported."""
    smem = smem_optin or SMEM_BY_CAPABILITY.get(tuple(capability))
    if smem is None:  # an unknown capability: assume the smallest recent limit
        smem = 99 * KiB
    return DeviceLimits(tuple(capability), int(smem), int(sms))


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    return limits_from((props.major, props.minor), smem, props.multi_processor_count)


def config_for_device(device, dtype: torch.dtype) -> KernelConfig:
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return config_for(device_limits(index), dtype)
