"""Triton kernels on a real GPU: accuracy vs float64 at model shapes, int64 offsets, CUDA-graph capture."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from cce_inductor.kernels import triton_backward, triton_forward  # noqa: E402
from cce_inductor.kernels.config import pick_config  # noqa: E402
from cce_inductor.reference import reference_loss_and_grads, rel_err  # noqa: E402
from cce_inductor.options import LossOptions  # noqa: E402

from helpers import make_inputs  # noqa: E402

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}


def model_inputs(N, D, V, dtype=torch.bfloat16, seed=0, logit_std=2.0):
    h, w, _, t = make_inputs((N,), D, V, dtype, bias=False, scale=logit_std, ignore_frac=0.0, seed=seed,
                             device="cuda", requires_grad=False)
    return h, w, t


def eager_mean_ce(h, w, t):
    e = h.detach().clone().requires_grad_()
    c = w.detach().clone().requires_grad_()
    loss = F.cross_entropy((e @ c.T).float(), t)
    loss.backward()
    return loss.detach(), e.grad, c.grad


def ours_mean_ce(h, w, t, opts=LossOptions()):
    N = h.shape[0]
    loss, lse = triton_forward(h, w, None, t, opts)
    grad = torch.full((N,), 1.0 / N, device=h.device)
    dh, dw, _ = triton_backward(grad, None, h, w, None, t, lse, opts)
    return loss.mean(), dh, dw


def compare_with_eager(h, w, t):
    N = h.shape[0]
    ref_loss, _, ref_dh, ref_dw, _ = reference_loss_and_grads(
        h, w, None, t, LossOptions(), torch.full((N,), 1.0 / N, device=h.device))
    ref_mean = ref_loss.mean()
    e_loss, e_dh, e_dw = eager_mean_ce(h, w, t)
    errs = {"eager_loss": abs(e_loss.item() - ref_mean.item()) / abs(ref_mean.item()),
            "eager_dE": rel_err(e_dh, ref_dh), "eager_dC": rel_err(e_dw, ref_dw)}
    del e_dh, e_dw
    o_loss, o_dh, o_dw = ours_mean_ce(h, w, t)
    errs.update({"ours_loss": abs(o_loss.item() - ref_mean.item()) / abs(ref_mean.item()),
                 "ours_dE": rel_err(o_dh, ref_dh), "ours_dC": rel_err(o_dw, ref_dw)})
    return errs


@pytest.mark.parametrize("name", list(SHAPES))
def test_model_shapes_bf16_as_exact_as_eager(name):
    N, D, V = SHAPES[name]
    h, w, t = model_inputs(N, D, V)
    errs = compare_with_eager(h, w, t)
    print(name, {k: f"{v:.3e}" for k, v in errs.items()})
    assert errs["ours_loss"] < 1e-5
    assert errs["ours_dE"] <= 1.5 * errs["eager_dE"], errs
    assert errs["ours_dC"] <= 1.5 * errs["eager_dC"], errs


def test_n_times_v_beyond_int32():
    N, D, V = 9000, 128, 256000
    assert N * V > 2**31
    h, w, t = model_inputs(N, D, V, seed=1)
    t[-1] = V - 1  # a target in the last vocabulary tile of the last row
    errs = compare_with_eager(h, w, t)
    print({k: f"{v:.3e}" for k, v in errs.items()})
    assert errs["ours_loss"] < 1e-5
    assert errs["ours_dE"] <= 1.5 * errs["eager_dE"], errs
    assert errs["ours_dC"] <= 1.5 * errs["eager_dC"], errs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_all_options_smoke(dtype, tol):
    N, D, V = 1000, 200, 5003
    gen = torch.Generator(device="cuda").manual_seed(2)
    h, w, t = model_inputs(N, D, V, dtype=dtype, seed=3)
    b = (torch.randn(V, device="cuda", generator=gen) * 0.5).to(dtype)
    t[::7] = -100
    opts = LossOptions(label_smoothing=0.1, softcap=4.0, logit_scale=0.8)
    g = torch.rand(N, device="cuda", generator=gen)
    gl = torch.randn(N, device="cuda", generator=gen)
    rl, rlse, rdh, rdw, rdb = reference_loss_and_grads(h, w, b, t, opts, g, gl)
    # Small chunks: exercises the hi/lo d_hidden accumulator across many chunks on the GPU.
    cfg = pick_config(N, D, V, dtype, h.device).with_(chunk_cols=512)
    for config in (None, cfg, cfg.with_(dhidden_remainder="float")):
        loss, lse = triton_forward(h, w, b, t, opts, config=config)
        assert rel_err(loss, rl) < 1e-5 and rel_err(lse, rlse) < 1e-5
        dh, dw, db = triton_backward(g, gl, h, w, b, t, lse, opts, config=config)
        assert rel_err(dh, rdh) < tol and rel_err(dw, rdw) < tol and rel_err(db, rdb) < tol
    t[5] = V + 3
    loss, _ = triton_forward(h, w, b, t, opts)
    assert torch.isnan(loss[5]) and not torch.isnan(loss[:5]).any()


def test_cuda_graph_capture():
    N, D, V = 777, 256, 20000
    opts = LossOptions(softcap=30.0)
    h, w, t = model_inputs(N, D, V, seed=4)
    g = torch.rand(N, device="cuda")

    def step():
        loss, lse = triton_forward(h, w, None, t, opts)
        return (loss,) + triton_backward(g, lse, h, w, None, t, lse, opts)[:2]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile every kernel before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    h2, w2, t2 = model_inputs(N, D, V, seed=5)
    h.copy_(h2), w.copy_(w2), t.copy_(t2)
    graph.replay()
    torch.cuda.synchronize()
    expect = step()
    for a, b in zip(out, expect):
        assert torch.equal(a, b)
