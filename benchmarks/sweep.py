"""Linear + cross-entropy on one GPU, swept over the number of tokens: time, memory and gradient error.

Methods (each skipped when not importable), with the naming of ``shared/bench/peers.py``:
  eager            F.cross_entropy((e @ c.T).float(), t)
  torch.compile    the same under torch.compile (Inductor)
  cce.op           cce_inductor.linear_cross_entropy(e, c, t)
  cce.backend      the eager code under torch.compile(backend="cce")
  apple_cce        cut_cross_entropy.linear_cross_entropy (default gradient filter)
  liger_flce       liger_kernel's LigerFusedLinearCrossEntropyLoss
  floor            the 3 bf16 matmuls any exact method with the logits kept does (E·Cᵀ, G·C, Gᵀ·E), nothing else
  cce.op@K=V;K=V   cce.op under cce_inductor.config.patch(K=V, ...): a variant of the op's knobs, e.g.
                   cce.op@fast_path_remainder=fp32;fast_path_max_tokens_per_chunk=8192 (asked for by name only)

Shapes: gemma2 (D=2304, V=256000) and llama3 (D=4096, V=128256) by default (any of benchmarks/harness/
shapes.py), bf16, N = 8192 ... 65536 tokens. Per cell: fwd+bwd median time (triton.testing.do_bench),
peak memory over the inputs (max_memory_allocated after a reset, minus what was allocated before the call:
logits, workspace and the two gradients), and, at --err-tokens only, the relative error of loss, dE and dC
against the project's float64 reference (cce_inductor.reference, token chunks, on the GPU). An
out-of-memory cell is reported as OOM.

Writes $OUT/sweep.md (tables, GPU, date, versions), $OUT/sweep.json and $OUT/sweep.png (time and memory
vs tokens, one row per shape), and prints a short table last. Sized to finish in under 8 minutes on one
H200 (estimated from the measured peers' times in shared/design/FACTS.md; not yet timed).

--large-n is the quick check of the op alone at large token counts (it was large_n_check.py): cce.op,
flat data, 8192,32768,65536 tokens, no float64 errors, do_bench(warmup=10, rep=50); it prints the op's
time as a multiple of one matmul and writes $OUT/large_n.{md,json,png}. Options given explicitly win.

--mode logp / --mode score are the RL forms (per-token log-probabilities, as a policy-gradient step and a
reference model's scoring use them), methods eager / torch.compile / cce.op / cce.backend / floor / cce.op@...:
  logp   log p = gather(log_softmax((e @ c.T).float()), t) per token (cce.op: cce_inductor.linear_log_probs),
         fwd+bwd of sum(w * log p) with fixed per-token weights w in [0.5, 1.5] (advantages): the upstream
         gradient is per token, so the op takes its low-memory path; errors against float64 of that sum
  score  the same log-probabilities under torch.no_grad(): the forward alone (old-policy / reference scoring);
         peak includes the [N] output; `logp err` = max-norm relative error of the per-token values
Peers are left out of these modes. Output files: sweep_logp.* / sweep_score.*.

--dry-run runs on the CPU (tiny shape, one timed call per cell, no memory numbers): it checks the script.

    python benchmarks/sweep.py [--shapes gemma2,llama3] [--tokens 8192,16384,32768,65536]
                               [--methods eager,cce.op,...] [--regime zipf|flat] [--err-tokens 8192]
    python benchmarks/sweep.py --large-n [--tokens 8192,32768,65536]
    python benchmarks/sweep.py --mode logp|score [--shapes ...] [--tokens ...]
    python benchmarks/sweep.py --dry-run [--mode ...]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from harness import (SHAPES, Reference, eager, eager_copy, float64_reference, fmt, free, gpu_name, make_inputs,
                     markdown_table, matmul_ms, measure_forward, measure_loss_head, now, out_path, per_token_reference,
                     pyplot, ratio, save_figure, shape, versions, write_json, write_text)

DEFAULTS = dict(shapes="gemma2,llama3", tokens="8192,16384,32768,65536", methods=None, regime="zipf",
                err_tokens="8192", warmup=25, rep=100)
LARGE_N = dict(DEFAULTS, tokens="8192,32768,65536", methods="cce.op", regime="flat", err_tokens="", warmup=10, rep=50)
DRY_RUN = dict(shapes="tiny", tokens="64,96")  # over the others; errors at 96 tokens (none with --large-n)
MODE_TEXT = {"loss": "fwd+bwd, mean reduction",
             "logp": "fwd+bwd of sum(w * log p) with per-token weights w (the RL form: per-token gradients)",
             "score": "no-grad forward of the per-token log-probabilities (scoring)"}


def _peer(name):
    if name == "apple_cce":
        from cut_cross_entropy import linear_cross_entropy as apple

        return lambda e, c, t: apple(e, c, t)
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss()
    return lambda e, c, t: liger(c, e, t)


PEERS = {"apple_cce": ("cut_cross_entropy", "cut-cross-entropy"), "liger_flce": ("liger_kernel", "liger-kernel")}


class _ThreeMatmuls(torch.autograd.Function):
    """The floor: the logits matmul in the forward, and the two gradient matmuls with the logits standing in for
    their gradient in the backward (the same shapes and dtypes as an exact method that keeps the logits)."""

    @staticmethod
    def forward(ctx, e, c):
        z = e @ c.T
        ctx.save_for_backward(e, c, z)
        return z[0, 0].float()

    @staticmethod
    def backward(ctx, _):
        e, c, z = ctx.saved_tensors
        return z @ c, z.T @ e


def floor(e, c, t):
    return _ThreeMatmuls.apply(e, c)


def config_variant(name):
    """``cce.op@K=V;K=V``: the op with those knobs of ``cce_inductor.config`` patched (values parsed as Python
    literals where they are one: ints, floats, None; strings otherwise) for the whole measurement, backward
    included (``run_cell`` applies ``fn.config_patch``: the low-memory path reads its backward knobs when
    the backward runs)."""
    import ast

    import cce_inductor

    knobs = {}
    for item in name.split("@", 1)[1].split(";"):
        k, v = item.split("=", 1)
        try:
            knobs[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            knobs[k] = v

    def fn(e, c, t):
        return cce_inductor.linear_cross_entropy(e, c, t)
    fn.config_patch = knobs
    return fn


def build_methods(device, asked=()):
    """The methods importable here (and the ``cce.op@...`` variants in ``asked``); the packages they come from
    (cce_inductor's version, peers' distributions)."""
    methods, found = {"eager": eager, "torch.compile": torch.compile(eager), "floor": floor}, {}
    methods.update({m: config_variant(m) for m in asked if m.startswith("cce.op@")})
    try:
        import cce_inductor

        methods["cce.op"] = lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t)
        methods["cce.backend"] = torch.compile(eager_copy, backend="cce")
        found["cce_inductor"] = getattr(cce_inductor, "__version__", "?")
    except Exception as ex:  # noqa: BLE001
        print("cce_inductor not importable:", ex)
    if device != "cuda":
        print("peers (cut_cross_entropy, liger_kernel) need CUDA: left out")
        return methods, found
    for name, (module, dist) in PEERS.items():
        try:
            methods[name] = _peer(name)
            found[module] = dist  # its version: main
        except Exception as ex:  # noqa: BLE001
            print(f"{module} not importable:", ex)
    return methods, found


def eager_logp(e, c, t):
    """Per-token log-probabilities the way RL code writes them: the gather of log_softmax of float32 logits."""
    return torch.gather(F.log_softmax((e @ c.T).float(), -1), -1, t[:, None]).squeeze(-1)


def eager_logp_copy(e, c, t):
    """:func:`eager_logp` with its own code object (a second compile: another backend)."""
    return torch.gather(F.log_softmax((e @ c.T).float(), -1), -1, t[:, None]).squeeze(-1)


def build_per_token_methods(mode, asked=()):
    """``--mode logp|score``: name -> fn(e, c, t) returning per-token log-probabilities [N] (the floor, in logp
    mode only, returns a scalar whose backward is the 3 matmuls)."""
    import cce_inductor

    def op_variant(name):
        fn = lambda e, c, t: cce_inductor.linear_log_probs(e, c, t)  # noqa: E731
        fn.config_patch = config_variant(name).config_patch
        return fn

    # dynamic=False: with e and t separate inputs of dynamic sizes, gather's index rows are not provably e's rows
    # (gather accepts fewer) and the read is left alone (explain says so); in a model both come from one tensor
    methods = {"eager": eager_logp, "torch.compile": torch.compile(eager_logp, dynamic=False),
               "cce.op": lambda e, c, t: cce_inductor.linear_log_probs(e, c, t),
               "cce.backend": torch.compile(eager_logp_copy, backend="cce", dynamic=False)}
    if mode == "logp":
        methods["floor"] = floor
    methods.update({m: op_variant(m) for m in asked if m.startswith("cce.op@")})
    return methods, {"cce_inductor": getattr(cce_inductor, "__version__", "?")}


def per_token_weights(t):
    """The fixed per-token upstream weights of ``--mode logp`` (advantage-like, positive: no cancellation in
    the checked sum)."""
    g = torch.Generator(device=t.device).manual_seed(7)
    return 0.5 + torch.rand(t.shape, device=t.device, generator=g)


def weighted_reference(e, c, t, w) -> Reference:
    """Float64 ``sum(w * log p)`` and its gradients (log p = -loss per token)."""
    loss, dE, dC = per_token_reference(e, c, t, -w.double())
    return Reference(-(w.double() * loss).sum().item(), dE, dC)


def run_per_token_cell(mode, name, fn, e, c, t, w, ref, warmup, rep, device):
    """One method at one (shape, N) in ``--mode logp`` (fwd+bwd of sum(w * log p)) or ``score`` (no-grad forward
    of log p): errors where ``ref`` is given, peak, median ms."""
    def measure():
        if mode == "logp":
            scalar = fn if name == "floor" else (lambda e, c, t: (fn(e, c, t) * w).sum())
            return measure_loss_head(scalar, e, c, t, ref, warmup=warmup, rep=rep, device=device,
                                     keys=("peak_MB", "ms"))
        out, r = measure_forward(fn, e, c, t, warmup=warmup, rep=rep, device=device)
        if ref is not None:
            want = -ref
            r["logp_err"] = ((out.double() - want).abs().max() / want.abs().max()).item()
        return r
    return _guarded(fn, measure, device)


def _config_patch(fn):
    """The ``cce_inductor.config.patch`` a ``cce.op@...`` variant asks for (a no-op context for the others)."""
    import contextlib

    knobs = getattr(fn, "config_patch", None)
    if not knobs:
        return contextlib.nullcontext()
    import cce_inductor

    return cce_inductor.config.patch(**knobs)


def _guarded(fn, measure, device) -> dict:
    """``measure()`` under ``fn``'s config patch; an out-of-memory or any other failure becomes the cell's
    ``error`` (the sweep goes on); the device's cache is freed after."""
    try:
        with _config_patch(fn):
            r = measure()
    except torch.OutOfMemoryError:
        r = dict(error="OOM")
    except Exception as ex:  # noqa: BLE001
        r = dict(error=f"{type(ex).__name__}: {str(ex).splitlines()[0][:160] if str(ex) else ''}")
    free(device)
    return r


def run_cell(fn, e, c, t, ref, warmup, rep, device):
    """One method at one (shape, N): errors (when ``ref``), peak memory, median fwd+bwd ms."""
    return _guarded(fn, lambda: measure_loss_head(fn, e, c, t, ref, warmup=warmup, rep=rep, device=device,
                                                  keys=("peak_MB", "ms")), device)


def _cell(rows, shape_name, N, method):
    return next((x for x in rows if x["shape"] == shape_name and x["N"] == N and x["method"] == method), None)


def write_markdown(path, rows, header):
    versions_line = " | ".join(f"{k} {v}" for k, v in header["versions"].items())
    lines = [f"# Linear + cross-entropy sweep ({header['date']})", "",
             f"GPU: {header['gpu']} | torch {header['torch']} | triton {header['triton']} | {versions_line}",
             f"bf16 inputs, {MODE_TEXT[header.get('mode', 'loss')]}; regime `{header['regime']}`; "
             f"do_bench(warmup={header['warmup']}, rep={header['rep']}, median). Peak = max_memory_allocated "
             "during one call minus memory allocated before it (includes the gradients / the output). Errors are "
             "relative to a float64 reference (only at the listed token counts). `mm` = one E·Cᵀ bf16 matmul.",
             ""]
    score = header.get("mode") == "score"
    for name in dict.fromkeys(r["shape"] for r in rows):
        _, D, V = SHAPES[name]
        body = []
        for r in (r for r in rows if r["shape"] == name):
            if "error" in r:
                body.append([r["N"], r["method"], r["error"]] + [""] * (4 if score else 6))
                continue
            tc = (_cell(rows, name, r["N"], "torch.compile") or {}).get("ms")
            errs = ([fmt(r.get("logp_err"), ".1e")] if score else
                    [fmt(r.get("loss_err"), ".1e"), fmt(r.get("dE_err"), ".1e"), fmt(r.get("dC_err"), ".1e")])
            body.append([r["N"], r["method"], f"{r['ms']:.2f}", ratio(r["ms"], tc), ratio(r["ms"], r["mm_ms"]),
                         fmt(r["peak_MB"], ".0f")] + errs)
        lines += [f"## {name} (D={D}, V={V})", ""]
        err_cols = ["logp err"] if score else ["loss err", "dE err", "dC err"]
        lines += markdown_table(["N", "method", "fwd ms" if score else "fwd+bwd ms", "× torch.compile", "× mm",
                                 "peak MB"] + err_cols, body, align="rlrrrr" + "r" * len(err_cols))
        lines.append("")
    write_text(path, "\n".join(lines))


def plot(path, rows, header):
    plt = pyplot()
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for i, name in enumerate(shapes):
        for m in methods:
            pts = [r for r in rows if r["shape"] == name and r["method"] == m and "ms" in r]
            if not pts:
                continue
            ns = [r["N"] for r in pts]
            (line,) = axes[i, 0].plot(ns, [r["ms"] for r in pts], "o-", label=m)
            mem = [(n, r["peak_MB"] / 1024) for n, r in zip(ns, pts) if r["peak_MB"] is not None]
            if mem:
                axes[i, 1].plot(*zip(*mem), "o-", label=m, color=line.get_color())
            for r in rows:  # an OOM cell: a cross at the method's largest measured memory, labelled
                if r["shape"] == name and r["method"] == m and r.get("error") == "OOM" and mem:
                    y = max(gb for _, gb in mem)
                    axes[i, 1].plot([r["N"]], [y], "x", color=line.get_color(), ms=9)
                    axes[i, 1].annotate(f"{m}: OOM", (r["N"], y), fontsize=7, color=line.get_color(),
                                        xytext=(-40, 6), textcoords="offset points")
        _, D, V = SHAPES[name]
        for j, (ylabel, what) in enumerate((("fwd+bwd ms (median)", "time"), ("peak GB over inputs", "memory"))):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} (D={D}, V={V}): {what}")
            ax.grid(True, which="both", alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.suptitle(f"{header['gpu']}, bf16, torch {header['torch']}, triton {header['triton']}, {header['date']}",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def print_summary(rows, methods, header):
    """fwd+bwd ms / peak GB per method and N, and the errors where they were computed."""
    Ns = list(dict.fromkeys(r["N"] for r in rows))
    print(f"\n{header['gpu']} | torch {header['torch']} | triton {header['triton']} | {header['elapsed_s']} s")
    for name in dict.fromkeys(r["shape"] for r in rows):
        what = "fwd ms" if header.get("mode") == "score" else "fwd+bwd ms"
        print(f"\n{name}: {what} / peak GB" + "".join(f"{'N=' + str(n):>16s}" for n in Ns) + "   errors")
        for m in methods:
            cells, errs = [], ""
            for n in Ns:
                r = _cell(rows, name, n, m)
                if r is None or "error" in r:
                    cells.append(f"{(r or {}).get('error', '-')[:15]:>16s}")
                    continue
                gb = None if r["peak_MB"] is None else r["peak_MB"] / 1024
                cells.append(f"{r['ms']:8.1f} /{fmt(gb, '5.1f', '-')}")
                if "dE_err" in r:
                    errs = f"  dE {r['dE_err']:7.1e} dC {r['dC_err']:7.1e}"
                elif "logp_err" in r:
                    errs = f"  logp {r['logp_err']:7.1e}"
            print(f"  {m:24s}" + "".join(cells) + errs)


def print_large_n(rows):
    """The op's time as a multiple of one matmul, and its peak, per shape and N (large_n_check's table)."""
    print(f"\n{'shape':7} {'N':>6} {'fwdbwd_ms':>10} {'x_matmul':>8} {'peak_MB':>8}")
    for r in rows:
        head = f"{r['shape']:7} {r['N']:6d}"
        print(f"{head} {r['error']}" if "error" in r else
              f"{head} {r['ms']:10.1f} {ratio(r['ms'], r['mm_ms'], '8.2f')} {fmt(r['peak_MB'], '8.0f', '-')}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} (default {DEFAULTS['shapes']})")
    ap.add_argument("--tokens", help=f"comma list (default {DEFAULTS['tokens']}; --large-n {LARGE_N['tokens']})")
    ap.add_argument("--methods", help="comma list (default: all importable; --large-n cce.op)")
    ap.add_argument("--regime", choices=["zipf", "flat"], help="input data (default zipf; --large-n flat)")
    ap.add_argument("--err-tokens", help="token counts at which errors vs float64 are computed (default 8192)")
    ap.add_argument("--warmup", type=int, help="do_bench warm-up ms (default 25; --large-n 10)")
    ap.add_argument("--rep", type=int, help="do_bench ms (default 100; --large-n 50)")
    ap.add_argument("--large-n", action="store_true", help="the op alone at large token counts (was large_n_check.py)")
    ap.add_argument("--mode", choices=list(MODE_TEXT), default="loss",
                    help="loss (default): the mean loss, fwd+bwd; logp / score: per-token log-probabilities with "
                         "per-token gradients / under no_grad (RL)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape: checks that the script runs")
    a = ap.parse_args(argv)
    if a.large_n and a.mode != "loss":
        ap.error("--large-n measures the loss (--mode loss)")
    defaults = dict(LARGE_N if a.large_n else DEFAULTS)
    if a.dry_run:
        defaults.update(DRY_RUN, err_tokens=defaults["err_tokens"] and "96")
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.device = "cpu" if a.dry_run else "cuda"
    a.stem = "large_n" if a.large_n else "sweep" if a.mode == "loss" else f"sweep_{a.mode}"
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sweep.py needs a CUDA GPU (--dry-run runs on the CPU)")
    import triton

    t_start = time.time()
    asked = a.methods.split(",") if a.methods else []
    if a.mode == "loss":
        methods, found = build_methods(a.device, asked)
    else:
        methods, found = build_per_token_methods(a.mode, asked)
    if asked:
        methods = {k: methods[k] for k in asked if k in methods}
    run = versions(tuple(d for _, d in PEERS.values()))
    pkg = {k: (v if k == "cce_inductor" else run.get(v, "?")) for k, v in found.items()}
    header = dict(gpu=gpu_name(a.device), date=now(date_only=True), torch=torch.__version__,
                  triton=triton.__version__, versions=pkg, regime=a.regime, mode=a.mode, warmup=a.warmup, rep=a.rep,
                  git=run["git"], cce_inductor_sources=run["cce_inductor_sources"])
    print(json.dumps(header), flush=True)
    err_tokens = {int(x) for x in a.err_tokens.split(",") if x}

    rows = []
    for name in a.shapes.split(","):
        _, D, V = shape(name)
        for N in (int(x) for x in a.tokens.split(",")):
            try:
                e, c, t = make_inputs(N, D, V, a.regime, device=a.device)
                mm = matmul_ms(e, c, warmup=a.warmup, rep=a.rep, device=a.device)
                w = per_token_weights(t) if a.mode == "logp" else None
                ref = None
                if N in err_tokens:
                    ref = (float64_reference(e, c, t) if a.mode == "loss" else weighted_reference(e, c, t, w)
                           if a.mode == "logp" else per_token_reference(e, c, t)[0])
            except torch.OutOfMemoryError:
                for m in methods:
                    rows.append(dict(shape=name, N=N, D=D, V=V, method=m, error="OOM (inputs/reference)"))
                free(a.device)
                continue
            for m, fn in methods.items():
                r = dict(shape=name, N=N, D=D, V=V, method=m, mm_ms=mm)
                cell_ref = None if m == "floor" else ref
                r.update(run_cell(fn, e, c, t, cell_ref, a.warmup, a.rep, a.device) if a.mode == "loss" else
                         run_per_token_cell(a.mode, m, fn, e, c, t, w, cell_ref, a.warmup, a.rep, a.device))
                print(json.dumps(r), flush=True)
                rows.append(r)
            del e, c, t, w, ref
            free(a.device)
            header["elapsed_s"] = round(time.time() - t_start)
            # after every token count: a cut-short run still leaves its results
            write_json(out_path(f"{a.stem}.json"), dict(header=header, rows=rows))
            write_markdown(out_path(f"{a.stem}.md"), rows, header)
    plot(out_path(f"{a.stem}.png"), rows, header)
    header["elapsed_s"] = round(time.time() - t_start)
    if a.large_n:
        print_large_n(rows)
    else:
        print_summary(rows, methods, header)
    print(f"\nwrote {out_path(a.stem + '.md')}, {out_path(a.stem + '.png')}, {out_path(a.stem + '.json')}")


if __name__ == "__main__":
    main()
