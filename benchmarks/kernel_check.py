"""GPU check of the Triton kernels: correctness at model shapes, times, peak memory, optional tile sweep.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_check.py [--sweep] [--no-compile] [--shapes gemma2,llama3]

Times are triton.testing.do_bench medians (ms). Memory is torch.cuda.max_memory_allocated() during one
forward+backward minus what was allocated before it (inputs), in MiB. Prints a short table last and
writes everything to $OUT/kernel_check.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cce_inductor.kernels import Tile, pick_config, triton_backward, triton_forward  # noqa: E402
from cce_inductor.kernels.config import chunk_budget  # noqa: E402
from cce_inductor.reference import reference_loss_and_grads, rel_err  # noqa: E402
from cce_inductor.options import LossOptions  # noqa: E402

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}
MiB = 1 << 20
OPTS = LossOptions()


def bench(fn, ms=300, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=max(25, ms // 4), rep=ms, grad_to_none=grad_to_none,
                                   return_mode="median")


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / MiB


def inputs(N, D, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, device="cuda", generator=g) * (2.0 / D ** 0.5)).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    return h, w, t


def ours_fwd_bwd(h, w, t, cfg=None):
    N = h.shape[0]
    loss, lse = triton_forward(h, w, None, t, OPTS, config=cfg)
    grad = torch.full((N,), 1.0 / N, device=h.device)
    dh, dw, _ = triton_backward(grad, None, h, w, None, t, lse, OPTS, config=cfg)
    return loss.mean(), dh, dw


def accuracy(h, w, t):
    N = h.shape[0]
    ref_loss, _, rdh, rdw, _ = reference_loss_and_grads(h, w, None, t, OPTS, torch.full((N,), 1.0 / N,
                                                                                     device="cuda"))
    ref = ref_loss.mean().item()
    e, c = h.clone().requires_grad_(), w.clone().requires_grad_()
    el = F.cross_entropy((e @ c.T).float(), t)
    el.backward()
    res = {"eager_loss": abs(el.item() - ref) / abs(ref), "eager_dE": rel_err(e.grad, rdh),
           "eager_dC": rel_err(c.grad, rdw)}
    del e, c, el
    ol, odh, odw = ours_fwd_bwd(h, w, t)
    res.update({"ours_loss": abs(ol.item() - ref) / abs(ref), "ours_dE": rel_err(odh, rdh),
                "ours_dC": rel_err(odw, rdw)})
    return res


def backward_breakdown(h, w, t, cfg):
    """Per-kernel GPU time of one backward (torch.profiler), grouped: draw / dW gemm / dhidden / other."""
    N = h.shape[0]
    _, lse = triton_forward(h, w, None, t, OPTS, config=cfg)
    grad = torch.full((N,), 1.0 / N, device="cuda")
    triton_backward(grad, None, h, w, None, t, lse, OPTS, config=cfg)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        triton_backward(grad, None, h, w, None, t, lse, OPTS, config=cfg)
        torch.cuda.synchronize()
    groups = {"draw": 0.0, "dW_gemm": 0.0, "dhidden": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        name = ev.key
        key = ("draw" if "_draw_kernel" in name else "dhidden" if "_dhidden_kernel" in name
               else "dW_gemm" if any(s in name.lower() for s in ("gemm", "cutlass", "sm90", "nvjet", "xmma"))
               else "other")
        groups[key] += us / 1000.0
    return groups


def sweep(h, w, t, base):
    """Times forward for several forward tiles and backward for several draw / dhidden tiles and chunks."""
    N, D = h.shape
    V = w.shape[0]
    res = {}
    fwd = {"fwd base": base, "fwd splits=8": base.with_(splits=8)}
    for name, cfg in fwd.items():
        try:
            res[name] = bench(lambda: triton_forward(h, w, None, t, OPTS, config=cfg), ms=300)
        except Exception as exc:  # out of resources etc.
            res[name] = f"error: {type(exc).__name__}: {str(exc)[:100]}"
    _, lse = triton_forward(h, w, None, t, OPTS, config=base)
    grad = torch.full((N,), 1.0 / N, device="cuda")

    def bwd(cfg):
        return lambda: triton_backward(grad, None, h, w, None, t, lse, OPTS, config=cfg)

    float_lo = base.with_(dhidden_remainder="float", chunk_bytes=chunk_budget(N, D, V, 2, 2))
    variants = {
        "bwd base": base,
        "bwd remainder=float (2-byte lo, smaller chunks)": float_lo,
        "bwd draw N-fastest": base.with_(draw_vocab_fastest=False),
        "bwd dhidden d-fastest": base.with_(dhidden_d_fastest=True),
        "bwd base again": base,
    }
    for name, cfg in variants.items():
        try:
            res[name] = bench(bwd(cfg), ms=400)
        except Exception as exc:
            res[name] = f"error: {type(exc).__name__}: {str(exc)[:100]}"
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--shapes", default="gemma2,llama3")
    args = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    report = {}
    for name in args.shapes.split(","):
        N, D, V = SHAPES[name]
        h, w, t = inputs(N, D, V)
        cfg = pick_config(N, D, V, h.dtype, h.device)
        r = {"config": repr(cfg)}
        t0 = time.time()
        ours_fwd_bwd(h, w, t)  # compile
        torch.cuda.synchronize()
        r["first_call_s"] = time.time() - t0
        if not args.no_accuracy:
            r.update(accuracy(h, w, t))
            print(name, "accuracy", {k: f"{v:.3e}" for k, v in r.items() if k.endswith(("loss", "dE", "dC"))})
        torch.cuda.empty_cache()
        grads_mib = (h.numel() + w.numel()) * h.element_size() / MiB
        r["grads_MiB"] = grads_mib
        r["ours_peak_MiB"] = peak_mib(lambda: ours_fwd_bwd(h, w, t))
        r["matmul_ms"] = bench(lambda: h @ w.T, ms=200)
        r["ours_fwd_ms"] = bench(lambda: triton_forward(h, w, None, t, OPTS), ms=300)
        _, lse = triton_forward(h, w, None, t, OPTS)
        grad = torch.full((N,), 1.0 / N, device="cuda")
        r["ours_bwd_ms"] = bench(lambda: triton_backward(grad, None, h, w, None, t, lse, OPTS), ms=500)
        r["ours_fwdbwd_ms"] = bench(lambda: ours_fwd_bwd(h, w, t), ms=600)
        r["ours_fwdbwd_ms_again"] = bench(lambda: ours_fwd_bwd(h, w, t), ms=600)
        r["bwd_breakdown_ms"] = backward_breakdown(h, w, t, cfg)
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "config"})
        e, c = h.clone().requires_grad_(), w.clone().requires_grad_()

        def eager():
            loss = F.cross_entropy((e @ c.T).float(), t)
            loss.backward()
            return loss

        r["eager_fwdbwd_ms"] = bench(eager, ms=500, grad_to_none=[e, c])
        e.grad = c.grad = None
        r["eager_peak_MiB"] = peak_mib(eager)
        e.grad = c.grad = None
        if not args.no_compile:
            comp = torch.compile(lambda a, b, y: F.cross_entropy((a @ b.T).float(), y))

            def compiled():
                loss = comp(e, c, t)
                loss.backward()
                return loss

            t0 = time.time()
            compiled()
            r["compile_s"] = time.time() - t0
            e.grad = c.grad = None
            r["compile_fwdbwd_ms"] = bench(compiled, ms=500, grad_to_none=[e, c])
            e.grad = c.grad = None
            r["compile_peak_MiB"] = peak_mib(compiled)
            with torch.no_grad():
                r["compile_fwd_ms"] = bench(lambda: comp(h, w, t), ms=300)
        del e, c
        torch.cuda.empty_cache()
        if args.sweep:
            r["sweep"] = sweep(h, w, t, cfg)
            for k, v in r["sweep"].items():
                print(f"  sweep {name} {k}: {v if isinstance(v, str) else round(v, 3)}")
        report[name] = r
        del h, w, t
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernel_check.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
    print("\n| shape | matmul | ours fwd | ours bwd | ours f+b (again) | eager f+b | compile f+b | ours/compile "
          "| peak ours / grads MiB | dE err ours/eager | dC err ours/eager |")
    for name, r in report.items():
        comp = r.get("compile_fwdbwd_ms")
        ratio = f"{r['ours_fwdbwd_ms'] / comp:.2f}x" if comp else "-"
        print(f"| {name} | {r['matmul_ms']:.2f} | {r['ours_fwd_ms']:.2f} | {r['ours_bwd_ms']:.2f} | "
              f"{r['ours_fwdbwd_ms']:.2f} ({r['ours_fwdbwd_ms_again']:.2f}) | {r['eager_fwdbwd_ms']:.2f} | "
              f"{comp if comp is None else round(comp, 2)} | {ratio} | {r['ours_peak_MiB']:.0f} / "
              f"{r['grads_MiB']:.0f} ({r['ours_peak_MiB'] / r['grads_MiB']:.3f}x) | "
              f"{r.get('ours_dE', float('nan')):.2e}/{r.get('eager_dE', float('nan')):.2e} | "
              f"{r.get('ours_dC', float('nan')):.2e}/{r.get('eager_dC', float('nan')):.2e} |")


if __name__ == "__main__":
    main()
