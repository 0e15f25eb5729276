"""Triton kernels on a real GPU: accuracy vs float64 at model shapes, int64 offsets, CUDA-graph capture."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from cce_inductor.kernels import pick_config, triton_backward, triton_forward  # noqa: E402
from cce_inductor.reference import reference_loss_and_grads, rel_err  # noqa: E402
from cce_inductor.options import LossOptions  # noqa: E402

# the benchmarks' shapes, inputs and float64 errors (benchmarks/harness; on the path: pyproject.toml)
from harness import MODEL_SHAPES, SHAPES, compare, eager, model_inputs  # noqa: E402
from helpers import assert_as_exact_as_eager  # noqa: E402


def ours_mean_ce(h, w, t, opts=LossOptions()):
    """Mean loss and its gradients from the kernels themselves (no autograd)."""
    h, w = h.detach(), w.detach()
    N = h.shape[0]
    loss, lse = triton_forward(h, w, None, t, opts)
    grad = torch.full((N,), 1.0 / N, device=h.device)
    dh, dw, _ = triton_backward(grad, None, h, w, None, t, lse, opts)
    return loss.mean(), dh, dw


def compare_with_eager(h, w, t):
    return compare(h, w, t, {"eager": eager, "ours": ours_mean_ce})


@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_model_shapes_bf16_as_exact_as_eager(name):
    N, D, V = SHAPES[name]
    h, w, t = model_inputs(N, D, V)
    errs = compare_with_eager(h, w, t)
    print(name, {k: f"{v:.3e}" for k, v in errs.items()})
    assert_as_exact_as_eager(errs)


def test_n_times_v_beyond_int32():
    N, D, V = 9000, 128, 256000
    assert N * V > 2**31
    h, w, t = model_inputs(N, D, V, seed=1)
    t[-1] = V - 1  # a target in the last vocabulary tile of the last row
    errs = compare_with_eager(h, w, t)
    print({k: f"{v:.3e}" for k, v in errs.items()})
    assert_as_exact_as_eager(errs)


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


# ---- the entropy output and per-token log-probabilities (RL scoring) ----------------------------------

def _rl_grads(fn, h, w, g_logp, g_ent):
    e, c = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = fn(e, c)
    grads = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), [e, c])
    return logp.detach(), ent.detach(), grads


@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_log_probs_and_entropy_at_model_shapes_as_exact_as_eager(name):
    """An RL loss's per-token upstream gradients of the log-probabilities and of the entropy, bf16, 4096 tokens
    at the model's D and V (eager holds several float32 N x V tensors): the op's outputs and gradients within
    1.5x of eager's own error against float64."""
    import torch.nn.functional as F

    import cce_inductor
    from cce_inductor.reference import reference_with_entropy

    _, D, V = SHAPES[name]
    N = 4096
    h, w, t = model_inputs(N, D, V, seed=6)
    gen = torch.Generator(device="cuda").manual_seed(7)
    g_logp = torch.randn(N, device="cuda", generator=gen) / N
    g_ent = torch.randn(N, device="cuda", generator=gen) * (0.01 / N)

    def eager_rl(e, c):
        logp = F.log_softmax((e @ c.T).float(), -1)
        return logp.gather(-1, t[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    ours = _rl_grads(lambda e, c: cce_inductor.linear_log_probs(e, c, t, return_entropy=True), h, w, g_logp, g_ent)
    eager_out = _rl_grads(eager_rl, h, w, g_logp, g_ent)
    loss, _, ent, rdh, rdw, _ = reference_with_entropy(h, w, None, t, LossOptions(), -g_logp.double(), None,
                                                       g_ent.double())
    refs = (-loss, ent, rdh, rdw)
    errs = {k: (rel_err(o, r), rel_err(e, r)) for k, o, e, r in
            zip(("logp", "entropy", "dE", "dC"), (*ours[:2], *ours[2]), (*eager_out[:2], *eager_out[2]), refs)}
    print(name, {k: f"ours {a:.3e} eager {b:.3e}" for k, (a, b) in errs.items()})
    for k, (ours_err, eager_err) in errs.items():
        assert ours_err <= 1.5 * eager_err + 1e-6, (k, ours_err, eager_err)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_entropy_all_options_smoke(dtype, tol):
    N, D, V = 1000, 200, 5003
    gen = torch.Generator(device="cuda").manual_seed(12)
    h, w, t = model_inputs(N, D, V, dtype=dtype, seed=13)
    b = (torch.randn(V, device="cuda", generator=gen) * 0.5).to(dtype)
    t[::7] = -100
    opts = LossOptions(label_smoothing=0.1, softcap=4.0, logit_scale=0.8)
    g, gl, ge = (torch.randn(N, device="cuda", generator=gen) for _ in range(3))
    from cce_inductor.kernels import triton_chunked_forward
    from cce_inductor.reference import reference_with_entropy

    rl, rlse, rent, rdh, rdw, rdb = reference_with_entropy(h, w, b, t, opts, g, gl, ge)
    cfg = pick_config(N, D, V, dtype, h.device).with_(chunk_cols=512)
    for config in (None, cfg):
        loss, lse, ent = triton_forward(h, w, b, t, opts, config=config, with_entropy=True)
        assert rel_err(loss, rl) < 1e-5 and rel_err(lse, rlse) < 1e-5 and rel_err(ent, rent) < 1e-5
        dh, dw, db = triton_backward(g, gl, h, w, b, t, lse, opts, config=config, grad_entropy=ge, entropy=ent)
        assert rel_err(dh, rdh) < tol and rel_err(dw, rdw) < tol and rel_err(db, rdb) < tol
    # the no-grad forward (cuBLAS logits in the input dtype + the row kernel): 16-bit logits as eager's
    _, lse_c, ent_c = triton_chunked_forward(h, w, b, t, opts, tokens_per_chunk=300, with_entropy=True)
    assert rel_err(ent_c, rent) < (1e-5 if dtype == torch.float32 else 1e-2) and rel_err(lse_c, rlse) < 1e-2


def test_no_grad_scoring_takes_the_chunked_forward_and_matches_eager():
    """Reference-model scoring under no_grad: forward only (the chunked kernel), entropy and log-probabilities
    within 1.5x of eager bf16's error against float64."""
    import torch.nn.functional as F

    import cce_inductor
    from cce_inductor.reference import reference_with_entropy

    N, D, V = 4096, 2048, 128256
    h, w, t = model_inputs(N, D, V, seed=8)
    with torch.no_grad():
        logp, ent = cce_inductor.linear_log_probs(h, w, t, return_entropy=True)
        z = F.log_softmax((h @ w.T).float(), -1)
        e_logp, e_ent = z.gather(-1, t[:, None]).squeeze(-1), -(z.exp() * z).sum(-1)
    loss, _, rent, *_ = reference_with_entropy(h, w, None, t, LossOptions())
    assert rel_err(logp, -loss) <= 1.5 * rel_err(e_logp, -loss) + 1e-6
    assert rel_err(ent, rent) <= 1.5 * rel_err(e_ent, rent) + 1e-6
