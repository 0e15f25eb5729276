"""Knobs of cce_inductor, Inductor-style (``torch.utils._config_module``)::

    import cce_inductor
    cce_inductor.config.path = "fast"                       # global, thread-local override
    with cce_inductor.config.patch(fast_path_memory_fraction=0.3):
        ...

Read where the op runs (eagerly, or inside a compiled graph's op call: the fast path's chunking knobs,
the kernel variants) and where the public function decides which op to call. ``path`` is read by the
rewrite when a function is compiled and written into its graph (and into the FX-graph cache key): set it
before compiling. Changing it later does not recompile a function already compiled in this process (the
rewrite runs after Dynamo's tracing, so no guard is installed); ``torch._dynamo.reset()`` recompiles.
"""
import sys
from typing import Optional

# Which implementation computes a loss whose gradient is needed:
#   "auto"        the fast path (3 matmuls, gradients formed in the forward, token chunks) where it is
#                 valid (scalar loss: reduction "mean"/"sum", no lse output, a gradient needed) and its
#                 workspace fits ``fast_path_memory_fraction``; else the low-memory path.
#   "fast"        the fast path wherever it is valid, whatever its workspace.
#   "low_memory"  always the low-memory path (4 matmuls: the backward recomputes the logits per
#                 vocabulary chunk; memory ~1.1x the two gradients).
path: str = "auto"

# Memory budget of the fast path: its peak (the two gradients it returns + its workspace: one
# [tokens_per_chunk, V] logits chunk and the d_weight accumulator: float32 sum, or remainder and product slab) may be at most this
# fraction of the peak of keeping the logits (the two gradients + the N x V logits in the input dtype), which
# is what torch.compile's fused loss takes. 0.8 gives 4096-token chunks at the Gemma 2 and Llama 3 shapes
# (8192 tokens); at 0.5 they were 1024/512-token chunks and, measured on an H200, slower than the low-memory
# path (benchmarks/NOTES.md, v6).
fast_path_memory_fraction: float = 0.8

# Fewest tokens per chunk for which "auto" still takes the fast path: below it every chunk re-reads
# and re-writes d_weight for too little matmul work, and the low-memory path is the better choice
# (measured at 512 and 1024 tokens on an H200: slower than, or level with, the low-memory path).
fast_path_min_tokens_per_chunk: int = 2048

# Most tokens per chunk the budget may give: fewer, larger chunks mean fewer passes over the d_weight
# accumulator and larger matmuls (at 32768 x 2048 x 128256 on an H100, 8192-token chunks with a float32
# accumulator ran at torch.compile's time where 4096-token int8 chunks were 1.14x: benchmarks/NOTES.md v9),
# and the cap keeps the memory flat as the tokens grow.
fast_path_max_tokens_per_chunk: int = 8192

# Explicit tokens per chunk of the fast path (None: derived from the memory budget).
fast_path_tokens_per_chunk: Optional[int] = None

# How the fast path keeps the float32 sum of d_weight across token chunks (16-bit inputs, several chunks):
# "fp32" (a float32 [V, D] accumulator that cuBLAS reads and writes in its epilogue: 4 bytes per weight
# element, the cheapest pass), "int8" / "int4" (the 16-bit gradient itself plus a rounding remainder of 1 or
# 1/2 byte per element in 1/128- or 1/8-ulp steps, filled by a fold pass), or "auto": the plan with the
# least predicted accumulator time within the budget (paths.plan_cost); with an explicit
# ``fast_path_tokens_per_chunk``, the first of fp32, int8, int4 whose workspace stays within the budget.
fast_path_remainder: str = "auto"

# How the fast path adds each token chunk's d_weight into its 16-bit accumulator (hi + remainder):
# "cublas_fold" (cuBLAS float32 products of a vocabulary slab of ``fold_slab_bytes``, folded into hi/lo by
# one elementwise pass: cuBLAS speed, 13 bytes per weight element of traffic per chunk), "triton" (one
# Triton matmul with the fold in its epilogue: no slab, no extra traffic, a slower matmul), or "auto"
# (cublas_fold on CUDA, triton under the Triton interpreter).
fast_path_weight_accumulate: str = "auto"

# Bytes of the float32 product slab of the "cublas_fold" schemes (fast path d_weight, low-memory d_hidden).
fold_slab_bytes: int = 64 * 2**20

# Per-token forward of the low-memory op: "fused" (one Triton kernel: matmul + online log-sum-exp, no logits
# in memory, fp32 logits), "chunked" (cuBLAS logits per token chunk + a Triton row kernel; one [chunk, V]
# buffer), or "auto": chunked for a forward without gradient on CUDA (torch.compile's speed there), fused when
# the backward will recompute the logits (its lse then matches the recomputed fp32 logits exactly; with the
# chunked forward's bf16 logits the gradients measured 1.3x eager's error) and under the Triton interpreter.
forward_kernel: str = "auto"

# Bytes of the logits chunk of the "chunked" forward (512 MiB: measured at torch.compile's speed at both
# model shapes on an H200, where 128 MiB was 7-19% slower; benchmarks/NOTES.md).
forward_chunk_bytes: int = 512 * 2**20

# d_hidden of the low-memory path's backward: "triton" (hi + remainder accumulator kernel, default),
# "cublas_fold" (cuBLAS float32 products of ``fold_slab_bytes``, folded into hi + remainder), or
# "cublas_fp32" (cuBLAS with an fp32 output into an fp32 N x D accumulator: N*D*4 bytes more memory).
low_memory_dhidden: str = "triton"

from torch.utils._config_module import install_config_module  # noqa: E402

install_config_module(sys.modules[__name__])
