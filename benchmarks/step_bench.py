"""One training step of real Hugging Face architectures: eager, torch.compile, backend="cce" and Liger.

Measured per architecture x variant:
  phase "fixed" (first, for every architecture): at a fixed tokens/step, the median step time (CUDA
    events, after warm-up), the peak memory (torch.cuda.max_memory_allocated over the timed steps after a
    reset: weights, gradients, optimizer state and activations together), the loss and gradient norm of
    the first step (same initial weights and tokens in every variant: equal within bf16 noise), the
    compile time and what the cce rewrite did;
  phase "search" (then): the largest tokens/step that fits, at the same sequence length: a first
    attempt at --search-probe (8) times the fixed sequences, then doubling while it fits, else bisection
    between the largest fit and the least failure; one training step per attempt, out-of-memory caught.

One training step = forward with ``labels=input_ids`` (the model computes its own shifted loss inside
``forward``: that is what the rewrite must find), ``loss.backward()``, ``clip_grad_norm_(1.0)``,
``AdamW.step()`` (fused on CUDA), ``zero_grad(set_to_none=True)``.

Variants:
  eager     the model as built
  compile   torch.compile(loss_fn)                  (Inductor, default mode)
  cce       torch.compile(loss_fn, backend="cce")  after ``import cce_inductor``
  liger     liger_kernel.transformers.apply_liger_kernel_to_<model>(model=model), run eagerly as Liger
            documents it (its default kernels: RoPE, RMSNorm, SwiGLU/GeGLU, fused linear cross-entropy);
            left out when liger_kernel is not importable or there is no GPU
where ``loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss``: the forward half of the step is
compiled (backward runs the compiled backward graph; the optimizer runs eagerly). ``--compile-target
model`` compiles the model instead (what HF Trainer does; the graph then also returns the logits).

Architectures (random init from configs, no downloads; the released models' shapes, full depth unless
``--layers``): llama3.2-1b, qwen2.5-0.5b, gemma2-2b. bf16 weights and AdamW state by default
(``--precision autocast``: fp32 weights under bf16 autocast). Attention "sdpa"; Gemma 2 gets "eager"
because transformers refuses sdpa for it (attention-logit softcapping).

How the time budget is kept (compiling full-depth models is the slow part, and it is CPU work):
every (architecture, variant) is its own process. The compiled variants all compile at once,
"compile-only": the graph for the fixed batch is compiled (forward and backward) but not run, so the
compiles use CPUs and no GPU memory beyond the weights. The batch dimension is marked dynamic, so the
same graph serves later batch sizes unless one crosses Inductor's 32-bit indexing guards; that is why
each compiled variant also compiles, once its fixed turn is over and while the others measure, for the
search's first (largest) attempt. The GPU is lent to one process at a time: every fixed-phase
measurement (compiled variants first), then the searches (cce and torch.compile first). Processes
waiting for a turn keep their weights on the CPU. Each compile and each turn has a deadline; a
process past it is killed and what it reported is kept. The JSON is rewritten as results arrive, so a
run cut short still leaves its numbers.

    python benchmarks/step_bench.py                          # GPU, all architectures, 480 s budget
    python benchmarks/step_bench.py --archs llama --layers 4 --budget-s 200
    python benchmarks/step_bench.py --tiny                   # CPU smoke run (Llama shape), < 2 minutes
    python benchmarks/step_bench.py --plot-only out/step_bench.json --plot step_bench.png
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(ROOT, "cce_inductor")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's cce_inductor, not another installed copy

VARIANTS = ("eager", "compile", "cce", "liger")
COMPILED = ("compile", "cce")
LABELS = {"eager": "eager", "compile": "torch.compile", "cce": 'torch.compile(backend="cce")',
          "liger": "Liger (eager)"}

# name: (config class, model class, config kwargs, default seq len, default sequences per step, liger fn)
ARCHS = {
    "llama3.2-1b": ("LlamaConfig", "LlamaForCausalLM",
                    dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, head_dim=64),
                    2048, 8, "apply_liger_kernel_to_llama"),
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                          max_position_embeddings=32768),
                     2048, 8, "apply_liger_kernel_to_qwen2"),
    "gemma2-2b": ("Gemma2Config", "Gemma2ForCausalLM",
                  dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, intermediate_size=9216, vocab_size=256000, tie_word_embeddings=True,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
                       sliding_window=4096, max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh"),
                  1024, 8, "apply_liger_kernel_to_gemma2"),
}
ALIASES = {"llama": "llama3.2-1b", "qwen": "qwen2.5-0.5b", "qwen2": "qwen2.5-0.5b", "gemma": "gemma2-2b",
           "gemma2": "gemma2-2b"}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, max_position_embeddings=256)
TINY_EXTRA = {"gemma2-2b": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
              "llama3.2-1b": dict(head_dim=16)}
TINY_SEQ, TINY_BATCH = 32, 4


def _err(ex):
    text = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {text[0][:300] if text else ''}"


def _is_oom(ex):
    import torch

    text = str(ex)
    return isinstance(ex, torch.OutOfMemoryError) or (isinstance(ex, RuntimeError) and (
        "out of memory" in text or "ALLOC_FAILED" in text))  # e.g. CUBLAS_STATUS_ALLOC_FAILED


def shape_of(a, arch):
    """(sequences per step, sequence length) of the fixed phase; the search uses the same length."""
    _, _, _, seq, nseq, _ = ARCHS[arch]
    if a.tiny:
        seq, nseq = TINY_SEQ, TINY_BATCH
    s = a.seq or seq
    return max(1, (a.tokens // s) if a.tokens else nseq), s


def probe_of(a, arch):
    """Sequences of the search's first attempt: an upper bound, compiled ahead (see Worker.precompile)."""
    b, _ = shape_of(a, arch)
    return max(2, min(a.max_seqs, a.search_probe * b))


# ============================================================================================ worker


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
                refused = _err(ex)
            finally:
                torch.set_default_dtype(prev)
        if model is None:
            raise RuntimeError(refused)
        model.train()
        if getattr(model, "loss_type", None) is None:
            model.loss_type = "ForCausalLM"  # keeps lm_head and the loss in one graph (see README)
        if self.a.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
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
        torch, a = self.torch, self.a
        b, s = shape_of(a, self.arch)
        r = dict(batch=b, seq=s, tokens=b * s, background_compiles=go.get("background_compiles", 0))
        self.restore()
        r.update(self.info, **self.compile_info)
        graphs_before = self.dynamo_stats()["graphs"]
        opt, step = self.make_step()
        batches = [self.batch(b, s, a.seed + 1 + i) for i in range(2)]
        self.sync()
        t0 = time.perf_counter()
        loss, gn = step(batches[0])
        self.sync()
        r["first_step_s"] = round(time.perf_counter() - t0, 2)
        r["loss_first"], r["grad_norm_first"] = loss.item(), gn.item()
        emit(type="progress", phase="fixed", first_step_s=r["first_step_s"], loss_first=r["loss_first"])
        for i in range(max(0, a.warmup - 1)):
            step(batches[(i + 1) % 2])
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            r["base_mb"] = round(torch.cuda.memory_allocated(self.device) / 2**20, 1)
        times, per_step = [], None
        for i in range(a.steps):
            if i and per_step and time.time() + 2 * per_step + 1 > deadline:
                r["steps_cut_short"] = True
                break
            ids = batches[i % 2]
            if self.cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                loss, gn = step(ids)
                e1.record()
                times.append((e0, e1))
                if i == 0:
                    self.sync()
                    per_step = e0.elapsed_time(e1) / 1e3
            else:
                t0 = time.perf_counter()
                loss, gn = step(ids)
                times.append(time.perf_counter() - t0)
                per_step = times[-1]
        self.sync()
        ms = [e0.elapsed_time(e1) for e0, e1 in times] if self.cuda else [t * 1e3 for t in times]
        r.update(step_ms=round(statistics.median(ms), 2), step_ms_all=[round(x, 2) for x in ms],
                 loss_last=loss.item(), status="ok")
        if self.cuda:
            r["peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            r["reserved_mb"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
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
            free, total = torch.cuda.mem_get_info(self.device)
            r.update(free_mb_at_start=round(free / 2**20), total_mb=round(total / 2**20))
        graphs_before = self.dynamo_stats()["graphs"]
        opt, step = self.make_step()
        lo = b_fixed if self.fixed_fit else 0
        hi, attempts, status, err = None, [], "ok", None
        b = probe_of(a, self.arch)
        while True:
            if attempts and time.time() + 2 * attempts[-1]["s"] + 1 > deadline:
                status = "time limit"
                break
            t0 = time.time()
            ok, peak = False, None
            try:
                ids = self.batch(b, s, a.seed + 100 + b)
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
                step(ids)
                self.sync()
                ok = True
                if self.cuda:
                    peak = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            except Exception as ex:  # noqa: BLE001
                if not _is_oom(ex):
                    err = _err(ex)
            ids = None
            opt.zero_grad(set_to_none=True)
            self.free()
            att = dict(seqs=b, tokens=b * s, fits=ok, peak_mb=peak, s=round(time.time() - t0, 2))
            attempts.append(att)
            emit(type="attempt", phase="search", **att)
            if err:
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
        if err:
            r["error"] = err
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
    import torch

    emit = Events(os.path.join(a.ctl, f"{a.arch}__{a.variant}.events"))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    w = Worker(a)
    phases = a.run_phases.split(",")

    def fail(ex, where, phases_left):
        r = dict(status="OOM" if _is_oom(ex) else "error", error=f"{where}: {_err(ex)}",
                 traceback=traceback.format_exc()[-3000:])
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
            r = dict(status="OOM" if _is_oom(ex) else "error", error=_err(ex), traceback=traceback.format_exc()[-3000:])
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


# ============================================================================================ parent


def _versions():
    import torch

    out = dict(torch=torch.__version__, python=sys.version.split()[0])
    from importlib.metadata import version

    for name in ("transformers", "triton", "liger-kernel", "accelerate"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001
            pass
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    try:  # the git metadata of a copied tree can be stale: also record what the sources themselves hash to
        from cce_inductor.backend import pass_uuid

        out["cce_inductor_sources"] = pass_uuid()[:16]
    except Exception:  # noqa: BLE001
        pass
    return out


def _worker_argv(a, arch, variant, phases, hard_end):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--arch", arch, "--variant", variant,
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
        now = time.time()
        left = self.hard_end - now
        if phase == "fixed":
            limit = min(self.a.turn_limit_s, left)
        else:  # an equal share of what is left for the searches not yet done, at least 30 s
            pending = [x for x in self.children if x.state != "done" and "search" not in self.rec(x)]
            limit = min(left, max(left / max(1, len(pending)), 30.0))
        background = sum(x.state in self.BUSY for x in self.children)
        path = os.path.join(self.a.ctl, f"{c.name}.go.{phase}")
        with open(path + ".tmp", "w") as f:
            json.dump(dict(deadline=now + limit, background_compiles=background), f)
        os.replace(path + ".tmp", path)
        c.set("run:" + phase)
        c.turn = (phase, now + limit, now)
        print(f"[step_bench] {c.arch} {c.variant} {phase}: GPU turn, limit {limit:.0f} s, elapsed "
              f"{now - self.t_start:.0f} s{f', {background} compiling meanwhile' if background else ''}", flush=True)

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
            now = time.time()
            for c in self.children:
                if c.state == "done":
                    continue
                self.read(c)
                if c.proc.poll() is not None:  # exited: said so (phases it did not reach: budget) or crashed
                    self.read(c)
                    self.close(c, "not run (budget)" if c.state == "exiting" else f"crashed (exit {c.proc.returncode})")
                    continue
                if now > self.hard_end:
                    self.kill(c, "time limit (budget)" if c.turn else "not run (budget)")
                elif c.state in ("starting", "compiling") and c.variant in COMPILED \
                        and now > self.t_start + self.a.compile_limit_s:
                    self.kill(c, f"time limit while compiling (killed {now - self.t_start:.0f} s into the run)")
                elif c.state == "precompiling" and now > c.since + self.a.compile_limit_s:
                    self.kill(c, f"time limit while compiling for the search (killed after {now - c.since:.0f} s)")
                elif c.turn and now > c.turn[1] + self.GRACE_S:
                    self.kill(c, f"time limit (killed after {now - c.turn[2]:.0f} s)")
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


def run_all(a):
    t_start = time.time()
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
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:], versions=_versions(),
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
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(a.out + ".tmp", a.out)
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


# ============================================================================================ output


def _f(x, spec):
    return "" if x is None else format(x, spec)


def _get(r, phase, key):
    return (r.get(phase) or {}).get(key)


def load(spec):
    """One JSON, or several (comma-separated) merged per (architecture, variant): e.g. a ``--phases fixed``
    run and a ``--phases search`` run. A phase that is "ok" in a later file replaces one that is not."""
    datas = []
    for path in spec.split(","):
        with open(path) as f:
            datas.append(json.load(f))
    if len(datas) == 1:
        return datas[0]
    meta = dict(datas[0]["meta"], merged_from=spec.split(","),
                phases=sorted({p for d in datas for p in d["meta"].get("phases", [])}),
                elapsed_s=round(sum(d["meta"].get("elapsed_s") or 0 for d in datas), 1))
    recs = {}
    for d in datas:
        for r in d["results"]:
            x = recs.setdefault((r["arch"], r["variant"]), {k: r[k] for k in ("arch", "variant", "label")})
            for ph in ("fixed", "search"):
                if ph in r and (ph not in x or x[ph].get("status") != "ok"):
                    x[ph] = r[ph]
    order = list(ARCHS)
    results = sorted(recs.values(), key=lambda r: (order.index(r["arch"]) if r["arch"] in order else 99,
                                                    VARIANTS.index(r["variant"])))
    return dict(meta=meta, results=results)


def table(data):
    """The markdown table: one row per architecture x variant."""
    rows = data["results"]
    lines = ["| architecture | variant | tokens/step | step ms | × torch.compile | peak GB | loss (step 1) | "
             "grad norm (step 1) | compile s | graphs / breaks | cce rewrites | max tokens/step | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f, s = r.get("fixed") or {}, r.get("search") or {}
        ref = next((_get(x, "fixed", "step_ms") for x in rows if x["arch"] == r["arch"] and x["variant"] == "compile"),
                   None)
        ms = f.get("step_ms")
        tok = f"{f['batch']}×{f['seq']} = {f['tokens']}" if f.get("tokens") else ""
        if s.get("max_tokens") is not None:
            mt = f"{s['max_tokens']} ({s['max_seqs']}×{s['seq']})"
            if not s.get("exact"):
                mt = "≥ " + mt + f" [{s.get('status')}]"
        else:
            mt = s.get("status", "")
        c = f if "fixed" in r else s  # compile facts: from the fixed phase, else from a search-only run
        graphs = f"{c['graphs']} / {c['graph_breaks']}" if "graphs" in c else ""
        rw = f"{c['rewrites']} ({c['misses']} missed)" if r["variant"] == "cce" and "rewrites" in c else ""
        status = f.get("status", "") if "fixed" in r else s.get("status", "")
        if f.get("error"):
            status += ": " + f["error"][:80].replace("|", "/")
        if f.get("recompiled"):
            status += " (recompiled at the full batch)"
        peak = f.get("peak_mb")
        cells = [r["arch"], r["label"], tok, _f(ms, ".1f"), _f(ms / ref if ms is not None and ref else None, ".2f"),
                 _f(peak / 1024 if peak is not None else None, ".2f"), _f(f.get("loss_first"), ".4f"),
                 _f(f.get("grad_norm_first"), ".4f"), _f(c.get("compile_s"), ".1f"), graphs, rw, mt, status]
        lines.append("| " + " | ".join(cells) + " |")
    m = data["meta"]
    head = (f"{m.get('gpu', m['device'])}, {m['precision']}, torch {m['versions'].get('torch')}, transformers "
            f"{m['versions'].get('transformers')}, {m['date']}, {m.get('elapsed_s')} s; step = {m['step']}; "
            f"compiled: {m['compiled']}{' (batch dim dynamic)' if m.get('dynamic_batch') else ''}")
    models = {}
    for r in rows:
        x = next((r[ph] for ph in ("fixed", "search") if (r.get(ph) or {}).get("params_M")), None)
        if x and r["arch"] not in models:
            models[r["arch"]] = (f"{r['arch']} {x['params_M']}M params, {x['layers']} layers, V={x['vocab']}, "
                                 f"{x['param_dtype']}, attention {x['attn_impl']}")
    skipped = m.get("skipped") or {}
    tail = ([""] + ["models: " + "; ".join(models.values())] if models else []) + \
        ([f"not run: {', '.join(f'{k} ({v})' for k, v in skipped.items())}"] if skipped else [])
    return "\n".join([head, ""] + lines + tail)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = data["results"]
    archs = list(dict.fromkeys(r["arch"] for r in res))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in res)]
    panels = [("step ms at the fixed tokens/step", lambda r: _get(r, "fixed", "step_ms"), "fixed"),
              ("peak GB at the fixed tokens/step",
               lambda r: None if _get(r, "fixed", "peak_mb") is None else _get(r, "fixed", "peak_mb") / 1024, "fixed"),
              ("max tokens/step (thousands)",
               lambda r: None if _get(r, "search", "max_tokens") is None else _get(r, "search", "max_tokens") / 1e3,
               "search")]
    panels = [p for p in panels if any(p[1](r) is not None for r in res)] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, (title, get, phase) in zip(axes[0], panels):
        top = 0.0
        for j, v in enumerate(variants):
            for i, arch in enumerate(archs):
                r = next((x for x in res if x["arch"] == arch and x["variant"] == v), None)
                if r is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                y = get(r)
                if y is None:
                    st = (r.get(phase) or {}).get("status", "-")
                    ax.annotate(st.split(" ")[0][:10], (x, 0), rotation=90, ha="center", va="bottom", fontsize=7,
                                color=f"C{j}")
                    continue
                hatch = "//" if phase == "search" and not (r.get("search") or {}).get("exact") else None
                ax.bar(x, y, width, color=f"C{j}", hatch=hatch, label=LABELS[v] if i == 0 else None)
                top = max(top, y)
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(archs)))
        ax.set_xticklabels(archs, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, top * 1.12 or 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    m = data["meta"]
    fig.suptitle(f"one training step (forward + backward + AdamW), {m.get('gpu', m['device'])}, {m['precision']}, "
                 f"torch {m['versions'].get('torch')}, {m['date'][:10]}"
                 + ("\nhatched: lower bound (search cut short)" if panels[-1][2] == "search" else ""), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================ main


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
    if a.device is None:
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
        return worker_main(a)
    if a.plot_only:
        data = load(a.plot_only)
    else:
        if a.device == "cpu" and not a.tiny:
            print("[step_bench] no CUDA: full-size models on the CPU are very slow; try --tiny", flush=True)
        data = run_all(a)
    text = table(data)
    if a.plot:
        try:
            plot(data, a.plot)
            print(f"wrote {a.plot}")
        except Exception as ex:  # noqa: BLE001
            print(f"no plot: {_err(ex)}")
    if not a.plot_only:
        md = os.path.splitext(a.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(text + "\n")
        print(f"wrote {a.out}, {md}")
    print()
    print(text)
    return data


if __name__ == "__main__":
    main()
