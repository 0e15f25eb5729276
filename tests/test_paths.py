"""Path selection (choose_path / plan_fast), the config module, and the per-device tile table (CPU only)."""
import logging

import pytest
import torch

import cce_inductor
from cce_inductor import config, select
from cce_inductor.kernels.config import GPU_CONFIG
from cce_inductor.kernels.device import (KNOWN_DEVICES, KernelDoesNotFit, SMEM_MARGIN, DeviceLimits, config_for,
                                         limits_from, tile_smem)
from cce_inductor.paths import SAFETY_BYTES, choose_path, plan_fast, remainder_bytes

from helpers import make_inputs

MiB = 2**20
SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}


def peak_bytes(N, D, V, plan, elem=2):
    return (N + V) * D * elem + plan.workspace_bytes + SAFETY_BYTES


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_model_shapes_take_the_fast_path_within_the_budget(name, fraction):
    N, D, V = SHAPES[name]
    with config.patch(fast_path_memory_fraction=fraction):
        choice = choose_path(N, D, V, torch.bfloat16, "cuda", "mean", False, True)
        plan = plan_fast(N, D, V, torch.bfloat16)
    if plan is None:  # llama3 at 0.6: no chunk of >= 2048 tokens fits
        assert choice.path == "low_memory" and "budget" in choice.reason
        return
    assert choice.path == "fast" and choice.tokens_per_chunk >= config.fast_path_min_tokens_per_chunk, choice
    compile_peak = (N + V) * D * 2 + N * V * 2  # the gradients + the bf16 logits (measured: 5161 / 3070 MiB)
    assert peak_bytes(N, D, V, plan) <= fraction * compile_peak
    assert plan.workspace_bytes == plan.tokens_per_chunk * V * 2 + remainder_bytes(V, D, plan.remainder, config.fold_slab_bytes)
    assert plan.n_chunks == -(-N // plan.tokens_per_chunk)


def test_expected_plans_at_the_model_shapes():
    """The arithmetic of benchmarks/NOTES.md (v7 defaults, fraction 0.8): gemma2 2 chunks of 4096 with an
    int8 remainder, llama3 2 of 4096 with int4 (with int8 only 3 smaller chunks fit); at fraction 0.5 llama3
    only fits chunks under the 2048-token floor, so "auto" takes the low-memory path there."""
    g = plan_fast(*SHAPES["gemma2"], torch.bfloat16)
    assert (g.tokens_per_chunk, g.n_chunks, g.remainder) == (4096, 2, "int8")
    llama = plan_fast(*SHAPES["llama3"], torch.bfloat16)
    assert (llama.tokens_per_chunk, llama.n_chunks, llama.remainder) == (4096, 2, "int4")
    assert plan_fast(*SHAPES["llama3"], torch.bfloat16, remainder="int8").n_chunks == 3  # a smaller chunk
    assert plan_fast(*SHAPES["llama3"], torch.bfloat16, memory_fraction=0.5) is None
    assert choose_path(*SHAPES["llama3"], torch.bfloat16, "cuda", "mean", False, True).path == "fast"
    with config.patch(fast_path_memory_fraction=0.5):
        assert choose_path(*SHAPES["llama3"], torch.bfloat16, "cuda", "mean", False, True).path == "low_memory"


def test_invalid_cases_take_the_low_memory_path():
    N, D, V = SHAPES["gemma2"]
    assert choose_path(N, D, V, torch.bfloat16, "cuda", "none", False, True).path == "low_memory"
    assert choose_path(N, D, V, torch.bfloat16, "cuda", "mean", True, True).path == "low_memory"
    assert choose_path(N, D, V, torch.bfloat16, "cuda", "sum", False, False).path == "low_memory"
    assert choose_path(N, D, V, torch.bfloat16, "cuda", "sum", False, True, "low_memory").path == "low_memory"
    with pytest.raises(ValueError):
        choose_path(N, D, V, torch.bfloat16, "cuda", "sum", False, True, "fastest")


def test_budget_decides_and_path_fast_forces():
    small = (1024, 2304, 256000)  # the gradients alone are over half of keeping the logits
    auto = choose_path(*small, torch.bfloat16, "cuda", "mean", False, True)
    assert auto.path == "low_memory" and "budget" in auto.reason
    forced = choose_path(*small, torch.bfloat16, "cuda", "mean", False, True, "fast")
    assert forced.path == "fast" and forced.tokens_per_chunk == min(small[0], config.fast_path_min_tokens_per_chunk)


def test_config_knobs_change_the_plan():
    N, D, V = SHAPES["gemma2"]
    with config.patch(fast_path_memory_fraction=0.5):
        tighter = plan_fast(N, D, V, torch.bfloat16)
    with config.patch(fast_path_memory_fraction=0.8):
        roomier = plan_fast(N, D, V, torch.bfloat16)
    assert roomier.tokens_per_chunk > tighter.tokens_per_chunk and roomier.n_chunks < tighter.n_chunks
    with config.patch(fast_path_tokens_per_chunk=1000):
        p = plan_fast(N, D, V, torch.bfloat16)
        assert p.tokens_per_chunk == 960 and p.n_chunks == 9  # at most the request, 64-aligned, balanced
        assert p.remainder == "fp32"  # "auto": the chunk is fixed and a float32 accumulator fits the budget
    with config.patch(fast_path_tokens_per_chunk=2048, fast_path_memory_fraction=0.6):
        assert plan_fast(N, D, V, torch.bfloat16).remainder == "int8"  # no room for fp32, int8 fits
    with config.patch(fast_path_tokens_per_chunk=4096, fast_path_memory_fraction=0.5):
        assert plan_fast(N, D, V, torch.bfloat16).remainder == "int4"  # only int4 keeps it nearer the budget
    with config.patch(path="low_memory"):
        assert choose_path(N, D, V, torch.bfloat16, "cuda", "mean", False, True).path == "low_memory"
    assert config.path == "auto"


def test_fp32_needs_no_remainder_and_one_chunk_needs_none():
    N, D, V = SHAPES["llama3"]
    p = plan_fast(N, D, V, torch.float32)
    assert p is not None and p.remainder == "none"
    one = plan_fast(4096, 1024, 32000, torch.bfloat16, memory_fraction=2.0)
    assert one.n_chunks == 1 and one.remainder == "none"


def test_symint_sizes_use_their_hints_without_guards():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(8192, ConstantSource("N")), hint=8192)
    N, D, V = SHAPES["gemma2"]
    assert choose_path(n, D, V, torch.bfloat16, "cuda", "mean", False, True) == \
        choose_path(N, D, V, torch.bfloat16, "cuda", "mean", False, True)
    assert len(env.guards) == 0


# --- the device table -----------------------------------------------------------------------------

def test_hopper_keeps_the_measured_tile():
    for name in ("H100", "H200"):
        cfg = config_for(KNOWN_DEVICES[name], torch.bfloat16)
        assert cfg.forward == GPU_CONFIG.forward and cfg.dhidden == GPU_CONFIG.dhidden


@pytest.mark.parametrize("name", list(KNOWN_DEVICES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_known_device_gets_a_tile_that_fits(name, dtype):
    limits = KNOWN_DEVICES[name]
    cfg = config_for(limits, dtype)
    elem = torch.finfo(dtype).bits // 8
    for tile in (cfg.forward, cfg.draw, cfg.dhidden, cfg.accumulate_tile):
        assert tile_smem(tile, elem) + SMEM_MARGIN <= limits.smem_per_block
        assert min(tile.block_m, tile.block_n, tile.block_k) >= 16 and tile.block_n % 2 == 0


def test_sm86_and_sm89_do_not_get_the_hopper_tile():
    for name in ("A10", "RTX 3090", "L4", "L40S", "RTX 4090"):
        cfg = config_for(KNOWN_DEVICES[name], torch.bfloat16)
        assert tile_smem(GPU_CONFIG.forward, 2) > KNOWN_DEVICES[name].smem_per_block  # it would not launch
        assert cfg.forward != GPU_CONFIG.forward


def test_limits_from_driver_values_and_table():
    assert limits_from((8, 9), None, 58).smem_per_block == 99 * 1024
    assert limits_from((9, 0), 232448, 132).smem_per_block == 232448
    assert limits_from((11, 0), None, 10).smem_per_block == 99 * 1024  # unknown: conservative
    with pytest.raises(KernelDoesNotFit):
        config_for(DeviceLimits((8, 0), 8 * 1024, 10), torch.bfloat16)
    with pytest.raises(KernelDoesNotFit):
        config_for(DeviceLimits((6, 1), 48 * 1024, 10), torch.bfloat16)


def test_kernels_that_do_not_fit_fall_back_to_pytorch_with_a_log_line(monkeypatch, caplog):
    """An OutOfResources from a Triton launch (or no tile fitting) runs the PyTorch path instead of failing:
    every Triton entry point of the selection (the low-memory forward and backward, the fast path) is made to
    raise what a device without room raises."""
    from triton.runtime.errors import OutOfResources

    from cce_inductor import kernels, logging_

    def oor(*a, **k):
        raise OutOfResources(300000, 101376, "shared memory")

    def no_tile(*a, **k):
        raise KernelDoesNotFit("no tile fits 8 KiB of shared memory per block")

    monkeypatch.setattr(logging_, "_warned", set())  # each fallback is logged once per process
    monkeypatch.setattr(kernels, "triton_fast_forward", oor)
    monkeypatch.setattr(kernels, "triton_forward", oor)
    monkeypatch.setattr(kernels, "triton_backward", no_tile)
    monkeypatch.setattr(select, "uses_triton", lambda h: True)
    h, w, b, t = make_inputs((14,), 8, 21, torch.float32, bias=True)
    with caplog.at_level(logging.WARNING, logger="cce_inductor"):
        loss = cce_inductor.linear_cross_entropy(h, w, t, bias=b, path="fast")
        loss.backward()
        per_token = cce_inductor.linear_cross_entropy(h, w, t, bias=b, reduction="none")
        per_token.sum().backward()
        loss2 = cce_inductor.linear_cross_entropy(h, w, t, bias=b, path="fast")  # a second step: no new line
        loss2.backward()
    assert sum("do not fit this device" in r.getMessage() for r in caplog.records) == 2
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t)
    torch.testing.assert_close(loss, ref)
