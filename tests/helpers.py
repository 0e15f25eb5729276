"""What the tests share: one input factory, one float64 reference (``cce_inductor.reference``), one
``rel_err``, and the compile-with-the-rewrite-and-compare-with-eager checks."""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Optional

import pytest
import torch
from hypothesis import settings

import cce_inductor.backend as backend_module
from cce_inductor.backend import make_backend
from cce_inductor.options import LossOptions
from cce_inductor.reference import reference_linear_cross_entropy, rel_err  # noqa: F401  (re-exported)


# ---- what a test needs, and how much fuzzing it gets ----------------------------------------------------

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (conftest.py sets it without CUDA)")


# Parametrize a test over "the PyTorch implementation" / "the Triton kernels on CPU tensors (interpreter)".
TRITON_ON_CPU = [pytest.param(False, id="torch"), pytest.param(True, id="triton", marks=needs_interpreter)]


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_params(*names: str, quick=("fp32", "bf16")) -> list:
    """``pytest.param`` per dtype name; those not in ``quick`` (fp16: the same code as bf16 under the
    interpreter, with other rounding constants) are marked slow."""
    return [pytest.param(_DTYPES[n], id=n, marks=() if n in quick else pytest.mark.slow) for n in names]


def fuzz_examples(share: float = 1.0) -> int:
    """This fuzz test's budget: ``share`` of the hypothesis profile's ``max_examples`` (conftest.py)."""
    return max(1, round(settings.default.max_examples * share))


# ---- option grids ----------------------------------------------------------------------------------

def option_grid(reductions=("mean", "sum", "none"), return_lse=(False, True)) -> list:
    """Every combination of the op's options, as keyword arguments (plus ``bias``: whether to pass one)."""
    return [dict(bias=b, reduction=r, label_smoothing=ls, softcap=cap, logit_scale=s, return_lse=lse)
            for b, r, ls, cap, s, lse in itertools.product(
                [False, True], reductions, [0.0, 0.1], [None, 4.0], [1.0, 0.5], return_lse)]


def option_id(kw: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


# A few representative option sets, where the full grid would be too slow (kernels under the interpreter):
# (bias?, LossOptions), by name.
OPTION_CASES = {
    "plain": (False, LossOptions()),
    "bias-smooth-softcap-scale": (True, LossOptions(label_smoothing=0.1, softcap=3.0, logit_scale=0.7)),
    "ii5-scale": (False, LossOptions(ignore_index=5, logit_scale=1.3)),
}


# ---- inputs ------------------------------------------------------------------------------------

def make_inputs(shape=(2, 5), d=6, v=11, dtype=torch.float64, *, bias=True, scale=1.0, ignore_frac=0.2,
                ignore_index=-100, seed=0, generator=None, device="cpu", requires_grad=True):
    """Random (never zero) ``(hidden [*shape, d], weight [v, d], bias [v] or None, targets shape)``.

    Logits have a standard deviation of about ``scale``; a fraction ``ignore_frac`` of the targets is
    ``ignore_index``. Floating tensors are leaves that require grad (unless ``requires_grad=False``).
    Values are drawn on ``device`` from ``generator`` (or a new one seeded with ``seed``).
    """
    g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    dev = g.device
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    h = torch.randn(*shape, d, generator=g, device=dev)
    w = torch.randn(v, d, generator=g, device=dev) * (scale / max(d, 1) ** 0.5)
    b = torch.randn(v, generator=g, device=dev) * 0.5 if bias else None
    y = torch.randint(0, v, shape, generator=g, device=dev)
    if ignore_frac:
        y[torch.rand(shape, generator=g, device=dev) < ignore_frac] = ignore_index

    def prep(t):
        if t is None:
            return None
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_() if requires_grad else t
    return prep(h), prep(w), prep(b), y.to(device)


def kernel_inputs(N, D, V, dtype, has_bias, gen, logit_std=2.0):
    """:func:`make_inputs` as the kernel tests use it: flat ``[N, D]`` tensors without grad, no ignored
    targets, drawn from ``gen``."""
    return make_inputs((N,), D, V, dtype, bias=has_bias, scale=logit_std, ignore_frac=0.0, generator=gen,
                       requires_grad=False)


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty / empty_like returns NaN (floats) or a huge value (ints): unwritten output shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(123456789)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


# ---- references ----------------------------------------------------------------------------------

def loss_and_grads(fn, hidden, weight, bias, targets, upstream_seed: Optional[int] = 1, **kw):
    """Run ``fn(hidden, weight, targets, bias=bias, **kw)`` and backprop a random upstream gradient (also
    through the lse when returned); ``upstream_seed=None`` backprops the loss itself."""
    out = fn(hidden, weight, targets, bias=bias, **kw)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    params = [p for p in (hidden, weight, bias) if p is not None]
    if upstream_seed is None:
        return loss, lse, torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(upstream_seed)
    total = (loss * torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype)).sum()
    if lse is not None:
        total = total + (lse * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.device, lse.dtype)).sum()
    return loss, lse, torch.autograd.grad(total, params)


def float64_reference(hidden, weight, bias, targets, **kw):
    """:func:`loss_and_grads` of the eager expression on float64 copies of the inputs."""
    up = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return loss_and_grads(reference_linear_cross_entropy, up(hidden), up(weight), up(bias), targets, **kw)


def assert_as_exact_as_eager(errs, factor=1.5, loss_tol=1e-5):
    """Errors against float64 (``harness.compare`` with methods "eager" and "ours"): ours' gradients within
    ``factor`` x eager's own error, its loss within ``loss_tol`` (None: not checked)."""
    if loss_tol is not None:
        assert errs["ours_loss"] < loss_tol, errs
    assert errs["ours_dE"] <= factor * errs["eager_dE"], errs
    assert errs["ours_dC"] <= factor * errs["eager_dC"], errs


# ---- compile with the rewrite, compare with eager -------------------------------------------------

@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_counting(fn, inner="aot_eager", fullgraph=True, dynamic=None):
    """torch.compile(fn) with the cce backend; returns (compiled, list of each graph's PassResult)."""
    results = []
    compiled = torch.compile(fn, backend=make_backend(inner, on_result=results.append), fullgraph=fullgraph,
                             dynamic=dynamic)
    return compiled, results


class PassCounts:
    """Rewrites and misses the pass counted (``torch._dynamo.utils.counters["cce"]``) since it was made."""

    def __init__(self):
        from torch._dynamo.utils import counters

        self._c = counters["cce"]
        self._start = (self._c["rewrites"], self._c["misses"])

    @property
    def rewrites(self) -> int:
        return self._c["rewrites"] - self._start[0]

    @property
    def misses(self) -> int:
        return self._c["misses"] - self._start[1]

    def __repr__(self):
        return f"PassCounts(rewrites={self.rewrites}, misses={self.misses})"


@contextlib.contextmanager
def counting_installed_pass():
    """``cce_inductor.install()``; yields a :class:`PassCounts` of what the pass did inside.

    Inductor's FX-graph and AOTAutograd caches are switched off inside: on a cache hit Inductor reuses the
    compiled (already rewritten) program without running any pre-grad pass, so nothing would be counted
    on a machine whose cache is warm from an earlier run of the same test.
    """
    with torch._inductor.config.patch(force_disable_caches=True), backend_module.install():
        yield PassCounts()


def n_rewrites(results):
    """Rewrites in the last compiled graph (Dynamo may trace a frame twice, e.g. after a
    TensorifyScalarRestartAnalysis, calling the backend once per trace)."""
    return len(results[-1].rewrites) if results else 0


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for x in out for o in _outputs(x)]
    if hasattr(out, "loss"):
        return [out.loss]
    return []


def _grads_of(out, inputs):
    outs = [o for o in _outputs(out) if o.requires_grad and o.dtype.is_floating_point]
    if not outs:
        return [None] * len(inputs)
    total = sum((o.double() * (1.0 + 0.1 * i)).sum() for i, o in enumerate(outs))  # every output counts
    return torch.autograd.grad(total, inputs, allow_unused=True)


def check(fn, args, expect, *, inner="aot_eager", params=(), rtol=1e-6, atol=1e-7, dynamic=None,
          fullgraph=True, return_results=False):
    """Compile ``fn`` with the rewrite, assert ``expect`` rewrites, and compare every output and every
    gradient (of the args that require grad and of ``params``) with eager."""
    compiled, results = compile_counting(fn, inner=inner, dynamic=dynamic, fullgraph=fullgraph)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(params)
    got = compiled(*args)
    got_g = _grads_of(got, inputs)
    want = fn(*args)
    want_g = _grads_of(want, inputs)
    assert n_rewrites(results) == expect, (
        f"expected {expect} rewrites, got {[r.rewrites for r in results]}, misses {[r.misses for r in results]}")
    assert len(_outputs(got)) == len(_outputs(want)), (got, want)
    for g, w in zip(_outputs(got), _outputs(want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert (g is None) == (w is None), i
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"grad {i}: {m}")
    return results if return_results else None


def assert_left_alone(fn, args, reason_part: str, *, inner="aot_eager", clone_args=True):
    """Compile ``fn`` with the rewrite: nothing rewritten, one miss whose reason contains ``reason_part``
    (which must be specific: an empty string is refused), and the result equal to eager's."""
    assert reason_part, "say which reason: an empty reason_part matches anything"
    compiled, results = compile_counting(fn, inner=inner, fullgraph=False)
    eager_args = [a.detach().clone().requires_grad_(a.requires_grad) if clone_args and isinstance(a, torch.Tensor)
                  else a for a in args]
    out = compiled(*args)
    torch.testing.assert_close(out, fn(*eager_args), equal_nan=True)
    assert sum(len(r.rewrites) for r in results) == 0, [r.rewrites for r in results]
    misses = [m for r in results for m in r.misses]
    assert misses and any(reason_part in m.reason for m in misses), misses
    return misses
