"""The fast path (and the chunked forward, the cuBLAS-fp32 d_hidden variant) on a real GPU: accuracy vs
float64 at model shapes within 1.5x eager bf16's own error, N*V > 2^31, every option, CUDA-graph capture."""
import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.cuda]

import cce_inductor  # noqa: E402
from cce_inductor import config  # noqa: E402
from cce_inductor.kernels import triton_chunked_forward, triton_fast_forward, triton_forward  # noqa: E402
from cce_inductor.reference import reference_loss_and_grads, rel_err  # noqa: E402
from cce_inductor.options import LossOptions  # noqa: E402
from cce_inductor.paths import plan_fast  # noqa: E402

# the benchmarks' shapes, inputs and float64 errors (benchmarks/harness; on the path: pyproject.toml)
from harness import MODEL_SHAPES, SHAPES, compare, eager, model_inputs  # noqa: E402
from helpers import assert_as_exact_as_eager  # noqa: E402


def errors(h, w, t, fn, upstream=1.0):
    return compare(h, w, t, {"eager": eager, "ours": fn}, upstream)


@pytest.mark.parametrize("name", MODEL_SHAPES)
@pytest.mark.parametrize("path", ["fast", "low_memory"])
def test_model_shapes_as_exact_as_eager(name, path):
    N, D, V = SHAPES[name]
    h, w, t = model_inputs(N, D, V)
    errs = errors(h, w, t, lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path=path))
    print(name, path, {k: f"{v:.3e}" for k, v in errs.items()})
    assert_as_exact_as_eager(errs)


@pytest.mark.parametrize("remainder", ["int8", "int4"])
def test_fast_path_remainders_and_a_non_power_of_two_upstream(remainder):
    N, D, V = 8192, 2304, 64000
    h, w, t = model_inputs(N, D, V, seed=3)
    with config.patch(fast_path_tokens_per_chunk=1024, fast_path_remainder=remainder):
        errs = errors(h, w, t, lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path="fast"),
                      upstream=1 / 3)
    print(remainder, {k: f"{v:.3e}" for k, v in errs.items()})
    assert_as_exact_as_eager(errs, loss_tol=None)


def test_n_times_v_beyond_int32():
    N, D, V = 9000, 128, 256000
    assert N * V > 2**31
    h, w, t = model_inputs(N, D, V, seed=1)
    t[-1] = V - 1
    with config.patch(fast_path_tokens_per_chunk=N):  # one [N, V] chunk: row offsets past 2^31
        errs = errors(h, w, t, lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path="fast"))
    assert_as_exact_as_eager(errs)
    loss, lse = triton_chunked_forward(h, w, None, t, LossOptions(), tokens_per_chunk=N)
    loss_f, lse_f = triton_forward(h, w, None, t, LossOptions())
    assert rel_err(lse, lse_f.double()) < 1e-3 and rel_err(loss, loss_f.double()) < 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 2.5e-2)])
def test_all_options(dtype, tol):
    N, D, V = 1000, 200, 5003
    gen = torch.Generator(device="cuda").manual_seed(2)
    h, w, t = model_inputs(N, D, V, dtype=dtype, seed=3)
    b = (torch.randn(V, device="cuda", generator=gen) * 0.5).to(dtype)
    t[::7] = -100
    opts = LossOptions(label_smoothing=0.1, softcap=4.0, logit_scale=0.8)
    count = (t != -100).sum().item()
    rl, rlse, rdh, rdw, rdb = reference_loss_and_grads(h, w, b, t, opts, torch.full((N,), 1.0 / count, device="cuda"))
    for rem in ("int8", "int4"):
        loss, dh, dw, db = triton_fast_forward(h, w, b, t, opts, reduction="mean", tokens_per_chunk=128,
                                               remainder=rem)
        assert abs(loss.item() - rl.sum().item() / count) < 10 * tol * abs(rl.sum().item() / count)
        assert rel_err(dh, rdh) < tol and rel_err(dw, rdw) < tol and rel_err(db, rdb) < tol
    loss, lse = triton_chunked_forward(h, w, b, t, opts, tokens_per_chunk=300)
    assert rel_err(lse, rlse) < 10 * tol and rel_err(loss, rl) < 10 * tol
    b32 = torch.randn(V, device="cuda", generator=gen) * 0.5  # fp32 bias with 16-bit inputs
    rl, _, rdh, rdw, rdb = reference_loss_and_grads(h, w, b32, t, opts, torch.full((N,), 1.0, device="cuda"))
    loss, dh, dw, db = triton_fast_forward(h, w, b32, t, opts, reduction="sum", tokens_per_chunk=256, remainder="int4")
    assert rel_err(dh, rdh) < tol and rel_err(dw, rdw) < tol and rel_err(db, rdb) < tol


def test_low_memory_cublas_fp32_dhidden_variant():
    N, D, V = 2048, 512, 50000
    h, w, t = model_inputs(N, D, V, seed=7)
    fn = lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path="low_memory")  # noqa: E731
    with config.patch(low_memory_dhidden="cublas_fp32"):
        errs = errors(h, w, t, fn)
    assert_as_exact_as_eager(errs, loss_tol=None)


def test_cuda_graph_capture_of_the_fast_path():
    N, D, V = 777, 256, 20000
    h, w, t = model_inputs(N, D, V, seed=4)
    plan = plan_fast(N, D, V, torch.bfloat16, tokens_per_chunk=200)
    opts = LossOptions(softcap=30.0)

    def step():
        loss, dh, dw, _ = triton_fast_forward(h, w, None, t, opts, reduction="mean",
                                              tokens_per_chunk=plan.tokens_per_chunk, remainder="int4")
        return loss, dh, dw

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    h2, w2, t2 = model_inputs(N, D, V, seed=5)
    t2[::5] = -100  # a different count of ignored targets: computed on the device inside the graph
    h.copy_(h2), w.copy_(w2), t.copy_(t2)
    graph.replay()
    torch.cuda.synchronize()
    expect = step()
    for a, b in zip(out, expect):
        assert torch.equal(a, b)


def test_compiled_fast_path_on_cuda():
    h, w, t = model_inputs(4096, 512, 32000, seed=6)
    h.requires_grad_(), w.requires_grad_()
    fn = torch.compile(lambda h, w, t: cce_inductor.linear_cross_entropy(h, w, t, path="fast") / 3.0, fullgraph=True)
    fn(h, w, t).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (cce_inductor.linear_cross_entropy(h, w, t, path="fast") / 3.0).backward()
    # both scale the saved gradients by 1/3 in float32 with one rounding: equal
    assert torch.equal(gh, h.grad) and torch.equal(gw, w.grad)
