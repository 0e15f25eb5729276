"""The parent process: one worker per (architecture, variant), the GPU lent to one at a time, every
compile and turn under a deadline, the JSON rewritten as results arrive. It never touches CUDA."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from harness import now, versions, write_json
from harness.output import ROOT

from .models import ALIASES, ARCHS, COMPILED, LABELS, VARIANTS

SCRIPT = os.path.join(ROOT, "benchmarks", "step_bench.py")  # the workers are this script with --worker


def _worker_argv(a, arch, variant, phases, hard_end):
    argv = [sys.executable, SCRIPT, "--worker", "--arch", arch, "--variant", variant,
            "--ctl", a.ctl, "--hard-end", f"{hard_end:.3f}", "--device", a.device, "--precision", a.precision,
            "--attn", a.attn, "--seed", str(a.seed), "--warmup", str(a.warmup), "--steps", str(a.steps),
            "--compile-target", a.compile_target, "--max-seqs", str(a.max_seqs), "--search-tol", str(a.search_tol),
            "--search-probe", str(a.search_probe)]
    for flag, val in (("--layers", a.layers), ("--tokens", a.tokens), ("--seq", a.seq),
                      ("--fake-oom-tokens", a.fake_oom_tokens)):
        if val:
            argv += [flag, str(val)]
    argv += ["--run-phases", ",".join(phases)]
    for flag, val in (("--tiny", a.tiny), ("--static", a.static), ("--grad-ckpt", a.grad_ckpt)):
        if val:
            argv.append(flag)
    return argv


class Child:
    def __init__(self, arch, variant):
        self.arch, self.variant = arch, variant
        self.name = f"{arch}__{variant}"
        self.proc = None
        # starting, compiling, ready:fixed, run:fixed, precompiling, ready:search, run:search, exiting, done
        self.state = "starting"
        self.since = None  # when the current state began
        self.pos = 0
        self.attempts = []
        self.turn = None  # (phase, deadline, started)
        self.compile_info = {}

    def set(self, state):
        self.state, self.since = state, time.time()


class Orchestrator:
    """Spawns one worker per (architecture, variant), lends them the GPU one at a time, enforces limits."""

    GRACE_S = 15.0
    BUSY = ("starting", "compiling", "precompiling")  # CPU work; compiled workers hold weights on the GPU

    def __init__(self, a, archs, variants, phases, t_start, save):
        self.a, self.t_start, self.save, self.phases = a, t_start, save, phases
        self.hard_end = t_start + a.budget_s - a.reserve_s
        self.records, self.device_info, self.dirty = {}, {}, True
        self.children = [Child(arch, v) for arch in archs for v in variants]
        # fixed phase: compiled variants first (their search compiles then overlap the others' turns),
        # architecture-major; search: cce and torch.compile first
        key = {v: i for i, v in enumerate(("compile", "cce", "eager", "liger"))}
        self.fixed_order = sorted(self.children, key=lambda c: (c.variant not in COMPILED, archs.index(c.arch),
                                                                key[c.variant]))
        key = {v: i for i, v in enumerate(("cce", "compile", "eager", "liger"))}
        self.search_order = sorted(self.children, key=lambda c: (c.variant not in COMPILED, archs.index(c.arch),
                                                                 key[c.variant]))

    def rec(self, c):
        return self.records.setdefault((c.arch, c.variant),
                                       dict(arch=c.arch, variant=c.variant, label=LABELS[c.variant]))

    def spawn_all(self):
        n_compile = sum(c.variant in COMPILED for c in self.children) or 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # this checkout's cce_inductor in the workers, not another installed copy
        env["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, env.get("PYTHONPATH")) if x)
        # the compiles run side by side: split the CPU's cores between their Triton compile workers
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // n_compile)))
        for c in sorted(self.children, key=lambda c: c.variant not in COMPILED):
            c.proc = subprocess.Popen(_worker_argv(self.a, c.arch, c.variant, self.phases, self.hard_end),
                                      start_new_session=True, env=env)
            c.set("starting")

    def read(self, c):
        path = os.path.join(self.a.ctl, c.name + ".events")
        if not os.path.exists(path):
            return
        with open(path) as f:
            f.seek(c.pos)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                c.pos = f.tell()
                self.handle(c, json.loads(line))

    def handle(self, c, ev):
        self.dirty = True
        kind = ev["type"]
        if kind == "state":
            c.set(ev["state"])
        elif kind == "compiled":
            c.compile_info = {k: v for k, v in ev.items() if k not in ("type", "t")}
        elif kind == "ready":
            c.set("ready:" + ev["phase"])
        elif kind == "attempt":
            c.attempts.append({k: ev[k] for k in ("seqs", "tokens", "fits", "peak_mb", "s")})
        elif kind == "device":
            self.device_info = {k: v for k, v in ev.items() if k not in ("type", "t")}
        elif kind == "result":
            self.rec(c)[ev["phase"]] = {k: v for k, v in ev.items() if k not in ("type", "phase", "t")}
            c.turn = None
        elif kind == "exit":
            c.set("exiting")

    def kill(self, c, why):
        """Kill a worker (its whole process group: Inductor's compile workers too) and record why."""
        if c.proc and c.proc.poll() is None:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            c.proc.wait()
        self.read(c)
        self.close(c, why)

    def close(self, c, why):
        """Record ``why`` for every phase this worker did not report."""
        r = self.rec(c)
        for ph in self.phases:
            if ph in r:
                continue
            x = dict(status=why, **({} if ph == "search" else c.compile_info))
            if ph == "search" and c.attempts and c.turn and c.turn[0] == "search":
                fits = [t["seqs"] for t in c.attempts if t["fits"]]
                fails = [t["seqs"] for t in c.attempts if not t["fits"]]
                seq = c.attempts[0]["tokens"] // c.attempts[0]["seqs"]
                lo = max(fits + ([r["fixed"]["batch"]] if r.get("fixed", {}).get("status") == "ok" else []), default=0)
                x.update(seq=seq, max_seqs=lo, max_tokens=lo * seq, first_fail_seqs=min(fails, default=None),
                         exact=False, attempts=c.attempts)
            r[ph] = x
            why = "not run" if why.startswith("time limit") else why
        c.set("done")
        c.turn = None
        self.dirty = True

    def grant(self, c, phase):
        t = time.time()
        left = self.hard_end - t
        if phase == "fixed":
            limit = min(self.a.turn_limit_s, left)
        else:  # an equal share of what is left for the searches not yet done, at least 30 s
            pending = [x for x in self.children if x.state != "done" and "search" not in self.rec(x)]
            limit = min(left, max(left / max(1, len(pending)), 30.0))
        background = sum(x.state in self.BUSY for x in self.children)
        path = os.path.join(self.a.ctl, f"{c.name}.go.{phase}")
        with open(path + ".tmp", "w") as f:
            json.dump(dict(deadline=t + limit, background_compiles=background), f)
        os.replace(path + ".tmp", path)
        c.set("run:" + phase)
        c.turn = (phase, t + limit, t)
        print(f"[step_bench] {c.arch} {c.variant} {phase}: GPU turn, limit {limit:.0f} s, elapsed "
              f"{t - self.t_start:.0f} s{f', {background} compiling meanwhile' if background else ''}", flush=True)

    def next_turn(self):
        alive = [c for c in self.children if c.state != "done"]
        if any(c.state.startswith("run:") for c in alive):
            return None
        # no GPU turn while a first compile runs (unless --overlap): clean timing, and the compiling
        # processes hold their weights on the GPU
        if any(c.state in ("starting", "compiling") and c.variant in COMPILED for c in alive) and not self.a.overlap:
            return None
        c = next((c for c in self.fixed_order if c.state == "ready:fixed"), None)
        if c is not None:
            return c, "fixed"
        if any(c.state in ("starting", "compiling", "ready:fixed") for c in alive):
            return None
        # searches: after every fixed turn, and never beside a compile (its weights would sit on the GPU)
        if any(c.state in self.BUSY for c in alive):
            return None
        c = next((c for c in self.search_order if c.state == "ready:search"), None)
        return (c, "search") if c is not None else None

    def run(self):
        self.spawn_all()
        while True:
            t = time.time()
            for c in self.children:
                if c.state == "done":
                    continue
                self.read(c)
                if c.proc.poll() is not None:  # exited: said so (phases it did not reach: budget) or crashed
                    self.read(c)
                    self.close(c, "not run (budget)" if c.state == "exiting" else f"crashed (exit {c.proc.returncode})")
                    continue
                if t > self.hard_end:
                    self.kill(c, "time limit (budget)" if c.turn else "not run (budget)")
                elif c.state in ("starting", "compiling") and c.variant in COMPILED \
                        and t > self.t_start + self.a.compile_limit_s:
                    self.kill(c, f"time limit while compiling (killed {t - self.t_start:.0f} s into the run)")
                elif c.state == "precompiling" and t > c.since + self.a.compile_limit_s:
                    self.kill(c, f"time limit while compiling for the search (killed after {t - c.since:.0f} s)")
                elif c.turn and t > c.turn[1] + self.GRACE_S:
                    self.kill(c, f"time limit (killed after {t - c.turn[2]:.0f} s)")
            if all(c.state == "done" for c in self.children):
                break
            nxt = self.next_turn()
            if nxt is not None:
                self.grant(*nxt)
            if self.dirty:
                self.save()
                self.dirty = False
            time.sleep(0.25)
        self.save()


def plan(a):
    """Architectures, variants (and those left out, with why) and phases of this run, checked."""
    archs = [ALIASES.get(x, x) for x in a.archs.split(",") if x]
    for x in archs:
        if x not in ARCHS:
            raise SystemExit(f"unknown architecture {x!r}; known: {', '.join(ARCHS)} (or {', '.join(ALIASES)})")
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    skipped = {}
    if "liger" in variants:
        import importlib.util

        if a.device != "cuda":
            skipped["liger"] = "needs CUDA"
        elif importlib.util.find_spec("liger_kernel") is None:
            skipped["liger"] = "liger_kernel not importable"
    variants = [v for v in variants if v not in skipped]
    phases = [p for p in a.phases.split(",") if p]
    for p in phases:
        if p not in ("fixed", "search"):
            raise SystemExit(f"unknown phase {p!r}; known: fixed, search")
    if "search" in phases and not (a.device == "cuda" and not a.tiny or a.fake_oom_tokens):
        phases.remove("search")  # no out-of-memory to find on a CPU
    if not phases:
        raise SystemExit("nothing to run: --phases search needs CUDA")
    return archs, variants, skipped, phases


def run_all(a):
    """The whole run: workers, turns, the JSON at ``a.out`` (rewritten as results arrive); returns its data."""
    t_start = time.time()
    archs, variants, skipped, phases = plan(a)
    cce_dir = os.path.join(ROOT, "cce_inductor")  # what the workers import (PYTHONPATH, spawn_all)
    meta = dict(date=now(), argv=sys.argv[1:],
                versions=versions(("transformers", "triton", "liger-kernel", "accelerate"),
                                  cce_dir=cce_dir if os.path.isdir(cce_dir) else None),
                device=a.device, phases=phases, precision=a.precision, compile_target=a.compile_target,
                dynamic_batch=not a.static, grad_ckpt=a.grad_ckpt, budget_s=a.budget_s, skipped=skipped,
                step="forward(labels=input_ids) + backward + clip_grad_norm_(1.0) + AdamW.step"
                     + (" (fused)" if a.device == "cuda" else ""),
                compiled="torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss)"
                if a.compile_target == "loss" else "torch.compile(model)")
    a.ctl = tempfile.mkdtemp(prefix="step_bench_")
    orch = None

    def save():
        data = dict(meta=dict(meta, elapsed_s=round(time.time() - t_start, 1), **orch.device_info),
                    results=sorted(orch.records.values(), key=lambda r: (archs.index(r["arch"]),
                                                                        VARIANTS.index(r["variant"]))))
        write_json(a.out, data)
        return data

    orch = Orchestrator(a, archs, variants, phases, t_start, save)

    def on_term(signum, frame):  # e.g. an outer `timeout`: kill the workers, keep what was measured
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        orch.run()
    except (SystemExit, KeyboardInterrupt) as ex:
        meta["interrupted"] = str(ex) or type(ex).__name__
    finally:
        for c in orch.children:
            if c.proc and c.proc.poll() is None:
                orch.kill(c, "not run (interrupted)")
        shutil.rmtree(a.ctl, ignore_errors=True)
    return save()
