"""Which path computes the loss, and how the fast path chunks its tokens: pure arithmetic on sizes.

Two paths share the one public function ``linear_cross_entropy``:

* **fast**: valid when the loss is a scalar (reduction "mean"/"sum", no lse output) and a gradient is
  needed. Three matmuls, gradients formed in the forward, token chunks of ``tokens_per_chunk``:
  logits chunk (cuBLAS) -> one row kernel (lse, loss, d(logits) in place) -> d_hidden rows (cuBLAS) and
  d_weight += d(logits)^T @ hidden (accumulated exactly across chunks). Workspace: the logits chunk
  (``tokens_per_chunk * V`` elements of the input dtype) + the d_weight rounding remainder (V*D bytes as
  int8 or V*D/2 as int4; none for fp32 or a single chunk).
* **low_memory**: everything else: four matmuls (the backward recomputes the logits per vocabulary
  chunk), memory ~1.1x the two gradients. It is also the fast op's fallback when the fast workspace does
  not fit (``path="auto"``): the same forward + vocabulary-chunked backward then run inside the fast op's
  forward (``select._low_memory_in_forward``), so its outputs do not depend on the decision; the
  gradients are held from the forward to the backward as the fast path's are.

``choose_path`` is a pure function of sizes and flags, so the graph rewrite can call it at rewrite time
(with the sizes' hints) and ``explain`` can report the decision; the op makes the same decision again
from the actual sizes when it runs. SymInts are accepted (their hints are used; no guards).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .core.settings import PATHS, REMAINDERS, Settings, check_choice  # noqa: F401  (PATHS, REMAINDERS re-exported)

MiB = 1 << 20
# Bytes kept aside for small per-chunk buffers (per-token loss, d_bias, cuBLAS workspace).
SAFETY_BYTES = 16 * MiB
# Tokens per chunk are a multiple of this (the d_weight kernel's K loop, cuBLAS-friendly shapes).
CHUNK_ALIGN = 64


class PathChoice(NamedTuple):
    path: str              # "fast" | "low_memory"
    tokens_per_chunk: int  # fast path: tokens per chunk; low_memory: 0
    reason: str


class FastPlan(NamedTuple):
    tokens_per_chunk: int
    n_chunks: int
    remainder: str          # "none" | "int8" | "int4"
    workspace_bytes: int    # logits chunk + remainder
    budget_bytes: int       # what the memory fraction allows beyond the gradients (may be < 0)


def _hint(x) -> int:
    """A plain int for an int or a SymInt (its hint: no guard is installed). An unbacked SymInt without
    a hint counts as 8192 tokens (the decision is re-made from the real size when the op runs)."""
    if isinstance(x, torch.SymInt):
        node = x.node
        hint = getattr(node, "hint", None)
        if hint is None and getattr(node, "shape_env", None) is not None:
            try:
                hint = node.shape_env.size_hint(node.expr)
            except Exception:  # noqa: BLE001 - unbacked without a fallback
                hint = None
        return int(hint) if hint is not None else 8192
    return int(x)


def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Slab rows are a multiple of this: each slab starts a column slice of the 16-bit logits chunk, and cuBLAS
# takes its fast kernels only for 16-byte-aligned operands (7281-row slabs at D=2304 ran 1.6x slower).
SLAB_ALIGN = 256


def fold_slab_rows(cols: int, slab_bytes: int) -> int:
    """Rows of the float32 [rows, cols] product slab of the cuBLAS + fold scheme."""
    rows = max(1, slab_bytes // (4 * max(1, cols)))
    return rows // SLAB_ALIGN * SLAB_ALIGN if rows >= SLAB_ALIGN else rows


def remainder_bytes(V: int, D: int, remainder: str, slab_bytes: int) -> int:
    """Bytes of the d_weight accumulator beyond the gradient itself, by format: "fp32" a float32 [V, D]
    buffer; "int8"/"int4" the rounding remainder and the float32 product slab of the cuBLAS + fold scheme
    (counted whichever scheme fills it); "none" (one chunk, or fp32 inputs) nothing."""
    if remainder == "none":
        return 0
    if remainder == "fp32":
        return V * D * 4
    slab = min(V, fold_slab_rows(D, slab_bytes)) * D * 4
    return {"int8": V * D, "int4": V * ((D + 1) // 2)}[remainder] + slab


# The time model that ranks plans: the cost of each token chunk after the first, per d_weight element, in
# bytes of memory traffic at full bandwidth, by accumulator format. Measured on an H100 at 32768 x 2048 x
# 128256 (benchmarks/NOTES.md, v9): a cuBLAS matmul that reads and writes the float32 sum in its epilogue
# (beta = 1) took 0.32 ms more than one that does not (~4 bytes' worth), plus one 6-byte pass to round the
# sum at the end; the int8 fold took 0.83 ms per chunk plus ~0.4 ms of slower slab matmuls (~15 bytes'
# worth). Ties go to fewer chunks, then to the order of ACCUMULATORS (the more exact first).
ACCUMULATORS = ("fp32", "int8", "int4")
PASS_BYTES = {"fp32": 4, "int8": 15, "int4": 15, "none": 0}
FINAL_BYTES = {"fp32": 6, "int8": 0, "int4": 0, "none": 0}


def plan_cost(plan: "FastPlan") -> tuple:
    """How plans are ranked: predicted accumulator traffic (per weight element), then chunks."""
    return (max(0, plan.n_chunks - 1) * PASS_BYTES[plan.remainder] + FINAL_BYTES[plan.remainder], plan.n_chunks)


def _tokens_for(N: int, max_tokens: int) -> tuple[int, int]:
    """(tokens per chunk, chunks): balanced chunks of at most max_tokens, aligned to CHUNK_ALIGN."""
    if max_tokens >= N:
        return N, 1
    cap = max(CHUNK_ALIGN, max_tokens // CHUNK_ALIGN * CHUNK_ALIGN)
    n_chunks = -(-N // cap)
    nc = -(-N // n_chunks)
    nc = min(cap, -(-nc // CHUNK_ALIGN) * CHUNK_ALIGN)
    return nc, -(-N // nc)


def plan_fast(N, D, V, dtype: torch.dtype, *, memory_fraction: Optional[float] = None,
              tokens_per_chunk: Optional[int] = None, remainder: Optional[str] = None,
              min_tokens: Optional[int] = None, force: bool = False,
              settings: Optional[Settings] = None) -> Optional[FastPlan]:
    """The fast path's chunking under the memory budget, or None when no chunk of ``min_tokens`` fits.

    Budget: peak = gradients + workspace <= memory_fraction * (gradients + N*V logits), all in the input
    dtype (what keeping the logits costs, i.e. torch.compile's fused loss). Explicit ``tokens_per_chunk``
    bypasses the budget (always returns a plan); so does ``force`` when nothing fits (then the smallest
    chunk, ``min_tokens``, with the smallest remainder). Unset arguments come from ``settings`` (default:
    :meth:`Settings.from_config`).
    """
    cfg = settings if settings is not None else Settings.from_config()
    N, D, V = _hint(N), _hint(D), _hint(V)
    fraction = cfg.fast_path_memory_fraction if memory_fraction is None else memory_fraction
    tokens = cfg.fast_path_tokens_per_chunk if tokens_per_chunk is None else tokens_per_chunk
    rem_pref = cfg.fast_path_remainder if remainder is None else remainder
    min_tokens = cfg.fast_path_min_tokens_per_chunk if min_tokens is None else min_tokens
    max_tokens = cfg.fast_path_max_tokens_per_chunk
    check_choice("fast_path_remainder", rem_pref, REMAINDERS)

    def rem_bytes(rem: str) -> int:
        return remainder_bytes(V, D, rem, cfg.fold_slab_bytes)

    e = _elem_bytes(dtype)
    budget = budget_bytes(N, D, V, dtype, fraction)
    exact_acc = e >= 4  # fp32/fp64 accumulate in place: no remainder

    if tokens is not None:  # the chunk is fixed: "auto" takes the first format that keeps within the budget
        nc, n = _tokens_for(N, max(1, int(tokens)))
        if exact_acc or n <= 1:
            rem = "none"
        elif rem_pref != "auto":
            rem = rem_pref
        else:
            rem = next((r for r in ACCUMULATORS if nc * V * e + rem_bytes(r) <= budget), ACCUMULATORS[-1])
        return FastPlan(nc, n, rem, nc * V * e + rem_bytes(rem), budget)
    if N == 0:
        return FastPlan(0, 0, "none", 0, budget)
    candidates = []
    if N * V * e <= budget and N <= max_tokens:  # one chunk: no remainder
        candidates.append(FastPlan(N, 1, "none", N * V * e, budget))
    else:
        prefs = ["none"] if exact_acc else (list(ACCUMULATORS) if rem_pref == "auto" else [rem_pref])
        for rem in prefs:
            room = budget - rem_bytes(rem)
            if room < min(N, min_tokens) * V * e:
                continue
            nc, n = _tokens_for(N, min(room // (V * e), max_tokens))
            candidates.append(FastPlan(nc, n, rem if n > 1 else "none",
                                       nc * V * e + rem_bytes(rem if n > 1 else "none"), budget))
    if not candidates:
        if not force:
            return None
        return plan_fast(N, D, V, dtype, memory_fraction=fraction, tokens_per_chunk=min_tokens,
                         remainder="int4" if rem_pref == "auto" else rem_pref, settings=cfg)
    # Least predicted accumulator traffic (each chunk is a read-modify-write pass over d_weight); on a tie
    # the first candidate (the more exact format).
    return min(candidates, key=plan_cost)


def fast_path_refusal(path: str, reduction: str, return_lse: bool, needs_grad: bool,
                      return_entropy: bool = False) -> Optional[str]:
    """The one rule for whether the fast path may serve a loss, from flags only (never sizes: static under
    torch.compile): None when it may, else why not. The fast op itself then picks its scheme from the actual
    sizes (:func:`plan_fast`)."""
    check_choice("path", path, PATHS)
    if path == "low_memory":
        return "path='low_memory' requested"
    if reduction not in ("mean", "sum"):
        return f"reduction={reduction!r} needs per-token gradients (fast path: scalar loss only)"
    if return_lse:
        return "the lse output needs its own gradient (fast path: loss only)"
    if return_entropy:
        return "the per-token entropy output needs its own gradient (fast path: loss only)"
    if not needs_grad:
        return "no gradient needed (forward only)"
    return None


def choose_path(N, D, V, dtype: torch.dtype, device, reduction: str, return_lse: bool, needs_grad: bool,
                path: Optional[str] = None, settings: Optional[Settings] = None,
                return_entropy: bool = False) -> PathChoice:
    """("fast" | "low_memory", tokens_per_chunk, reason) for a loss of N tokens, hidden D, vocabulary V.

    ``path``: "auto" | "fast" | "low_memory" (None: ``cce_inductor.config.path``). ``device`` is accepted
    for the rewrite's convenience (both paths run everywhere: Triton kernels on CUDA, PyTorch on the
    CPU) and does not change the decision.
    """
    cfg = settings if settings is not None else Settings.from_config()
    path = cfg.path if path is None else path
    refusal = fast_path_refusal(path, reduction, return_lse, needs_grad, return_entropy)
    if refusal is not None:
        return PathChoice("low_memory", 0, refusal)
    if path == "fast":
        plan = plan_fast(N, D, V, dtype, force=True, settings=cfg)
        return PathChoice("fast", plan.tokens_per_chunk, "path='fast' requested")
    plan = plan_fast(N, D, V, dtype, settings=cfg)
    if plan is None:
        return PathChoice("low_memory", 0,
                          f"the fast path's workspace does not fit fast_path_memory_fraction="
                          f"{cfg.fast_path_memory_fraction} (budget "
                          f"{budget_bytes(N, D, V, dtype, cfg.fast_path_memory_fraction) / MiB:.0f} MiB "
                          f"beyond the gradients)")
    return PathChoice("fast", plan.tokens_per_chunk,
                      f"fits the memory budget: {plan.n_chunks} chunk(s) of {plan.tokens_per_chunk} tokens, "
                      f"remainder {plan.remainder}, workspace {plan.workspace_bytes / MiB:.0f} MiB")


def budget_bytes(N, D, V, dtype: torch.dtype, memory_fraction: float) -> int:
    """What the fast path's workspace may take beyond the gradients: ``memory_fraction`` x (gradients + the
    N x V logits), all in the input dtype (what keeping the logits costs), minus the gradients and a margin."""
    N, D, V, e = _hint(N), _hint(D), _hint(V), _elem_bytes(dtype)
    grads = (N + V) * D * e
    return int(memory_fraction * (grads + N * V * e)) - grads - SAFETY_BYTES
