"""Linear + cross-entropy on one GPU, swept over the number of tokens: time, memory and gradient error.

Methods (each skipped when not importable), with the naming of ``shared/bench/peers.py``:
  eager            F.cross_entropy((e @ c.T).float(), t)
  torch.compile    the same under torch.compile (Inductor)
  cce.op           cce_inductor.linear_cross_entropy(e, c, t)
  cce.backend      the eager code under torch.compile(backend="cce")
  apple_cce        cut_cross_entropy.linear_cross_entropy (default gradient filter)
  liger_flce       liger_kernel's LigerFusedLinearCrossEntropyLoss

Shapes: gemma2 (D=2304, V=256000) and llama3 (D=4096, V=128256), bf16, N = 8192 ... 65536 tokens.
Per cell: fwd+bwd median time (triton.testing.do_bench), peak memory over the inputs
(max_memory_allocated after a reset, minus what was allocated before the call: logits, workspace and
the two gradients), and, at --err-tokens only, the relative error of loss, dE and dC against the
project's float64 reference (cce_inductor.reference, token chunks, on the GPU). An
out-of-memory cell is reported as OOM.

Writes $OUT/sweep.md (tables, GPU, date, versions) and $OUT/sweep.png (time and memory vs tokens, one
row per shape), and prints a short table last. Sized to finish in under 8 minutes on one H200
(estimated from the measured peers' times in shared/design/FACTS.md; not yet timed).

    python benchmarks/sweep.py [--shapes gemma2,llama3] [--tokens 8192,16384,32768,65536]
                               [--methods eager,cce.op,...] [--regime zipf|flat] [--err-tokens 8192]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time

import torch
import torch.nn.functional as F

SHAPES = {"gemma2": (2304, 256000), "llama3": (4096, 128256)}  # name: (D hidden, V vocab)


def eager(e, c, t):
    return F.cross_entropy((e @ c.T).float(), t)


def eager_for_cce(e, c, t):  # the same code, its own code object: Dynamo caches per code object
    return F.cross_entropy((e @ c.T).float(), t)


def build_methods():
    methods, versions = {"eager": eager, "torch.compile": torch.compile(eager)}, {}
    try:
        import cce_inductor

        methods["cce.op"] = lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t)
        methods["cce.backend"] = torch.compile(eager_for_cce, backend="cce")
        versions["cce_inductor"] = getattr(cce_inductor, "__version__", "?")
    except Exception as ex:  # noqa: BLE001
        print("cce_inductor not importable:", ex)
    try:
        from cut_cross_entropy import linear_cross_entropy as apple

        methods["apple_cce"] = lambda e, c, t: apple(e, c, t)
        versions["cut_cross_entropy"] = _dist_version("cut-cross-entropy")
    except Exception as ex:  # noqa: BLE001
        print("cut_cross_entropy not importable:", ex)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger_flce"] = lambda e, c, t: liger(c, e, t)
        versions["liger_kernel"] = _dist_version("liger-kernel")
    except Exception as ex:  # noqa: BLE001
        print("liger_kernel not importable:", ex)
    return methods, versions


def _dist_version(name):
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def make_inputs(N, D, V, regime, seed=1, device="cuda"):
    """bf16 e [N, D], c [V, D] and targets [N]. ``flat``: random logits of unit scale, uniform targets.
    ``zipf``: trained-like: a Zipf prior over a shuffled vocabulary carried by one hidden dimension plus
    a random context term, targets sampled from the model's own softmax (so the loss is realistic)."""
    g = torch.Generator(device=device).manual_seed(seed)
    e = torch.randn(N, D, device=device, generator=g)
    if regime == "flat":
        c = torch.randn(V, D, device=device, generator=g) / D**0.5
        t = torch.randint(0, V, (N,), device=device, generator=g)
        return e.bfloat16().requires_grad_(), c.bfloat16().requires_grad_(), t
    rank = torch.randperm(V, device=device, generator=g).float()
    prior = -1.1 * torch.log(rank + 2.7)
    c = torch.randn(V, D, device=device, generator=g) * (3.0 / D**0.5)
    c[:, 0] = prior - torch.logsumexp(prior, 0)
    e[:, 0] = 1.0
    e, c = e.bfloat16(), c.bfloat16()
    t = torch.empty(N, dtype=torch.long, device=device)
    with torch.no_grad():
        for s in range(0, N, 2048):
            p = torch.softmax((e[s:s + 2048] @ c.T).float(), -1)
            t[s:s + 2048] = torch.multinomial(p, 1, generator=g).squeeze(1)
            del p
    return e.requires_grad_(), c.requires_grad_(), t


@torch.no_grad()
def reference(e, c, t):
    """Float64 loss, dE, dC of mean cross-entropy: the project's chunked float64 reference."""
    from cce_inductor.reference import reference_loss_and_grads
    from cce_inductor.options import LossOptions

    N = e.shape[0]
    grad_loss = torch.full((N,), 1.0 / N, dtype=torch.float64, device=e.device)
    loss, _, dE, dC, _ = reference_loss_and_grads(e.detach(), c.detach(), None, t, LossOptions(), grad_loss=grad_loss)
    return loss.mean().item(), dE, dC


def rel(a, b):
    from cce_inductor.reference import rel_err

    return rel_err(a, b)


@torch.no_grad()
def matmul_ms(e, c, warmup, rep):
    """One E @ C.T in bf16: the unit the fwd+bwd times are compared with (fwd+bwd needs 3-4 of them)."""
    from triton.testing import do_bench

    return do_bench(lambda: e @ c.T, warmup=warmup, rep=rep, return_mode="median")


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def run_cell(fn, e, c, t, ref, warmup, rep):
    """One method at one (shape, N): errors (when ``ref``), peak memory, median fwd+bwd ms."""
    from triton.testing import do_bench

    r = {}
    try:
        e.grad = c.grad = None
        loss = fn(e, c, t)  # first call compiles where there is something to compile
        loss.backward()
        torch.cuda.synchronize()
        if ref is not None:
            lref, ge, gc_ = ref
            r.update(loss_err=abs(loss.item() - lref) / abs(lref), dE_err=rel(e.grad, ge), dC_err=rel(c.grad, gc_))
        del loss
        e.grad = c.grad = None
        _free()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(e, c, t).backward()
        torch.cuda.synchronize()
        r["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        e.grad = c.grad = None
        r["ms"] = do_bench(lambda: fn(e, c, t).backward(), warmup=warmup, rep=rep, grad_to_none=[e, c],
                           return_mode="median")
    except torch.OutOfMemoryError:
        r["error"] = "OOM"
    except Exception as ex:  # noqa: BLE001
        r["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160] if str(ex) else ''}"
    e.grad = c.grad = None
    _free()
    return r


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def write_markdown(path, rows, header):
    lines = [f"# Linear + cross-entropy sweep ({header['date']})", "",
             f"GPU: {header['gpu']} | torch {header['torch']} | triton {header['triton']} | "
             + " | ".join(f"{k} {v}" for k, v in header["versions"].items()),
             f"bf16 inputs, fwd+bwd, mean reduction; regime `{header['regime']}`; "
             f"do_bench(warmup={header['warmup']}, rep={header['rep']}, median). Peak = max_memory_allocated "
             "during one fwd+bwd minus memory allocated before it (includes the two gradients). Errors are "
             "relative to a float64 reference (only at the listed token counts). `mm` = one E·Cᵀ bf16 matmul.",
             ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        D, V = SHAPES[shape]
        lines += [f"## {shape} (D={D}, V={V})", "",
                  "| N | method | fwd+bwd ms | × torch.compile | × mm | peak MB | loss err | dE err | dC err |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["shape"] == shape):
            if "error" in r:
                lines.append(f"| {r['N']} | {r['method']} | {r['error']} | | | | | | |")
                continue
            tc = next((x.get("ms") for x in rows if x["shape"] == shape and x["N"] == r["N"]
                       and x["method"] == "torch.compile"), None)
            lines.append(f"| {r['N']} | {r['method']} | {r['ms']:.2f} | {_fmt(tc and r['ms'] / tc, '.2f')} | "
                         f"{r['ms'] / r['mm_ms']:.2f} | {r['peak_MB']:.0f} | {_fmt(r.get('loss_err'), '.1e')} | "
                         f"{_fmt(r.get('dE_err'), '.1e')} | {_fmt(r.get('dC_err'), '.1e')} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path, rows, header):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for m in methods:
            pts = [r for r in rows if r["shape"] == shape and r["method"] == m and "ms" in r]
            if not pts:
                continue
            ns = [r["N"] for r in pts]
            (line,) = axes[i, 0].plot(ns, [r["ms"] for r in pts], "o-", label=m)
            axes[i, 1].plot(ns, [r["peak_MB"] / 1024 for r in pts], "o-", label=m, color=line.get_color())
            for r in rows:  # an OOM cell: a cross at the method's largest measured memory, labelled
                if r["shape"] == shape and r["method"] == m and r.get("error") == "OOM":
                    y = max(p["peak_MB"] for p in pts) / 1024
                    axes[i, 1].plot([r["N"]], [y], "x", color=line.get_color(), ms=9)
                    axes[i, 1].annotate(f"{m}: OOM", (r["N"], y), fontsize=7, color=line.get_color(),
                                        xytext=(-40, 6), textcoords="offset points")
        D, V = SHAPES[shape]
        for j, (ylabel, what) in enumerate((("fwd+bwd ms (median)", "time"), ("peak GB over inputs", "memory"))):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape} (D={D}, V={V}): {what}")
            ax.grid(True, which="both", alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.suptitle(f"{header['gpu']}, bf16, torch {header['torch']}, triton {header['triton']}, {header['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(out, rows, header):
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1)
    write_markdown(os.path.join(out, "sweep.md"), rows, header)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--tokens", default="8192,16384,32768,65536")
    ap.add_argument("--methods", default=None, help="comma list (default: all importable)")
    ap.add_argument("--regime", default="zipf", choices=["zipf", "flat"])
    ap.add_argument("--err-tokens", default="8192", help="token counts at which errors vs float64 are computed")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep.py needs a CUDA GPU")
    import triton

    t_start = time.time()
    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    methods, versions = build_methods()
    if a.methods:
        methods = {k: v for k, v in methods.items() if k in a.methods.split(",")}
    err_tokens = {int(x) for x in a.err_tokens.split(",") if x}
    header = dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                  triton=triton.__version__, versions=versions, regime=a.regime, warmup=a.warmup, rep=a.rep)
    print(json.dumps(header), flush=True)

    rows = []
    for shape in a.shapes.split(","):
        D, V = SHAPES[shape]
        for N in (int(x) for x in a.tokens.split(",")):
            try:
                e, c, t = make_inputs(N, D, V, a.regime)
                mm = matmul_ms(e, c, a.warmup, a.rep)
                ref = reference(e, c, t) if N in err_tokens else None
            except torch.OutOfMemoryError:
                for name in methods:
                    rows.append(dict(shape=shape, N=N, D=D, V=V, method=name, error="OOM (inputs/reference)"))
                _free()
                continue
            for name, fn in methods.items():
                r = dict(shape=shape, N=N, D=D, V=V, method=name, mm_ms=mm)
                r.update(run_cell(fn, e, c, t, ref, a.warmup, a.rep))
                print(json.dumps(r), flush=True)
                rows.append(r)
            del e, c, t, ref
            _free()
            header["elapsed_s"] = round(time.time() - t_start)
            save(out, rows, header)  # after every token count: a cut-short run still leaves its results
    plot(os.path.join(out, "sweep.png"), rows, header)

    # short table: fwd+bwd ms / peak GB per method and N
    Ns = list(dict.fromkeys(r["N"] for r in rows))
    print(f"\n{header['gpu']} | torch {header['torch']} | triton {header['triton']} | {header['elapsed_s']} s")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        print(f"\n{shape}: fwd+bwd ms / peak GB" + "".join(f"{'N=' + str(n):>16s}" for n in Ns) + "   dE err  dC err")
        for m in methods:
            cells, errs = [], ""
            for n in Ns:
                r = next((r for r in rows if r["shape"] == shape and r["N"] == n and r["method"] == m), None)
                if r is None or "error" in r:
                    cells.append(f"{(r or {}).get('error', '-')[:15]:>16s}")
                else:
                    cells.append(f"{r['ms']:8.1f} /{r['peak_MB'] / 1024:5.1f}")
                    if "dE_err" in r:
                        errs = f"  {r['dE_err']:7.1e} {r['dC_err']:7.1e}"
            print(f"  {m:24s}" + "".join(cells) + errs)
    print(f"\nwrote {out}/sweep.md, {out}/sweep.png, {out}/sweep.json")


if __name__ == "__main__":
    main()
