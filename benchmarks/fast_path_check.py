"""One-GPU check of the two paths (issue 7) and their kernels: correctness, time, peak memory, against torch.compile.

    PYTHONUNBUFFERED=1 python3 benchmarks/fast_path_check.py [--shapes gemma2,llama3] [--regime zipf|flat]
                                                             [--quick] [--kernels] [--kernel-sweep]
    TRITON_INTERPRET=1 python3 benchmarks/fast_path_check.py --dry-run    # CPU: checks the script runs

For each shape (N = 8192 tokens, bf16): a float64 reference (chunked), then every variant below once for
its loss / dE / dC relative errors, do_bench median fwd+bwd ms, the peak memory of one fwd+bwd over what
was allocated before (inputs; the gradients count, as in peers.py), and the forward without grad:

  eager, torch.compile                      baselines (peers.py's expression)
  mm                                        cuBLAS E @ C^T alone (the matmul ceiling: fast path >= 3x, low-memory >= 4x)
  fast                                      the default fast path (plan from the memory budget)
  fast:Nc=<n>,<int4|int8>,<scheme>          the fast path with an explicit token chunk, remainder, d_weight scheme
  low_memory                                the low-memory path (fused forward, vocab-chunked backward)
  low_memory:dH=cublas_fold|cublas_fp32     its d_hidden by cuBLAS (folded into hi + remainder, or into fp32)
  fwd-no-grad: fused | chunked | torch.compile

--kernels (it was kernel_check.py) adds the low-memory path's Triton kernels called directly, without
autograd (``triton_forward`` + ``triton_backward``, config from ``pick_config``): errors, peak, fwd+bwd ms,
the first call's seconds (Triton compiles), forward ms and backward ms, and the backward's GPU time per
kernel (torch.profiler, one group per Triton kernel by name, cuBLAS matmuls together). --kernel-sweep
adds their forward and backward under other configs (forward splits, d_hidden remainder, launch orders).

Every variant is guarded: one failure prints an ERROR row and the run goes on. Writes
$OUT/fast_path_check.json when $OUT is set; prints a short table last. Budget: ~3-4 minutes on one H200
(--kernels: ~1 minute more). --dry-run: CPU, the tiny shape, one timed call per number, no memory
numbers, --kernels on (~1.5 minutes on 2 cores; --kernel-sweep ~1 minute more); the op and the kernels
rows run the Triton kernels in the interpreter (``cce_inductor.select.use_triton_on_cpu``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from contextlib import nullcontext

import torch

import cce_inductor
from cce_inductor import config
from cce_inductor.options import LossOptions
from cce_inductor.paths import choose_path, plan_fast
from harness import (MiB, PeakMemory, bench_ms, eager, eager_copy, errors, float64_reference, fmt, free, gpu_name,
                     make_inputs, matmul_ms, measure_loss_head, ratio, shape, sync, wall_s, write_json)

ROWS = []
DEV = "cuda"  # --dry-run: "cpu"
OPTS = LossOptions()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench(fn, rep):
    return bench_ms(fn, warmup=max(25, rep // 4), rep=rep, device=DEV)


def add(row):
    log(json.dumps(row))
    ROWS.append(row)
    return row


def guarded(row, body):
    """Run ``body(row)``; an exception becomes the row's error (and a traceback), the run goes on."""
    try:
        body(row)
    except Exception as ex:  # noqa: BLE001
        row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        traceback.print_exc()
    free(DEV)
    return add(row)


def measure(shape_name, name, fn, e, c, t, ref, rep, nograd_fn=None, patch=None):
    """Errors, fwd+bwd ms, peak MiB and (optionally) no-grad forward ms of loss = fn(e, c, t)."""
    def body(row):
        with config.patch(**patch) if patch else nullcontext():
            row.update(measure_loss_head(fn, e, c, t, ref, warmup=max(25, rep // 4), rep=rep, device=DEV))
            if nograd_fn is not None:
                x, w = e.detach(), c.detach()
                with torch.no_grad():
                    row["fwd_nograd_ms"] = bench(lambda: nograd_fn(x, w, t), rep)

    return guarded({"shape": shape_name, "variant": name}, body)


def op(path=None):
    return lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path=path)


def nograd_row(shape_name, name, fn, e, c, t, rep, patch=None):
    def body(row):
        with config.patch(**patch) if patch else nullcontext(), torch.no_grad():
            x, w = e.detach(), c.detach()
            fn(x, w, t)
            with PeakMemory(DEV) as mem:
                fn(x, w, t)
            row["peak_MiB"] = mem.above_mib
            row["fwd_nograd_ms"] = bench(lambda: fn(x, w, t), rep)

    guarded({"shape": shape_name, "variant": name}, body)


# ---- the low-memory path's kernels, called directly (was kernel_check.py) --------------------------------------

def backward_by_kernel(run_backward):
    """GPU milliseconds of one ``run_backward()`` per kernel group (torch.profiler): each Triton kernel under
    its own name, cuBLAS/CUTLASS matmuls as "cuBLAS matmul", the rest as "other". Off CUDA the profiler
    records CPU ops (the dry run checks the grouping runs, not its numbers)."""
    from torch.profiler import ProfilerActivity, profile

    run_backward()
    sync(DEV)
    activity = ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        run_backward()
        sync(DEV)
    groups = {}
    for ev in prof.key_averages():
        if DEV == "cuda":  # own time only: a host-side entry's total would count its kernels again
            us = getattr(ev, "self_device_time_total", None)
            us = getattr(ev, "self_cuda_time_total", 0.0) if us is None else us
            if not us:
                continue
        else:
            us = ev.self_cpu_time_total
        name = ev.key
        if "_kernel" in name:
            key = name[:name.index("_kernel") + len("_kernel")]
        elif any(s in name.lower() for s in ("gemm", "cutlass", "sm90", "nvjet", "xmma", "cublas")):
            key = "cuBLAS matmul"
        else:
            key = "other"
        groups[key] = groups.get(key, 0.0) + us / 1000.0
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def kernel_rows(shape_name, e, c, t, ref, rep, sweep):
    from cce_inductor.kernels import pick_config, triton_backward, triton_forward
    from cce_inductor.kernels.config import chunk_budget

    h, w = e.detach(), c.detach()
    N, D = h.shape
    V = w.shape[0]
    cfg = pick_config(N, D, V, h.dtype, h.device)
    grad = torch.full((N,), 1.0 / N, device=DEV)

    def fwd_bwd(cfg=None):
        loss, lse = triton_forward(h, w, None, t, OPTS, config=cfg)
        dh, dw, _ = triton_backward(grad, None, h, w, None, t, lse, OPTS, config=cfg)
        return loss.mean(), dh, dw

    def both(row):
        row["first_call_s"] = round(wall_s(fwd_bwd, device=DEV)[0], 3)  # Triton compiles its kernels
        row.update(errors(ref, *fwd_bwd()))
        free(DEV)
        with PeakMemory(DEV) as mem:
            out = fwd_bwd()
        del out
        row["peak_MiB"] = mem.above_mib
        row["grads_MiB"] = (h.numel() + w.numel()) * h.element_size() / MiB
        row["fwdbwd_ms"] = bench(fwd_bwd, rep)

    guarded({"shape": shape_name, "variant": "kernels: fwd+bwd (direct)", "config": repr(cfg)}, both)
    guarded({"shape": shape_name, "variant": "kernels: forward"},
            lambda row: row.update(ms=bench(lambda: triton_forward(h, w, None, t, OPTS), rep)))

    def backward(row):
        _, lse = triton_forward(h, w, None, t, OPTS)
        run = lambda: triton_backward(grad, None, h, w, None, t, lse, OPTS)  # noqa: E731
        row["ms"] = bench(run, rep)
        row["by_kernel_ms"] = backward_by_kernel(run)

    guarded({"shape": shape_name, "variant": "kernels: backward"}, backward)
    if not sweep:
        return
    for name, fcfg in {"fwd base": cfg, "fwd splits=8": cfg.with_(splits=8)}.items():
        guarded({"shape": shape_name, "variant": f"kernels sweep: {name}"},
                lambda row, fcfg=fcfg: row.update(ms=bench(lambda: triton_forward(h, w, None, t, OPTS, config=fcfg),
                                                           rep)))
    _, lse = triton_forward(h, w, None, t, OPTS, config=cfg)
    variants = {
        "bwd base": cfg,
        "bwd remainder=float (2-byte lo, smaller chunks)": cfg.with_(dhidden_remainder="float",
                                                                     chunk_bytes=chunk_budget(N, D, V, 2, 2)),
        "bwd draw N-fastest": cfg.with_(draw_vocab_fastest=False),
        "bwd dhidden d-fastest": cfg.with_(dhidden_d_fastest=True),
        "bwd base again": cfg,
    }
    for name, bcfg in variants.items():
        guarded({"shape": shape_name, "variant": f"kernels sweep: {name}"},
                lambda row, bcfg=bcfg: row.update(ms=bench(
                    lambda: triton_backward(grad, None, h, w, None, t, lse, OPTS, config=bcfg), rep)))


# ---- the run ----------------------------------------------------------------------------------------

def check_shape(shape_name, a, rep, compiled, compiled_nograd):
    N, D, V = shape(shape_name)
    e, c, t = make_inputs(N, D, V, a.regime, device=DEV)
    ref = float64_reference(e, c, t)
    free(DEV)
    plan = plan_fast(N, D, V, torch.bfloat16)
    log(f"{shape_name}: choose_path -> {choose_path(N, D, V, torch.bfloat16, DEV, 'mean', False, True)}; "
        f"plan {plan}")
    mm = matmul_ms(e, c, warmup=max(25, rep // 4), rep=rep, device=DEV)
    add({"shape": shape_name, "variant": "mm (cuBLAS E@C^T)", "fwdbwd_ms": mm})

    measure(shape_name, "eager", eager, e, c, t, ref, rep, nograd_fn=eager)
    measure(shape_name, "torch.compile", compiled, e, c, t, ref, rep, nograd_fn=compiled_nograd)
    measure(shape_name, "fast (default)", op(), e, c, t, ref, rep)
    # an upstream gradient that is not a power of two (loss / 3): the backward's in-place scaling
    third = ref.scaled(1 / 3)
    measure(shape_name, "eager, loss/3", lambda e, c, t: eager(e, c, t) / 3, e, c, t, third, rep // 4)
    measure(shape_name, "fast (default), loss/3", lambda e, c, t: op()(e, c, t) / 3, e, c, t, third, rep // 4)
    variants = [(1024, "int4", "cublas_fold"), (2048, "int4", "cublas_fold"), (2048, "int8", "cublas_fold"),
                (4096, "int4", "cublas_fold"), (2048, "int4", "triton")]
    for nc, rem, scheme in variants[:2] if a.quick else variants:
        measure(shape_name, f"fast:Nc={nc},{rem},{scheme}", op("fast"), e, c, t, ref, rep,
                patch={"fast_path_tokens_per_chunk": nc, "fast_path_remainder": rem,
                       "fast_path_weight_accumulate": scheme})
    measure(shape_name, "low_memory (fused fwd)", op("low_memory"), e, c, t, ref, rep,
            patch={"forward_kernel": "fused"})
    for dh in ("cublas_fold", "cublas_fp32"):
        measure(shape_name, f"low_memory:dH={dh}", op("low_memory"), e, c, t, ref, rep,
                patch={"forward_kernel": "chunked", "low_memory_dhidden": dh})

    fwd = lambda x, w, t: cce_inductor.linear_cross_entropy(x, w, t)  # noqa: E731
    nograd_row(shape_name, "fwd-no-grad fused", fwd, e, c, t, rep, patch={"forward_kernel": "fused"})
    nograd_row(shape_name, "fwd-no-grad chunked (default)", fwd, e, c, t, rep, patch={"forward_kernel": "chunked"})
    nograd_row(shape_name, "fwd-no-grad torch.compile", compiled_nograd, e, c, t, rep)
    if a.kernels or a.kernel_sweep:
        kernel_rows(shape_name, e, c, t, ref, rep, a.kernel_sweep)
    del e, c, t, ref
    free(DEV)


def print_table():
    def of(variant, key):
        return {r["shape"]: r.get(key) for r in ROWS if r.get("variant") == variant}

    tc, tcm, tcf = (of("torch.compile", k) for k in ("fwdbwd_ms", "peak_MiB", "fwd_nograd_ms"))
    print(f"\n{'shape':7} {'variant':34} {'fb_ms':>8} {'xTC':>5} {'peakMiB':>8} {'xTCmem':>6} {'nograd':>7} "
          f"{'xTC':>5} {'loss_err':>8} {'dE_err':>8} {'dC_err':>8}")
    for r in ROWS:
        s, v = r["shape"], r["variant"]
        if "error" in r:
            print(f"{s:7} {v[:34]:34} ERROR {r['error'][:100]}")
        elif "ms" in r:  # a kernel alone
            print(f"{s:7} {v[:60]:60} {r['ms']:8.3f} ms")
            if r.get("by_kernel_ms"):
                print(f"{'':7}   by kernel: " + ", ".join(f"{k} {ms:.2f}" for k, ms in r["by_kernel_ms"].items()))
        else:
            fb, pk, ng = r.get("fwdbwd_ms"), r.get("peak_MiB"), r.get("fwd_nograd_ms")
            print(f"{s:7} {v[:34]:34} {fmt(fb, '8.2f', '-')} {ratio(fb, tc.get(s), '5.2f', '    -')} "
                  f"{fmt(pk, '8.0f', '-')} {ratio(pk, tcm.get(s), '6.2f', '-'):>6} {fmt(ng, '7.2f', '-')} "
                  f"{ratio(ng, tcf.get(s), '5.2f', '    -')} {fmt(r.get('loss_err'), '8.1e', '-')} "
                  f"{fmt(r.get('dE_err'), '8.1e', '-')} {fmt(r.get('dC_err'), '8.1e', '-')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--regime", default="zipf", choices=["zipf", "flat"])
    ap.add_argument("--quick", action="store_true", help="fewer variants, shorter benchmarks")
    ap.add_argument("--kernels", action="store_true",
                    help="also the low-memory kernels called directly, the backward per kernel (was kernel_check.py)")
    ap.add_argument("--kernel-sweep", action="store_true",
                    help="also the kernels under other configs (was kernel_check.py --sweep)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shape, Triton interpreter: checks that the script runs (no meaningful numbers)")
    a = ap.parse_args(argv)
    global DEV
    if a.dry_run:
        DEV, a.shapes, a.kernels = "cpu", "tiny", True
        if os.environ.get("TRITON_INTERPRET") != "1":  # read when triton is imported, before this line
            raise SystemExit("the dry run runs the Triton kernels in the interpreter: "
                             "TRITON_INTERPRET=1 python3 benchmarks/fast_path_check.py --dry-run")
        from cce_inductor.select import use_triton_on_cpu

        use_triton_on_cpu().__enter__()  # the op's Triton paths too, on CPU tensors (for the rest of the run)
    import triton

    rep = 100 if a.quick else 200
    log(f"torch {torch.__version__} triton {triton.__version__} {gpu_name(DEV)}{' (dry run)' if a.dry_run else ''}")
    compiled = torch.compile(eager)
    compiled_nograd = torch.compile(eager_copy)
    for shape_name in a.shapes.split(","):
        check_shape(shape_name, a, rep, compiled, compiled_nograd)
    if os.environ.get("OUT"):
        write_json(os.path.join(os.environ["OUT"], "fast_path_check.json"), ROWS)
    print_table()


if __name__ == "__main__":
    main()
