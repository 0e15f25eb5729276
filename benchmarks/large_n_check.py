"""Quick GPU check of the op at large token counts: fwd+bwd time and peak memory vs torch.compile.

    python benchmarks/large_n_check.py [--tokens 8192,32768,65536]
"""
import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import cce_inductor

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", default="8192,32768,65536")
ap.add_argument("--shapes", default="gemma2,llama3")
a = ap.parse_args()
SHAPES = {"gemma2": (2304, 256000), "llama3": (4096, 128256)}
rows = []
for shape in a.shapes.split(","):
    D, V = SHAPES[shape]
    c = (torch.randn(V, D, device="cuda") / D**0.5).bfloat16().requires_grad_()
    for N in map(int, a.tokens.split(",")):
        e = torch.randn(N, D, device="cuda").bfloat16().requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda")
        fn = lambda: cce_inductor.linear_cross_entropy(e, c, t).backward()  # noqa: E731
        fn()
        e.grad = c.grad = None
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        e.grad = c.grad = None
        ms = do_bench(fn, warmup=10, rep=50, grad_to_none=[e, c], return_mode="median")
        mm = do_bench(lambda: e.detach() @ c.detach().T, warmup=10, rep=50, return_mode="median")
        rows.append((shape, N, ms, mm, peak))
        print(rows[-1], flush=True)
        del e, t
print(f"\n{'shape':7} {'N':>6} {'fwdbwd_ms':>10} {'x_matmul':>8} {'peak_MB':>8}")
for shape, N, ms, mm, peak in rows:
    print(f"{shape:7} {N:6d} {ms:10.1f} {ms / mm:8.2f} {peak:8.0f}")
