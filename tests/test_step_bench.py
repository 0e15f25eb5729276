"""``benchmarks/step_bench.py`` on the CPU at the tiny size (2-layer Llama shape, vocabulary 512, 4 x 32
tokens, fp32). Timings are not asserted.

Quick (the default run): one worker in this process, the eager variant: its fixed-phase measurement, and
the max-tokens search against a simulated out-of-memory limit; the table and the plot from a GPU-shaped
JSON. Slow (``-m slow``, CI's slow step): the command line end to end, worker processes, compiles, the
rewrite, the JSON: every variant reports, losses and gradient norms agree across eager / torch.compile /
backend="cce" (same initial weights, same tokens; fp32 here, so tightly), the cce variant's graph was
rewritten once (from the ``cce_inductor`` logger), and neither compiled variant compiled again in its
measured steps (they were compiled ahead, "compile-only"); the search with the compile for its first
attempt done ahead.
"""
import json
import math
import os
import subprocess
import sys
import time

import pytest

import step_bench  # benchmarks/ is on the tests' path (pyproject.toml: pythonpath)
from step import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "step_bench.py")

pytest.importorskip("transformers")


def _run(tmp_path, *args, timeout=400):
    out = tmp_path / "step_bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(out), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out) as f:
        return json.load(f), p.stdout


def test_worker_fixed_phase_and_search_in_process():
    # the search: a step of more than 600 tokens "runs out of memory"; the probe (8 x the fixed 4 sequences
    # of 32) fails, bisection between 4 (the fixed phase fitted) and 32 must end at 18 sequences (576
    # tokens), 19 failing
    from step.worker import Worker

    a = step_bench.parse_args(["--tiny", "--worker", "--arch", "llama3.2-1b", "--variant", "eager",
                               "--run-phases", "fixed,search", "--fake-oom-tokens", "600"])
    w, events = Worker(a), []
    deadline = time.time() + 120
    f = w.run_fixed(deadline, lambda **kw: events.append(kw), {})
    assert f["status"] == "ok" and f["tokens"] == 4 * 32 and f["layers"] == 2 and f["vocab"] == 512 and f["tied"]
    assert f["step_ms"] > 0 and len(f["step_ms_all"]) == 5 and math.isfinite(f["loss_last"])
    assert f["loss_first"] == pytest.approx(math.log(512), abs=0.5)  # random init: about ln V
    s = w.run_search(deadline, lambda **kw: events.append(kw), {})
    assert s["status"] == "ok" and s["exact"], s
    assert (s["max_seqs"], s["max_tokens"], s["first_fail_seqs"]) == (18, 576, 19), s
    assert s["attempts"][0]["seqs"] == 32 and not s["attempts"][0]["fits"]
    assert [e["type"] for e in events] == ["progress"] + ["attempt"] * len(s["attempts"])


@pytest.mark.slow
def test_tiny_run_all_variants(tmp_path):
    data, stdout = _run(tmp_path, "--archs", "llama", "--variants", "eager,compile,cce,liger")
    by = {r["variant"]: r for r in data["results"]}
    assert set(by) == {"eager", "compile", "cce"}, by.keys()
    assert data["meta"]["skipped"] == {"liger": "needs CUDA"}
    for v, r in by.items():
        f = r["fixed"]
        assert f["status"] == "ok", (v, f)
        assert f["tokens"] == 4 * 32 and f["layers"] == 2 and f["vocab"] == 512 and f["tied"]
        assert math.isfinite(f["loss_first"]) and math.isfinite(f["loss_last"]) and f["step_ms"] > 0
        assert f["loss_first"] == pytest.approx(by["eager"]["fixed"]["loss_first"], rel=1e-4), v
        assert f["grad_norm_first"] == pytest.approx(by["eager"]["fixed"]["grad_norm_first"], rel=1e-3), v
        assert "search" not in r  # no search in --tiny
    for v in ("compile", "cce"):
        f = by[v]["fixed"]
        assert f["graphs"] == 1 and f["graph_breaks"] == 0, f
        assert f["compile_s"] > 0 and f["recompiled"] is False, f  # compiled ahead, not in the measured steps
    cce = by["cce"]["fixed"]
    assert cce["rewrites"] == 1 and cce["misses"] == 0, cce["rewrite_log"]
    assert cce["cce_inductor"] == os.path.join(ROOT, "cce_inductor")  # this checkout's package
    assert "rewrites" not in by["compile"]["fixed"]
    assert (tmp_path / "step_bench.png").stat().st_size > 0
    assert (tmp_path / "step_bench.md").read_text().count("| llama3.2-1b |") == 3
    assert stdout.rstrip().splitlines()[-1].startswith("not run: liger")  # the table is printed last


@pytest.mark.slow
def test_search_with_simulated_oom(tmp_path):
    # a step of more than 600 tokens "runs out of memory": the probe (8 x the fixed 4 sequences of 32) fails,
    # bisection between 4 (the fixed phase fitted) and 32 must end at 18 sequences (576 tokens), 19 failing;
    # the compiled variant compiled for the probe ahead of its search turn and did not compile in it
    data, _ = _run(tmp_path, "--variants", "eager,cce", "--fake-oom-tokens", "600")
    by = {r["variant"]: r for r in data["results"]}
    for v, r in by.items():
        s = r["search"]
        assert s["status"] == "ok" and s["exact"], (v, s)
        assert (s["max_seqs"], s["max_tokens"], s["first_fail_seqs"]) == (18, 576, 19), (v, s)
        assert s["attempts"][0]["seqs"] == 32 and not s["attempts"][0]["fits"], (v, s)
    assert by["cce"]["search"]["recompiled"] is False and "probe_compile_s" in by["cce"]["search"]
    assert by["cce"]["fixed"]["recompiled"] is False


def test_table_and_plot_from_json(tmp_path):
    """--plot-only on a GPU-shaped JSON: every column, an OOM row and a search cut short."""
    fixed = dict(status="ok", batch=8, seq=2048, tokens=16384, step_ms=300.0, peak_mb=40000.0, loss_first=11.9,
                 grad_norm_first=1.5, compile_s=60.0, graphs=1, graph_breaks=0)
    data = dict(meta=dict(date="2026-01-01T00:00:00", device="cuda", gpu="NVIDIA H200", precision="bf16",
                          versions=dict(torch="2.11.0"), step="fwd+bwd+AdamW", compiled="torch.compile(loss_fn)",
                          dynamic_batch=True, elapsed_s=400.0, skipped={"liger": "liger_kernel not importable"}),
                results=[
                    dict(arch="llama3.2-1b", variant="eager", label="eager", fixed=dict(fixed, compile_s=None),
                         search=dict(status="ok", exact=True, max_tokens=32768, max_seqs=16, seq=2048)),
                    dict(arch="llama3.2-1b", variant="compile", label="torch.compile", fixed=fixed,
                         search=dict(status="time limit", exact=False, max_tokens=65536, max_seqs=32, seq=2048)),
                    dict(arch="llama3.2-1b", variant="cce", label='torch.compile(backend="cce")',
                         fixed=dict(fixed, step_ms=330.0, rewrites=1, misses=0),
                         search=dict(status="time limit (killed after 80 s)")),
                    dict(arch="gemma2-2b", variant="eager", label="eager",
                         fixed=dict(status="OOM", error="OutOfMemoryError: CUDA out of memory")),
                ])
    path = tmp_path / "in.json"
    path.write_text(json.dumps(data))
    png = tmp_path / "out.png"
    step_bench.main(["--plot-only", str(path), "--plot", str(png)])
    assert png.stat().st_size > 0
    text = report.table(data)
    assert "| llama3.2-1b | torch.compile(backend=\"cce\") | 8×2048 = 16384 | 330.0 | 1.10 | 39.06 |" in text
    assert "≥ 65536 (32×2048) [time limit]" in text and "| 32768 (16×2048) |" in text
    assert "1 (0 missed)" in text and "OOM: OutOfMemoryError" in text
    assert text.rstrip().endswith("not run: liger (liger_kernel not importable)")
