"""One-GPU check of the two paths (issue 7): correctness, time, peak memory, against torch.compile.

    PYTHONUNBUFFERED=1 python3 benchmarks/fast_path_check.py [--shapes gemma2,llama3] [--regime zipf|flat]
                                                             [--quick]
    TRITON_INTERPRET=1 python3 benchmarks/fast_path_check.py --dry-run    # CPU: checks the script runs

For each shape (N = 8192 tokens, bf16): a float64 reference (chunked), then every variant below once for
its loss / dE / dC relative errors, do_bench median fwd+bwd ms, the peak memory of one fwd+bwd over what
was allocated before (inputs; the gradients count, as in peers.py), and the forward without grad:

  eager, torch.compile                      baselines (peers.py's expression)
  mm                                        cuBLAS E @ C^T alone (the matmul ceiling: fast path >= 3x, low-memory >= 4x)
  fast                                      the default fast path (plan from the memory budget)
  fast:Nc=<n>,<int4|int8>                   the fast path with an explicit token chunk and remainder
  fast:acc=<tile>                           the fast path with another d_weight accumulate tile
  low_memory                                today's path (fused forward, vocab-chunked backward)
  low_memory:fwd=chunked                    its forward as cuBLAS logits + row kernel
  low_memory:dH=cublas_fp32                 its d_hidden by cuBLAS into an fp32 accumulator (N*D*4 bytes)
  fwd-no-grad: fused | chunked | torch.compile
  acc-kernel vs cuBLAS                      one d_weight pass (K = Nc tokens) alone: Triton hi+lo vs cuBLAS bf16 mm

Every variant is guarded: one failure prints an ERROR row and the run goes on. Writes
$OUT/fast_path_check.json when $OUT is set; prints a short table last. Budget: ~3-4 minutes on one H200.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cce_inductor  # noqa: E402
from cce_inductor import config  # noqa: E402
from cce_inductor.kernels.config import Tile  # noqa: E402
from cce_inductor.reference import reference_loss_and_grads, rel_err  # noqa: E402
from cce_inductor.options import LossOptions  # noqa: E402
from cce_inductor.paths import choose_path, plan_fast  # noqa: E402
from sweep import make_inputs  # noqa: E402  (peers.py's inputs; this script's directory is on sys.path)

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256), "tiny": (96, 32, 700)}
MiB = 1 << 20
ROWS = []
DEV = "cuda"  # --dry-run: "cpu" (tiny shape, one timed call, no memory numbers: checks the script itself)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> int:
    if DEV != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_since(base: int) -> float:
    return (torch.cuda.max_memory_allocated() - base) / MiB if DEV == "cuda" else float("nan")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eager(e, c, t):
    return F.cross_entropy((e @ c.T).float(), t)


def cleanup():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def bench(fn, rep, grad_to_none=None):
    if DEV != "cuda":  # dry run: one call
        t0 = time.perf_counter()
        fn()
        for x in grad_to_none or ():
            x.grad = None
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=max(25, rep // 4), rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median")


def measure(shape, name, fn, e, c, t, ref, rep, nograd_fn=None, patch=None):
    """Errors, fwd+bwd ms, peak MiB and (optionally) no-grad forward ms of loss = fn(e, c, t)."""
    row = {"shape": shape, "variant": name}
    ctx = config.patch(**patch) if patch else _null()
    try:
        with ctx:
            e.grad = c.grad = None
            loss = fn(e, c, t)
            loss.backward()
            sync()
            lref, rdh, rdw = ref
            row.update(loss_err=abs(loss.item() - lref) / abs(lref), dE_err=rel_err(e.grad, rdh),
                       dC_err=rel_err(c.grad, rdw))
            e.grad = c.grad = None
            del loss
            cleanup()
            base = reset_peak()
            fn(e, c, t).backward()
            sync()
            row["peak_MiB"] = peak_since(base)
            e.grad = c.grad = None
            cleanup()
            row["fwdbwd_ms"] = bench(lambda: fn(e, c, t).backward(), rep, grad_to_none=[e, c])
            if nograd_fn is not None:
                x, w = e.detach(), c.detach()
                with torch.no_grad():
                    row["fwd_nograd_ms"] = bench(lambda: nograd_fn(x, w, t), rep)
    except Exception as ex:  # noqa: BLE001
        row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        traceback.print_exc()
    e.grad = c.grad = None
    cleanup()
    log(json.dumps(row))
    ROWS.append(row)
    return row


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def op(path=None):
    return lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path=path)


def nograd_row(shape, name, fn, e, c, t, rep, patch=None):
    row = {"shape": shape, "variant": name}
    try:
        with (config.patch(**patch) if patch else _null()), torch.no_grad():
            x, w = e.detach(), c.detach()
            fn(x, w, t)
            base = reset_peak()
            fn(x, w, t)
            sync()
            row["peak_MiB"] = peak_since(base)
            row["fwd_nograd_ms"] = bench(lambda: fn(x, w, t), rep)
    except Exception as ex:  # noqa: BLE001
        row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        traceback.print_exc()
    cleanup()
    log(json.dumps(row))
    ROWS.append(row)


def accumulate_micro(shape, e, c, rep, nc, tiles):
    """One d_weight pass alone (K = nc tokens): Triton hi + int4/int8 remainder vs cuBLAS bf16 mm."""
    from cce_inductor.kernels.accumulate import accumulate_matmul, new_remainder

    N, D = e.shape
    V = c.shape[0]
    x = e.detach()[:nc]
    nc = x.shape[0]
    g = torch.randn(nc, V, device=DEV, dtype=torch.bfloat16) * 1e-3
    hi = torch.randn(V, D, device=DEV, dtype=torch.bfloat16) * 1e-2
    ms = bench(lambda: torch.mm(g.t(), x), rep)
    row = {"shape": shape, "variant": f"acc-pass Nc={nc} cuBLAS mm", "ms": ms,
           "TFLOPs": 2 * nc * V * D / ms / 1e9}
    log(json.dumps(row))
    ROWS.append(row)
    for rem in ("int4", "int8"):
        lo = new_remainder(V, D, rem, torch.bfloat16, DEV)
        lo.zero_()
        for tile in tiles:
            name = f"acc-pass Nc={nc} triton {rem} {tile.block_m}x{tile.block_n}x{tile.block_k}w{tile.num_warps}s{tile.num_stages}"
            try:
                ms = bench(lambda: accumulate_matmul(g.t(), x, hi, lo, first=False, last=False, lo_mode=rem,
                                                     tile=tile, upcast=DEV != "cuda", dot_precision="tf32"), rep)
                row = {"shape": shape, "variant": name, "ms": ms, "TFLOPs": 2 * nc * V * D / ms / 1e9}
            except Exception as ex:  # noqa: BLE001
                row = {"shape": shape, "variant": name, "error": f"{type(ex).__name__}: {str(ex)[:200]}"}
            log(json.dumps(row))
            ROWS.append(row)
        del lo
    del g, hi
    cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--regime", default="zipf")
    ap.add_argument("--quick", action="store_true", help="fewer variants, shorter benchmarks")
    ap.add_argument("--micro", action="store_true", help="also time one d_weight pass alone (Triton vs cuBLAS)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shape, Triton interpreter: checks that the script runs (no meaningful numbers)")
    a = ap.parse_args()
    global DEV
    if a.dry_run:
        DEV = "cpu"
        a.shapes = "tiny"
        from cce_inductor.op import use_triton_on_cpu

        use_triton_on_cpu().__enter__()  # the Triton kernels under TRITON_INTERPRET=1
    rep = 100 if a.quick else 200
    log(f"torch {torch.__version__} triton {triton.__version__} "
        f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (dry run)'}")
    compiled = torch.compile(eager)
    compiled_nograd = torch.compile(lambda e, c, t: F.cross_entropy((e @ c.T).float(), t))
    for shape in a.shapes.split(","):
        N, D, V = SHAPES[shape]
        e, c, t = make_inputs(N, D, V, a.regime, device=DEV)
        lref, _, rdh, rdw, _ = reference_loss_and_grads(e.detach(), c.detach(), None, t, LossOptions(),
                                                        torch.full((N,), 1.0 / N, device=DEV))
        ref = (lref.mean().item(), rdh, rdw)
        del lref
        cleanup()
        plan = plan_fast(N, D, V, torch.bfloat16)
        log(f"{shape}: choose_path -> {choose_path(N, D, V, torch.bfloat16, DEV, 'mean', False, True)}; plan {plan}")
        x, w = e.detach(), c.detach()
        mm = bench(lambda: x @ w.T, rep)
        ROWS.append({"shape": shape, "variant": "mm (cuBLAS E@C^T)", "fwdbwd_ms": mm})
        log(json.dumps(ROWS[-1]))

        measure(shape, "eager", eager, e, c, t, ref, rep, nograd_fn=eager)
        measure(shape, "torch.compile", compiled, e, c, t, ref, rep, nograd_fn=compiled_nograd)
        measure(shape, "fast (default)", op(), e, c, t, ref, rep)
        # an upstream gradient that is not a power of two (loss / 3): the backward's in-place scaling
        third = (ref[0] / 3, ref[1] / 3, ref[2] / 3)
        measure(shape, "eager, loss/3", lambda e, c, t: eager(e, c, t) / 3, e, c, t, third, rep // 4)
        measure(shape, "fast (default), loss/3", lambda e, c, t: op()(e, c, t) / 3, e, c, t, third, rep // 4)
        variants = [(1024, "int4", "cublas_fold"), (2048, "int4", "cublas_fold"), (2048, "int8", "cublas_fold"),
                    (4096, "int4", "cublas_fold"), (2048, "int4", "triton")]
        if a.quick:
            variants = variants[:2]
        for nc, rem, scheme in variants:
            measure(shape, f"fast:Nc={nc},{rem},{scheme}", op("fast"), e, c, t, ref, rep,
                    patch={"fast_path_tokens_per_chunk": nc, "fast_path_remainder": rem,
                           "fast_path_weight_accumulate": scheme})
        measure(shape, "low_memory (fused fwd)", op("low_memory"), e, c, t, ref, rep,
                patch={"forward_kernel": "fused"})
        measure(shape, "low_memory:dH=cublas_fold", op("low_memory"), e, c, t, ref, rep,
                patch={"forward_kernel": "chunked", "low_memory_dhidden": "cublas_fold"})
        measure(shape, "low_memory:dH=cublas_fp32", op("low_memory"), e, c, t, ref, rep,
                patch={"forward_kernel": "chunked", "low_memory_dhidden": "cublas_fp32"})

        fwd = lambda x, w, t: cce_inductor.linear_cross_entropy(x, w, t)  # noqa: E731
        nograd_row(shape, "fwd-no-grad fused", fwd, e, c, t, rep, patch={"forward_kernel": "fused"})
        nograd_row(shape, "fwd-no-grad chunked (default)", fwd, e, c, t, rep, patch={"forward_kernel": "chunked"})
        nograd_row(shape, "fwd-no-grad torch.compile", compiled_nograd, e, c, t, rep)
        if a.micro:
            tiles = [Tile(128, 256, 64, num_warps=8, num_stages=3)]
            accumulate_micro(shape, e, c, rep // 2, plan.tokens_per_chunk if plan else 1024, tiles)
        del e, c, t, rdh, rdw, ref
        cleanup()

    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "fast_path_check.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
    tc = {r["shape"]: r.get("fwdbwd_ms") for r in ROWS if r.get("variant") == "torch.compile"}
    tcm = {r["shape"]: r.get("peak_MiB") for r in ROWS if r.get("variant") == "torch.compile"}
    tcf = {r["shape"]: r.get("fwd_nograd_ms") for r in ROWS if r.get("variant") == "torch.compile"}
    print(f"\n{'shape':7} {'variant':34} {'fb_ms':>8} {'xTC':>5} {'peakMiB':>8} {'xTCmem':>6} {'nograd':>7} "
          f"{'xTC':>5} {'loss_err':>8} {'dE_err':>8} {'dC_err':>8}")
    for r in ROWS:
        if "error" in r:
            print(f"{r['shape']:7} {r['variant'][:34]:34} ERROR {r['error'][:100]}")
            continue
        if "ms" in r:
            print(f"{r['shape']:7} {r['variant'][:60]:60} {r['ms']:8.3f} ms {r['TFLOPs']:6.0f} TFLOP/s")
            continue
        fb, pk, ng = r.get("fwdbwd_ms"), r.get("peak_MiB"), r.get("fwd_nograd_ms")
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        ratio = lambda v, b: format(v / b, "5.2f") if (v is not None and b) else "    -"  # noqa: E731
        print(f"{r['shape']:7} {r['variant'][:34]:34} {f(fb, '8.2f'):>8} {ratio(fb, tc.get(r['shape']))} "
              f"{f(pk, '8.0f'):>8} {ratio(pk, tcm.get(r['shape'])):>6} {f(ng, '7.2f'):>7} "
              f"{ratio(ng, tcf.get(r['shape']))} {f(r.get('loss_err'), '8.1e'):>8} {f(r.get('dE_err'), '8.1e'):>8} "
              f"{f(r.get('dC_err'), '8.1e'):>8}")


if __name__ == "__main__":
    main()
