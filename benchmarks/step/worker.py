"""One (architecture, variant) in its own process: build, compile ahead, the fixed-phase measurement and
the max-tokens search, each when the parent lends it the GPU. Reports to the parent as JSON lines."""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
import traceback

from harness import PeakMemory, StepTimer, free, wall_s

from .models import ARCHS, COMPILED, TINY, TINY_EXTRA, err, is_oom, probe_of, shape_of


class Events:
    """JSON lines to the parent, one file per worker, flushed at once."""

    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **kw):
        kw.setdefault("t", time.time())
        self.f.write(json.dumps(kw, default=str) + "\n")
        self.f.flush()


class RewriteLog(logging.Handler):
    """Collects the ``cce_inductor`` logger's INFO lines ("cce: rewrote ...", "cce: left ... alone")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001
            pass


class CompileOnly(Exception):
    """Raised by a compiled graph called in compile-only mode, before it touches any tensor."""


class Worker:
    """One (architecture, variant) in this process: build, compile, fixed-phase measurement, search.

    Compiling is done "compile-only": the backend (``"inductor"`` or ``"cce"``, looked up as
    ``torch.compile`` does) is wrapped so that the graph it returns raises :class:`CompileOnly` instead of
    running while ``self.compile_only`` is set. Dynamo has installed the graph by then, so the next real
    call runs it without compiling. This lets every variant compile at once on the CPU at the real batch
    size (Inductor picks 32-bit or 64-bit indexing from the compile-time sizes and guards on that choice)
    without any of them using GPU memory for activations.
    """

    def __init__(self, a):
        import torch

        self.a, self.torch = a, torch
        self.arch, self.variant = a.arch, a.variant
        self.device = torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.param_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "autocast": torch.float32}[a.precision]
        self.rlog = RewriteLog()
        lg = logging.getLogger("cce_inductor")
        lg.addHandler(self.rlog)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        self.model = self.fwd = None
        self.compile_only = False
        self.fixed_fit = False
        self.info, self.compile_info, self.precompile_info = {}, {}, {}

    # ------------------------------------------------------------------------------------ model
    def config(self):
        import transformers

        cfg_name, _, kw, *_ = ARCHS[self.arch]
        kw = dict(kw)
        if self.a.tiny:
            kw.update(TINY, **TINY_EXTRA.get(self.arch, {}))
        if self.a.layers:
            kw["num_hidden_layers"] = self.a.layers
        kw["use_cache"] = False
        return getattr(transformers, cfg_name)(**kw)

    def backend(self, name):
        """``name`` as ``torch.compile(backend=name)`` would run it, with the compile-only switch."""
        torch = self.torch
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(name)
        if name == "inductor":
            try:  # exactly what torch.compile(backend="inductor") builds (private; same compile_fx either way)
                inner = torch._TorchCompileInductorWrapper(None, None, None)
            except Exception:  # noqa: BLE001
                pass

        def backend_fn(gm, example_inputs, **kwargs):
            compiled = inner(gm, example_inputs, **kwargs)

            def run(*args):
                if self.compile_only:
                    raise CompileOnly()
                return compiled(*args)

            return run

        backend_fn.__name__ = f"step_bench_{name}"
        return backend_fn

    def build(self):
        """The model on the device (same seed: same weights in every variant) and the forward+loss function."""
        import transformers

        torch = self.torch
        cfg = self.config()
        cls = getattr(transformers, ARCHS[self.arch][1])
        model, refused = None, None
        impls = (self.a.attn, "eager")
        if self.a.attn == "sdpa" and getattr(cfg, "attn_logit_softcapping", None):
            # Gemma 2: sdpa cannot apply the attention-logit softcap (transformers 5.24 refuses sdpa for it;
            # a version that accepted it would silently drop the softcap): eager, as transformers advises
            impls, refused = ("eager",), "sdpa cannot apply attn_logit_softcapping"
        for impl in dict.fromkeys(impls):
            cfg._attn_implementation = impl
            torch.manual_seed(self.a.seed)
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.param_dtype)
            try:
                with torch.device(self.device):
                    model = cls(cfg)
                break
            except ValueError as ex:  # transformers refuses an attention implementation the model lacks
                refused = err(ex)
            finally:
                torch.set_default_dtype(prev)
        if model is None:
            raise RuntimeError(refused)
        model.train()
        if getattr(model, "loss_type", None) is None:
            model.loss_type = "ForCausalLM"  # keeps lm_head and the loss in one graph (see README)
        if self.a.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.variant in COMPILED:
                # The README's checkpointing recipe, for every compiled variant alike: without it Dynamo runs
                # transformers' checkpointed layers eagerly (an "HOP: Unsafe side effect" break) and the head's
                # graph returns the logits; with it the whole step is one graph.
                torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
                self.info["ckpt_side_effects_flag"] = True
        self.info = dict(attn_impl=model.config._attn_implementation,
                         params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                         layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, hidden=cfg.hidden_size,
                         param_dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                         tied=model.lm_head.weight is model.get_input_embeddings().weight)
        if model.config._attn_implementation != self.a.attn:
            self.info["attn_note"] = f"{self.a.attn} not used: {refused}"
        if self.variant == "liger":
            import liger_kernel.transformers as lk

            getattr(lk, ARCHS[self.arch][5])(model=model)

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss

        fwd = loss_fn
        if self.variant in COMPILED:
            if self.variant == "cce":
                import cce_inductor  # registers backend="cce"

                self.info["cce_inductor"] = os.path.dirname(os.path.abspath(cce_inductor.__file__))
            if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
                torch._functorch.config.force_non_lazy_backward_lowering = True  # compile-only covers backward
            backend = self.backend("cce" if self.variant == "cce" else "inductor")
            if self.a.compile_target == "model":
                cmodel = torch.compile(model, backend=backend)

                def fwd(ids):
                    return cmodel(input_ids=ids, labels=ids).loss
            else:
                fwd = torch.compile(loss_fn, backend=backend)
        self.model, self.fwd = model, fwd

    def forward(self, ids):
        torch = self.torch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.a.precision == "autocast"):
            return self.fwd(ids)

    def make_step(self):
        torch = self.torch
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **({"fused": True} if self.cuda else {}))

        def step(ids):
            if self.a.fake_oom_tokens and ids.numel() > self.a.fake_oom_tokens:  # tests of the search on a CPU
                raise torch.OutOfMemoryError(f"fake: {ids.numel()} tokens > {self.a.fake_oom_tokens}")
            loss = self.forward(ids)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach(), gn.detach()

        return opt, step

    def batch(self, b, s, seed):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        ids = torch.randint(0, self.model.config.vocab_size, (b, s), generator=g, device=self.device)
        if not self.a.static and b >= 2:
            torch._dynamo.maybe_mark_dynamic(ids, 0)  # one graph for every batch size (no error if specialized)
        return ids

    def free(self):
        free(self.device)
        if self.cuda:
            getattr(self.torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()

    def offload(self):
        """Weights to the CPU while other processes use the GPU (the compiled graph stays valid)."""
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)
            if self.cuda:
                self.model.to("cpu")
        self.free()

    def restore(self):
        if self.model is None:
            self.build()
        elif self.cuda:
            self.model.to(self.device)
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def dynamo_stats(self):
        from torch._dynamo.utils import counters

        return dict(graphs=int(counters["stats"].get("unique_graphs", 0)),
                    graph_breaks=int(sum(counters["graph_break"].values())),
                    graph_break_reasons=sorted(counters["graph_break"])[:5])

    def rewrite_stats(self):
        lines = self.rlog.lines
        return dict(rewrites=sum(1 for m in lines if m.startswith("cce: rewrote")),
                    misses=sum(1 for m in lines if m.startswith("cce: left")), rewrite_log=lines[:6])

    def compile_at(self, b, s):
        """Compile (forward and backward) for a ``b x s`` batch without running it; returns seconds."""
        ids = self.batch(b, s, self.a.seed + 99)
        t0 = time.perf_counter()
        self.compile_only = True
        try:
            self.forward(ids)
        except CompileOnly:
            pass
        finally:
            self.compile_only = False
        return round(time.perf_counter() - t0, 2)

    # ------------------------------------------------------------------------------------ phases
    def compile(self, probe=False):
        """Build, compile for the fixed batch (or the search's first one), weights back to the CPU."""
        b, s = shape_of(self.a, self.arch)
        self.build()
        secs = self.compile_at(probe_of(self.a, self.arch) if probe else b, s)
        self.compile_info = dict(compile_s=secs, **self.dynamo_stats())
        if self.variant == "cce":
            self.compile_info.update(self.rewrite_stats())
        self.offload()

    def precompile(self):
        """Compile for the search's first (largest) batch while other variants use the GPU: a larger batch
        can cross Inductor's 32-bit indexing guards, and that recompile should not eat the search's time."""
        _, s = shape_of(self.a, self.arch)
        before = self.dynamo_stats()["graphs"]
        self.restore()
        secs = self.compile_at(probe_of(self.a, self.arch), s)
        self.precompile_info = dict(probe_compile_s=secs, probe_recompiled=self.dynamo_stats()["graphs"] > before)
        self.offload()

    def run_fixed(self, deadline, emit, go):
        """Step time (median of ``--steps`` after ``--warmup``) and peak memory at the fixed size."""
        a = self.a
        b, s = shape_of(a, self.arch)
        r = dict(batch=b, seq=s, tokens=b * s, background_compiles=go.get("background_compiles", 0))
        self.restore()
        r.update(self.info, **self.compile_info)
        graphs_before = self.dynamo_stats()["graphs"]
        opt, step = self.make_step()
        batches = [self.batch(b, s, a.seed + 1 + i) for i in range(2)]
        first_s, (loss, gn) = wall_s(step, batches[0], device=self.device)
        r["first_step_s"] = round(first_s, 2)
        r["loss_first"], r["grad_norm_first"] = loss.item(), gn.item()
        emit(type="progress", phase="fixed", first_step_s=r["first_step_s"], loss_first=r["loss_first"])
        for i in range(max(0, a.warmup - 1)):
            step(batches[(i + 1) % 2])
        timer, per_step = StepTimer(self.device), None
        with PeakMemory(self.device) as mem:  # weights, gradients, optimizer state and activations
            for i in range(a.steps):
                if i and per_step and time.time() + 2 * per_step + 1 > deadline:
                    r["steps_cut_short"] = True
                    break
                loss, gn = timer(step, batches[i % 2])
                if i == 0 or not self.cuda:  # on CUDA only the first: reading an event pair synchronises
                    per_step = timer.last_s()
        ms = timer.ms()
        r.update(step_ms=round(statistics.median(ms), 2), step_ms_all=[round(x, 2) for x in ms],
                 loss_last=loss.item(), status="ok")
        if self.cuda:
            r.update(base_mb=round(mem.base_mib, 1), peak_mb=round(mem.peak_mib, 1),
                     reserved_mb=round(mem.reserved_mib, 1))
        if self.variant in COMPILED:
            r["recompiled"] = self.dynamo_stats()["graphs"] > graphs_before
        self.fixed_fit = True
        del opt, step, batches, loss, gn
        return r

    def run_search(self, deadline, emit, go):
        """Largest sequences/step that fits: first the probe (an upper guess), then doubling while it
        fits, else bisection between the largest fit (the fixed batch, if it fitted) and the least
        failure, down to ``--search-tol``."""
        torch, a = self.torch, self.a
        b_fixed, s = shape_of(a, self.arch)
        self.restore()
        r = dict(seq=s, **self.precompile_info)
        if "fixed" not in a.run_phases:  # search-only run: the compile and the rewrite are reported here
            r.update(self.info, **self.compile_info)
        if self.cuda:
            free_b, total = torch.cuda.mem_get_info(self.device)
            r.update(free_mb_at_start=round(free_b / 2**20), total_mb=round(total / 2**20))
        graphs_before = self.dynamo_stats()["graphs"]
        opt, step = self.make_step()
        lo = b_fixed if self.fixed_fit else 0
        hi, attempts, status, error = None, [], "ok", None
        b = probe_of(a, self.arch)
        while True:
            if attempts and time.time() + 2 * attempts[-1]["s"] + 1 > deadline:
                status = "time limit"
                break
            t0 = time.time()
            ok, peak = False, None
            try:
                ids = self.batch(b, s, a.seed + 100 + b)
                with PeakMemory(self.device) as mem:
                    step(ids)
                ok = True
                peak = None if mem.peak_mib is None else round(mem.peak_mib, 1)
            except Exception as ex:  # noqa: BLE001
                if not is_oom(ex):
                    error = err(ex)
            ids = None
            opt.zero_grad(set_to_none=True)
            self.free()
            att = dict(seqs=b, tokens=b * s, fits=ok, peak_mb=peak, s=round(time.time() - t0, 2))
            attempts.append(att)
            emit(type="attempt", phase="search", **att)
            if error:
                status = "error"
                break
            if ok:
                lo = max(lo, b)
            else:
                hi = b if hi is None else min(hi, b)
            if hi is None:  # everything tried fits: double
                if b >= a.max_seqs:
                    status = "cap"
                    break
                b = min(2 * b, a.max_seqs)
            elif lo == 0:  # nothing fitted yet: halve
                if hi <= 1:
                    break
                b = hi // 2
            else:
                if hi - lo <= max(1, int(lo * a.search_tol)):
                    break
                b = (lo + hi) // 2
        r.update(max_seqs=lo, max_tokens=lo * s, first_fail_seqs=hi, attempts=attempts, status=status,
                 exact=hi is not None and lo > 0 and status == "ok")
        if self.variant in COMPILED:
            r["recompiled"] = self.dynamo_stats()["graphs"] > graphs_before
        if error:
            r["error"] = error
        del opt, step
        return r


def _wait_go(a, phase):
    """Block until the parent lends this process the GPU; returns the go message (None: parent gone)."""
    path = os.path.join(a.ctl, f"{a.arch}__{a.variant}.go.{phase}")
    parent = os.getppid()
    while not os.path.exists(path):
        if os.getppid() != parent or time.time() > a.hard_end:
            return None
        time.sleep(0.2)
    with open(path) as f:
        return json.load(f)


def worker_main(a):
    """The worker process: compile (compiled variants), then each phase when the parent says go."""
    import torch

    emit = Events(os.path.join(a.ctl, f"{a.arch}__{a.variant}.events"))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    w = Worker(a)
    phases = a.run_phases.split(",")

    def failed(ex, where=None):
        return dict(status="OOM" if is_oom(ex) else "error", error=f"{where}: {err(ex)}" if where else err(ex),
                    traceback=traceback.format_exc()[-3000:])

    def fail(ex, where, phases_left):
        r = failed(ex, where)
        for ph in phases_left:
            emit(type="result", phase=ph, **(dict(r, **w.info, **w.compile_info) if ph == "fixed" else r))
        emit(type="exit")

    if a.variant in COMPILED:
        try:
            emit(type="state", state="compiling")
            w.compile(probe="fixed" not in phases)
            emit(type="compiled", **w.compile_info)
            print(f"[step_bench] {a.arch} {a.variant}: compiled in {w.compile_info['compile_s']} s", flush=True)
        except Exception as ex:  # noqa: BLE001
            return fail(ex, "compile", phases)
    for ph in phases:
        if ph == "search" and a.variant in COMPILED and "fixed" in phases:
            try:
                emit(type="state", state="precompiling")
                w.precompile()
            except Exception as ex:  # noqa: BLE001
                return fail(ex, "compile for the search", ["search"])
        emit(type="ready", phase=ph)
        go = _wait_go(a, ph)
        if go is None:
            break
        t0 = time.time()
        if w.cuda and ph == "fixed":  # the parent never touches CUDA (its context would hold GPU memory)
            props = torch.cuda.get_device_properties(w.device)
            emit(type="device", gpu=props.name, gpu_mem_gb=round(props.total_memory / 2**30, 1))
        try:
            r = (w.run_fixed if ph == "fixed" else w.run_search)(go["deadline"], emit, go)
        except Exception as ex:  # noqa: BLE001
            r = failed(ex)
            if ph == "fixed":
                r.update(w.info, **w.compile_info)
        r["wall_s"] = round(time.time() - t0, 1)
        emit(type="result", phase=ph, **r)
        what = (f"step {r['step_ms']} ms, peak {r.get('peak_mb', '-')} MB, loss {r['loss_first']:.4f}"
                if "step_ms" in r else f"max {r['max_tokens']} tokens/step" if "max_tokens" in r
                else r.get("error", ""))
        print(f"[step_bench] {a.arch} {a.variant} {ph}: {r.get('status')} in {r['wall_s']} s, {what}", flush=True)
        try:
            w.offload()
        except Exception:  # noqa: BLE001
            pass
    emit(type="exit")
