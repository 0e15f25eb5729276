"""The fast path through the public function: every option vs float64 (PyTorch path on the CPU and the
Triton kernels under the interpreter), torch.compile (aot_eager, inductor), the in-place backward (no
second V x D buffer, eagerly or compiled), retain_graph, path selection by flags, opcheck."""
import contextlib

import pytest
import torch

import cce_inductor
from cce_inductor import select
from cce_inductor.reference import reference_linear_cross_entropy
from cce_inductor.select import use_triton_on_cpu

from helpers import make_inputs, needs_interpreter, option_grid, option_id, rel_err

UPSTREAM = 0.37  # a non-power-of-two factor after the loss (as sum / num_items gives)


def grads_of(fn, h, w, b, t, factor=UPSTREAM, **kw):
    loss = fn(h, w, t, bias=b, **kw)
    params = [p for p in (h, w, b) if p is not None and p.requires_grad]
    return loss, torch.autograd.grad(loss * factor, params)


def reference(h, w, b, t, factor=UPSTREAM, **kw):
    up = lambda x: None if x is None else x.detach().double().requires_grad_(x.requires_grad)  # noqa: E731
    return grads_of(reference_linear_cross_entropy, up(h), up(w), up(b), t, factor, **kw)


@contextlib.contextmanager
def spy_fast(monkeypatch):
    """Records each run of the fast path (its outputs' data pointers)."""
    calls = []
    real = select.fast_forward

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append({"dh": None if out[1] is None else out[1].data_ptr(),
                      "dw": None if out[2] is None else out[2].data_ptr()})  # no reference kept
        return out

    monkeypatch.setattr(select, "fast_forward", spy)
    yield calls


@pytest.mark.parametrize("kw", option_grid(reductions=("mean", "sum"), return_lse=(False,)), ids=option_id)
def test_fast_path_every_option_fp32(kw, monkeypatch):
    kw = dict(kw)
    bias = kw.pop("bias")
    h, w, b, t = make_inputs((3, 7), 16, 37, torch.float32, bias=bias, scale=4.0)
    with spy_fast(monkeypatch) as calls:
        loss, grads = grads_of(cce_inductor.linear_cross_entropy, h, w, b, t, path="fast", **kw)
    assert len(calls) == 1
    rloss, rgrads = reference(h, w, b, t, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - rloss.item()) <= 1e-5 * abs(rloss.item())
    for g, r in zip(grads, rgrads):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("softcap,label_smoothing,reduction,triton", [
    pytest.param(None, 0.0, "mean", False, id="torch-plain"),
    pytest.param(30.0, 0.1, "sum", False, id="torch-options"),
    pytest.param(None, 0.0, "mean", True, id="triton-plain", marks=needs_interpreter),
    # under the interpreter the options case is a slow variant (tests/test_fast_kernels.py covers the options)
    pytest.param(30.0, 0.1, "sum", True, id="triton-options", marks=[needs_interpreter, pytest.mark.slow]),
])
def test_16bit_fast_path_as_exact_as_eager(dtype, softcap, label_smoothing, reduction, triton):
    """Relative error vs float64 within 1.5x eager's own at the same dtype, with several token chunks (the
    compensated d_weight accumulation) and a non-power-of-two upstream gradient."""
    kw = dict(softcap=softcap, label_smoothing=label_smoothing, reduction=reduction)
    h, w, b, t = make_inputs((64,), 48, 301, dtype, bias=True, scale=8.0)
    # (under the interpreter int8 only: the int4 remainder's kernels are checked in tests/test_fast_kernels.py)
    for remainder in ("int8",) if triton else ("int8", "int4"):
        ctx = use_triton_on_cpu() if triton else contextlib.nullcontext()
        with ctx, cce_inductor.config.patch(fast_path_tokens_per_chunk=16, fast_path_remainder=remainder):
            _, grads = grads_of(cce_inductor.linear_cross_entropy, h, w, b, t, path="fast", **kw)
        _, eager = grads_of(reference_linear_cross_entropy, h, w, b, t, **kw)
        _, ref = reference(h, w, b, t, **kw)
        for g, e, r in zip(grads, eager, ref):
            assert g.dtype == dtype
            assert rel_err(g, r) <= 1.5 * rel_err(e, r) + 1e-6, (rel_err(g, r), rel_err(e, r))


def test_auto_takes_the_low_memory_scheme_when_the_budget_is_too_small(monkeypatch):
    h, w, b, t = make_inputs((40,), 16, 50, torch.float32, bias=True)
    with spy_fast(monkeypatch), cce_inductor.config.patch(fast_path_memory_fraction=0.0):
        called = {}
        real = select._low_memory_in_forward
        monkeypatch.setattr(select, "_low_memory_in_forward",
                            lambda *a, **k: called.setdefault("out", real(*a, **k)))
        loss, grads = grads_of(cce_inductor.linear_cross_entropy, h, w, b, t)
    assert "out" in called
    rloss, rgrads = reference(h, w, b, t)
    assert abs(loss.item() - rloss.item()) <= 1e-5 * abs(rloss.item())
    for g, r in zip(grads, rgrads):
        assert rel_err(g, r) < 1e-5


@needs_interpreter
def test_auto_low_memory_scheme_on_triton():
    """Forming the gradients with the low-memory kernels inside the forward gives exactly the low-memory
    path's gradients (upstream gradient 1: other factors add one rounding, see ops/fast.py)."""
    h, w, b, t = make_inputs((30,), 20, 45, torch.bfloat16, bias=True, scale=4.0)
    with use_triton_on_cpu():
        with cce_inductor.config.patch(fast_path_memory_fraction=0.0):
            loss, grads = grads_of(cce_inductor.linear_cross_entropy, h, w, b, t, factor=1.0)
        lm_loss, lm_grads = grads_of(cce_inductor.linear_cross_entropy, h, w, b, t, factor=1.0, path="low_memory")
    torch.testing.assert_close(loss, lm_loss, rtol=1e-6, atol=0)
    for g, e in zip(grads, lm_grads):
        assert torch.equal(g, e)


@pytest.mark.parametrize("kw,why", [
    (dict(reduction="none"), "reduction none"),
    (dict(return_lse=True), "lse"),
    (dict(path="low_memory"), "forced"),
], ids=["none", "lse", "low_memory"])
def test_fast_path_not_taken_where_invalid(kw, why, monkeypatch):
    h, w, b, t = make_inputs((12,), 8, 20, torch.float32)
    with spy_fast(monkeypatch) as calls:
        out = cce_inductor.linear_cross_entropy(h, w, t, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.sum().backward()
    assert calls == [], why
    with spy_fast(monkeypatch) as calls, torch.no_grad():
        cce_inductor.linear_cross_entropy(h, w, t)
    assert calls == []
    with spy_fast(monkeypatch) as calls, cce_inductor.config.patch(path="low_memory"):
        cce_inductor.linear_cross_entropy(h, w, t).backward()
    assert calls == []


def test_frozen_weight_skips_d_weight(monkeypatch):
    h, w, _, t = make_inputs((12,), 8, 20, torch.float32)
    w.requires_grad_(False)
    with spy_fast(monkeypatch) as calls:
        loss, (dh,) = grads_of(cce_inductor.linear_cross_entropy, h, w, None, t, path="fast")
    assert calls[0]["dw"] is None and calls[0]["dh"] is not None
    _, (rdh,) = reference(h, w, None, t)
    assert rel_err(dh, rdh) < 1e-5


def test_eager_backward_scales_in_place_and_hands_over_the_buffers(monkeypatch):
    """No second V x D tensor: the gradients AccumulateGrad stores are the buffers the forward filled."""
    h, w, b, t = make_inputs((24,), 16, 300, torch.bfloat16, bias=True)
    with spy_fast(monkeypatch) as calls:
        (cce_inductor.linear_cross_entropy(h, w, t, bias=b, path="fast") * UPSTREAM).backward()
    assert w.grad.data_ptr() == calls[0]["dw"] and h.grad.data_ptr() == calls[0]["dh"]


def test_second_backward_through_the_same_graph_raises():
    h, w, _, t = make_inputs((10,), 8, 20, torch.float32)
    loss = cce_inductor.linear_cross_entropy(h, w, t, path="fast")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def _loss_fn(h, w, b, t):
    return cce_inductor.linear_cross_entropy(h, w, t, bias=b, path="fast", label_smoothing=0.1, softcap=5.0) / 3.0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fast_path_equals_eager(backend):
    h, w, b, t = make_inputs((2, 9), 16, 40, torch.float32, bias=True)
    loss = _loss_fn(h, w, b, t)
    e_grads = torch.autograd.grad(loss, [h, w, b])
    compiled = torch.compile(_loss_fn, backend=backend, fullgraph=True)
    c_loss = compiled(h, w, b, t)
    c_grads = torch.autograd.grad(c_loss, [h, w, b])
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    for c, e in zip(c_grads, e_grads):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-9)


def test_compiled_backward_allocates_no_second_weight_sized_buffer(monkeypatch):
    """Inductor's backward scales the saved gradients in the buffers the forward filled: the generated code
    allocates no [V, D] (nor [N, D]) buffer, and the .grad tensors are the forward's buffers."""
    from torch._inductor.utils import run_and_get_code

    V, D, N = 300, 16, 24
    h, w, _, t = make_inputs((N,), D, V, torch.float32)

    def fn(h, w, t):
        return cce_inductor.linear_cross_entropy(h, w, t, path="fast") * UPSTREAM

    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    with spy_fast(monkeypatch) as calls:
        _, codes = run_and_get_code(lambda: compiled(h, w, t).backward())
    backward_code = [c for c in codes if "tangents_1" in c]
    assert backward_code, "no backward code captured"
    for code in backward_code:
        call = code[code.index("def call"):]
        for line in call.splitlines():
            assert not ("empty_strided" in line and (f"({V}, {D})" in line or f"({N}, {D})" in line)), line
    assert w.grad.data_ptr() == calls[-1]["dw"] and h.grad.data_ptr() == calls[-1]["dh"]
    e_h, e_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fn(h, w, t).backward()
    torch.testing.assert_close(e_h, h.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(e_w, w.grad, rtol=1e-6, atol=1e-9)


def test_compiled_retain_graph_does_not_scale_twice():
    """Compiled, a retained graph's second backward is right: AOTAutograd compiles the backward when it
    first runs and does not donate the saved buffers under retain_graph=True (so that backward writes a new
    buffer instead of scaling in place)."""
    h, w, _, t = make_inputs((10,), 8, 20, torch.float32)
    compiled = torch.compile(lambda h, w, t: cce_inductor.linear_cross_entropy(h, w, t, path="fast") * 3.0,
                             backend="inductor")
    loss = compiled(h, w, t)
    loss.backward(retain_graph=True)
    first = w.grad.clone(), h.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * first[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, 2 * first[1], rtol=1e-6, atol=0)


def test_dynamic_tokens_one_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda h, w, t: cce_inductor.linear_cross_entropy(h, w, t), backend=counter,
                             dynamic=True)
    counts = []
    for n in (9, 17, 33):
        h, w, _, t = make_inputs((n,), 8, 20, torch.float32, seed=n)
        loss = compiled(h, w, t)
        loss.backward()
        counts.append(counter.frame_count)
        rloss, (rdh, rdw) = reference(h, w, None, t, factor=1.0)
        assert rel_err(h.grad, rdh) < 1e-5 and rel_err(w.grad, rdw) < 1e-5
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 2, counts  # nothing compiled after the first call


def test_opcheck_fast_op():
    h, w, b, t = make_inputs((6,), 8, 11, torch.float32, bias=True)
    args = (h.detach(), w.detach(), b.detach(), t, -100, 0.1, 3.0, 0.5, "mean", True, True, True, "fast")
    torch.library.opcheck(torch.ops.cce.fast_linear_cross_entropy.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("upstream", [1.0, 1 / 3])
def test_triton_fast_path_errors_match_eager_bf16(upstream):
    """With the kernels' round-to-nearest conversions the Triton fast path over 4 token chunks has eager's
    own error at upstream 1 (the same bf16 logits, the same bf16 rounding of d(logits), d_weight carried
    exactly across chunks), and stays below it after a non-power-of-two upstream gradient (one extra
    rounding of the finished gradients, where eager's bf16 chain rounds several times)."""
    gen = torch.Generator().manual_seed(0)
    N, D, V = 256, 32, 512
    h = torch.randn(N, D, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 2 / D ** 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    with use_triton_on_cpu(), cce_inductor.config.patch(fast_path_tokens_per_chunk=64):
        _, ours = grads_of(cce_inductor.linear_cross_entropy, h, w, None, t, factor=upstream, path="fast")
    _, eager = grads_of(reference_linear_cross_entropy, h, w, None, t, factor=upstream)
    _, ref = reference(h, w, None, t, factor=upstream)
    for o, e, r in zip(ours, eager, ref):
        assert rel_err(o, r) <= (1.05 if upstream == 1.0 else 1.0) * rel_err(e, r), (rel_err(o, r), rel_err(e, r))
