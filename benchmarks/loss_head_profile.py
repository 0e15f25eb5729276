"""Where a loss head's fwd+bwd time goes on the GPU: the CUDA kernels of one step, grouped and summed.

For each method (the names of ``sweep.py``: torch.compile, floor, cce.op, cce.op@K=V;...) at one shape and
token count, after a warm-up step, one fwd+bwd runs under ``torch.profiler``; its CUDA kernels are grouped
(cuBLAS/CUTLASS matmuls, the project's Triton kernels by name, Inductor's kernels, copies/fills, other) and
printed with their total GPU time, count and share, next to the step's wall time (CUDA events). It answers
"what is left besides the matmuls", the question the training-speed work keeps asking.

    python benchmarks/loss_head_profile.py --shape llama3.2-1b --tokens 32768 \
        --methods "torch.compile,cce.op,cce.op@fast_path_remainder=fp32"
    python benchmarks/loss_head_profile.py --dry-run     # CPU: checks the script (no CUDA kernels to list)
"""
from __future__ import annotations

import argparse
import collections
import re

import torch

from harness import StepTimer, free, gpu_name, make_inputs, out_path, shape, write_json
from sweep import _config_patch, build_methods

GROUPS = [  # (group, pattern on the kernel name), first match wins
    ("matmul (cuBLAS/CUTLASS)", r"gemm|sm90_xmma|cutlass|nvjet|ampere_.*_tn|sm80_xmma"),
    ("triton: row kernel", r"_rows_kernel"),
    ("triton: fold / accumulate", r"_fold|_accumulate"),
    ("triton: forward / draw", r"_partial_lse|_merge|_draw"),
    ("inductor", r"triton_(poi|red|per)_"),
    ("copy / fill / cast", r"copy|fill|Memset|memcpy|elementwise_kernel|vectorized"),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, flags=re.I):
            return group
    return "other"


def profile_step(fn, e, c, t, device):
    """(wall ms of one step, {group: [gpu ms, count]}, top kernels [(name, ms, count)])."""
    def step():
        fn(e, c, t).backward()
        e.grad = c.grad = None

    step()  # warm-up (compiles, autotunes)
    timer = StepTimer(device)
    timer(step)
    wall = timer.last_s() * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
    groups, kernels = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = ev.device_time / 1e3  # microseconds -> ms
        g = groups[group_of(ev.name)]
        g[0] += ms
        g[1] += 1
        k = kernels[ev.name[:90]]
        k[0] += ms
        k[1] += 1
    top = sorted(((n, v[0], v[1]) for n, v in kernels.items()), key=lambda x: -x[1])[:8]
    return wall, dict(groups), top


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--tokens", default="32768", help="comma list")
    ap.add_argument("--methods", default="torch.compile,floor,cce.op")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    device = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        a.shape, a.tokens = "tiny", "96"
    asked = a.methods.split(",")
    methods, _ = build_methods(device, asked)
    _, D, V = shape(a.shape)
    records = []
    print(f"{gpu_name(device)} | torch {torch.__version__} | {a.shape} (D={D}, V={V})")
    for N in (int(x) for x in a.tokens.split(",")):
        e, c, t = make_inputs(N, D, V, "flat", device=device)
        for m in asked:
            if m not in methods:
                print(f"{m}: not available")
                continue
            with _config_patch(methods[m]):
                wall, groups, top = profile_step(methods[m], e, c, t, device)
            records.append(dict(shape=a.shape, N=N, method=m, wall_ms=wall, groups=groups, top=top))
            total = sum(v[0] for v in groups.values())
            print(f"\nN={N} {m}: step {wall:.2f} ms, GPU kernels {total:.2f} ms")
            for g, (ms, n) in sorted(groups.items(), key=lambda x: -x[1][0]):
                print(f"  {g:28s} {ms:8.2f} ms {n:5d} kernels {100 * ms / max(total, 1e-9):5.1f} %")
            for name, ms, n in top[:5]:
                print(f"    {ms:8.2f} ms x{n:<4d} {name}")
            free(device)
        del e, c, t
        free(device)
    write_json(out_path("loss_head_profile.json"), records)


if __name__ == "__main__":
    main()
