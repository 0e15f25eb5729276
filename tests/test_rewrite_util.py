"""Shared helpers for the rewrite tests (compile with the cce backend, compare with eager)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import cce_inductor.backend as backend_module
from cce_inductor.backend import make_backend


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_counting(fn, inner="aot_eager", fullgraph=True, dynamic=None):
    """torch.compile(fn) with the cce backend; returns (compiled, results list of PassResult)."""
    results = []
    compiled = torch.compile(fn, backend=make_backend(inner, on_result=results.append), fullgraph=fullgraph,
                             dynamic=dynamic)
    return compiled, results


@contextlib.contextmanager
def counting_installed_pass():
    """``cce_inductor.install()`` with a spy on the rewrite; yields the list of rewrite counts, one per graph.

    Inductor's FX-graph and AOTAutograd caches are switched off inside: on a cache hit Inductor reuses the
    compiled (already rewritten) program without running any pre-grad pass, so the spy would see nothing
    on a machine whose cache is warm from an earlier run of the same test.
    """
    seen = []
    real = backend_module.rewrite_graph

    def spy(graph):
        res = real(graph)
        seen.append(len(res.rewrites))
        return res
    backend_module.rewrite_graph = spy
    try:
        with torch._inductor.config.patch(force_disable_caches=True), backend_module.install():
            yield seen
    finally:
        backend_module.rewrite_graph = real


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
    for g, w in zip(_outputs(got), _outputs(want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert (g is None) == (w is None), i
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"grad {i}: {m}")
    return results if return_results else None


def make_inputs(b=2, t=5, d=6, v=11, dtype=torch.float64, seed=0, ignore_frac=0.2, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_()
    y = torch.randint(0, v, (b, t), generator=g)
    if ignore_frac:
        y[torch.rand(b, t, generator=g) < ignore_frac] = ignore_index
    return h, w, bias, y
