"""One training step of real Hugging Face architectures: eager, torch.compile, backend="cce" and Liger.

Per architecture (llama3.2-1b, qwen2.5-0.5b, gemma2-2b: HF configs with the released models' shapes,
random init, full depth unless --layers) and variant (eager; compile = torch.compile(loss_fn); cce =
torch.compile(loss_fn, backend="cce"); liger = Liger's kernels applied, eager; loss_fn = lambda ids:
model(input_ids=ids, labels=ids).loss), one step = forward, backward, clip_grad_norm_(1.0), AdamW:
  phase "fixed": median step time (CUDA events), peak memory, loss and gradient norm of step 1, compile
    time, what the rewrite did, at a fixed tokens/step;
  phase "search": the largest tokens/step that fits (probe, doubling, bisection; OOM caught).
Each (architecture, variant) runs in its own process (step/worker.py); the parent (step/orchestrate.py)
lets the compiled variants compile at once, "compile-only", then lends the GPU to one process at a time
under --budget-s; step/report.py makes the table and the plot. The method: benchmarks/STEP_BENCH.md.

    python benchmarks/step_bench.py                          # GPU, all architectures, 480 s budget
    python benchmarks/step_bench.py --archs llama --layers 4 --budget-s 200
    python benchmarks/step_bench.py --tiny                   # CPU smoke run (Llama shape), < 2 minutes
    python benchmarks/step_bench.py --plot-only out/step_bench.json --plot step_bench.png
"""
from __future__ import annotations

import argparse
import os

from harness import write_text
from step.models import ARCHS, VARIANTS, err


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=None,
                    help=f"comma list of {', '.join(ARCHS)} (or llama, qwen, gemma2); default all "
                         "(--tiny: llama only)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the real depth)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens/step of the fixed phase (default: 8 sequences of --seq)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; gemma2 1024; tiny 32)")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32", "autocast"],
                    help="bf16 weights (GPU default), fp32 (CPU default), or fp32 weights + bf16 autocast")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (eager where transformers refuses it)")
    ap.add_argument("--compile-target", default="loss", choices=["loss", "model"],
                    help="loss: torch.compile(lambda ids: model(ids, labels=ids).loss); model: torch.compile(model)")
    ap.add_argument("--static", action="store_true",
                    help="do not mark the batch dimension dynamic (the search then compiles once per size)")
    ap.add_argument("--grad-ckpt", action="store_true", help="HF gradient checkpointing (use_reentrant=False)")
    ap.add_argument("--warmup", type=int, default=2, help="steps at the fixed size before timing")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    ap.add_argument("--reserve-s", type=float, default=10.0, help="kept at the end for the JSON, table and plot")
    ap.add_argument("--compile-limit-s", type=float, default=None,
                    help="a compile still running this many seconds into the run is killed; also the limit of "
                         "each search compile (default 45%% of the budget)")
    ap.add_argument("--turn-limit-s", type=float, default=120.0, help="time limit of one fixed-phase measurement")
    ap.add_argument("--overlap", action="store_true",
                    help="measure while other variants still compile (faster; timing and memory less clean)")
    ap.add_argument("--phases", default="fixed,search",
                    help="fixed (step time and memory at a fixed size), search (max tokens/step), or both; "
                         "search needs CUDA. Two runs (one each) can be merged by --plot-only a.json,b.json")
    ap.add_argument("--search-probe", type=int, default=8,
                    help="the search's first attempt: this many times the fixed sequences/step (compiled ahead)")
    ap.add_argument("--max-seqs", type=int, default=512, help="the search stops at this many sequences")
    ap.add_argument("--search-tol", type=float, default=0.0625,
                    help="bisection stops when first-fail - last-fit <= max(1, tol * last-fit) sequences")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run: 2 layers, hidden 64, vocab 512, 4x32 tokens, no search")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/step_bench.json, else ./step_bench.json)")
    ap.add_argument("--plot", default=None, help="PNG path (default: the JSON's path with .png; '' for none)")
    ap.add_argument("--plot-only", default=None, metavar="JSON[,JSON]",
                    help="re-plot and print the table from a JSON (or several, merged)")
    # internal: worker processes, and a CPU test hook for the search
    for flag in ("--arch", "--variant", "--ctl"):
        ap.add_argument(flag, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-phases", default="fixed", help=argparse.SUPPRESS)
    ap.add_argument("--hard-end", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fake-oom-tokens", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.archs is None:
        a.archs = "llama3.2-1b" if a.tiny else ",".join(ARCHS)
    if a.device is None and not a.plot_only:
        if a.tiny:
            a.device = "cpu"
        else:
            import torch

            a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.precision is None:
        a.precision = "bf16" if a.device == "cuda" else "fp32"
    if a.compile_limit_s is None:
        a.compile_limit_s = (0.45 if "," in a.phases else 0.6) * a.budget_s
    if a.out is None:
        a.out = os.path.join(os.environ.get("OUT", "."), "step_bench.json")
    if a.plot is None:
        a.plot = os.path.splitext((a.plot_only or a.out).split(",")[0])[0] + ("_merged" if "," in (a.plot_only or "")
                                                                             else "") + ".png"
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        from step.worker import worker_main

        return worker_main(a)
    from step import report

    if a.plot_only:
        data = report.load(a.plot_only)
    else:
        from step.orchestrate import run_all

        if a.device == "cpu" and not a.tiny:
            print("[step_bench] no CUDA: full-size models on the CPU are very slow; try --tiny", flush=True)
        data = run_all(a)
    text = report.table(data)
    if a.plot:
        try:
            if report.plot(data, a.plot):
                print(f"wrote {a.plot}")
        except Exception as ex:  # noqa: BLE001
            print(f"no plot: {err(ex)}")
    if not a.plot_only:
        md = os.path.splitext(a.out)[0] + ".md"
        write_text(md, text)
        print(f"wrote {a.out}, {md}")
    print()
    print(text)
    return data


if __name__ == "__main__":
    main()
