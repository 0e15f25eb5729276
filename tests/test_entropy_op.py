"""The op's per-token outputs for RL scoring on its PyTorch path: the entropy (``return_entropy``) and
``linear_log_probs``, against the float64 reference, with the gradient of every output; opcheck of the changed
ops; the forward-only call under ``no_grad``; bad input. (The Triton kernels: ``test_entropy_kernels.py``.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import cce_inductor
from cce_inductor.options import NO_IGNORE_INDEX
from cce_inductor.paths import fast_path_refusal
from cce_inductor.reference import reference_linear_cross_entropy

from helpers import make_inputs, option_grid, option_id, rel_err


def outputs_and_grads(fn, hidden, weight, bias, targets, seed=1, **kw):
    """Every output of ``fn(hidden, weight, targets, bias=bias, **kw)`` and the gradients of
    ``Σ_k Σ (out_k * g_k)`` with a random per-token upstream ``g_k`` for each output."""
    out = fn(hidden, weight, targets, bias=bias, **kw)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    params = [p for p in (hidden, weight, bias) if p is not None and p.requires_grad]
    return outs, torch.autograd.grad(total, params)


def float64_outputs_and_grads(hidden, weight, bias, targets, **kw):
    up = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return outputs_and_grads(reference_linear_cross_entropy, up(hidden), up(weight), up(bias), targets, **kw)


def eager_log_probs_and_entropy(z, y):
    """The eager code the RL forms are: per-token log-probabilities and entropy of float32 logits."""
    logp = F.log_softmax(z if z.dtype == torch.float64 else z.float(), -1)
    return logp.gather(-1, y[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


# ---- the entropy output: every option, float32 against float64 -------------------------------------

@pytest.mark.parametrize("kw", option_grid(reductions=("none", "mean")), ids=option_id)
def test_entropy_with_every_option_matches_float64(kw):
    kw = dict(kw)
    bias = kw.pop("bias")
    h, w, b, t = make_inputs((3, 7), 16, 37, torch.float32, bias=bias, scale=4.0)
    outs, grads = outputs_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t, return_entropy=True, **kw)
    routs, rgrads = float64_outputs_and_grads(h, w, b, t, return_entropy=True, **kw)
    assert len(outs) == len(routs) == 2 + kw["return_lse"]
    entropy = outs[-1]
    assert entropy.shape == t.shape and entropy.dtype == torch.float32 and (entropy > 0).all()
    for o, r in zip(outs, routs):
        assert o.shape == r.shape and rel_err(o, r) < 1e-5
    for g, r in zip(grads, rgrads):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (30.0, 0.8)])
def test_16bit_entropy_and_log_prob_gradients_as_exact_as_eager(dtype, softcap, scale):
    """Per-token upstream gradients of log-probabilities and entropy (an RL loss): relative error vs float64
    within 1.5x of eager PyTorch's own at the same dtype."""
    kw = dict(softcap=softcap, logit_scale=scale, return_entropy=True)
    h, w, b, t = make_inputs((64,), 48, 301, dtype, bias=True, scale=8.0, ignore_frac=0.0)
    _, grads = outputs_and_grads(cce_inductor.linear_log_probs, h, w, b, t, **kw)
    _, eager = outputs_and_grads(eager_reference, h, w, b, t, **kw)
    up = [None if x is None else x.detach().double().requires_grad_() for x in (h, w, b)]
    _, ref = outputs_and_grads(eager_reference, *up, t, **kw)
    for g, e, r in zip(grads, eager, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 1.5 * rel_err(e, r) + 1e-6


def eager_reference(h, w, t, **kw):
    """(log-probabilities, entropy) by the eager expression (the reference's loss with the other sign)."""
    return _neg_first(reference_linear_cross_entropy(h, w, t, reduction="none", **kw))


def _neg_first(out):
    return (-out[0], *out[1:])


def test_entropy_of_peaked_rows_is_as_exact_as_eager():
    """Nearly one-hot rows (large logits): the entropy is tiny, and a formula ``lse - E[z]`` would cancel; the op
    keeps its sums relative to the row max, so its error stays within eager float32's."""
    h, w, b, t = make_inputs((40,), 32, 500, torch.float32, bias=False, scale=60.0, requires_grad=False,
                             ignore_frac=0.0)
    z = h @ w.T
    want = -(F.softmax(z.double(), -1) * F.log_softmax(z.double(), -1)).sum(-1)
    eager = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
    _, got = cce_inductor.linear_log_probs(h, w, t, return_entropy=True)
    assert want.min() < 1e-3  # the case this is about
    assert rel_err(got, want) <= 1.5 * rel_err(eager, want) + 1e-7, (rel_err(got, want), rel_err(eager, want))


def test_entropy_alone_backpropagates():
    """Only the entropy used (a bonus, the loss discarded): the loss's and the lse's gradients arrive as None."""
    h, w, _, t = make_inputs((5,), 16, 40, torch.float32, ignore_frac=0.0)
    entropy = cce_inductor.linear_log_probs(h, w, None, return_entropy=True)
    dh, dw = torch.autograd.grad((entropy ** 2).sum(), [h, w])
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = h64 @ w64.T
    ref = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
    rdh, rdw = torch.autograd.grad((ref ** 2).sum(), [h64, w64])
    assert rel_err(entropy, ref) < 1e-6 and rel_err(dh, rdh) < 1e-5 and rel_err(dw, rdw) < 1e-5


def test_frozen_weight_with_entropy_skips_its_gradient():
    h, w, b, t = make_inputs((3, 5), 16, 40, torch.float32, bias=True, ignore_frac=0.0)
    w = w.detach()
    outs, (dh, db) = outputs_and_grads(cce_inductor.linear_log_probs, h, w, b, t, return_entropy=True, softcap=3.0)
    _, (rdh, rdb) = outputs_and_grads(eager_reference, h.detach().double().requires_grad_(), w.double(),
                                      b.detach().double().requires_grad_(), t, return_entropy=True, softcap=3.0)
    assert rel_err(dh, rdh) < 1e-5 and rel_err(db, rdb) < 1e-5


def test_entropy_under_torch_func_grad_and_vmap():
    """The autograd.Function form (torch.func transforms) carries the entropy output and its gradient too."""
    h, w, b, y = make_inputs((3, 4), 8, 19, torch.float64, bias=True, ignore_frac=0.0, requires_grad=False)

    def op(h, w, b):
        logp, ent = cce_inductor.linear_log_probs(h, w, y, bias=b, return_entropy=True, softcap=2.0)
        return (logp * 0.3 + ent).sum()

    def ref(h, w, b):
        logp, ent = eager_reference(h, w, y, bias=b, return_entropy=True, softcap=2.0)
        return (logp * 0.3 + ent).sum()
    for g, r in zip(torch.func.grad(op, argnums=(0, 1, 2))(h, w, b), torch.func.grad(ref, argnums=(0, 1, 2))(h, w, b)):
        assert rel_err(g, r) < 1e-10
    hs = torch.randn(2, *h.shape, dtype=h.dtype)
    got = torch.func.vmap(lambda hh: cce_inductor.linear_log_probs(hh, w, None, bias=b, return_entropy=True))(hs)
    want = torch.stack([eager_reference(hh, w, y, bias=b, return_entropy=True)[1] for hh in hs])
    assert rel_err(got, want) < 1e-10


# ---- linear_log_probs ---------------------------------------------------------------------------

def test_log_probs_equal_the_gather_of_log_softmax_with_a_temperature():
    """``linear_log_probs(h, W, y, logit_scale=1/T)`` is ``gather(log_softmax(h @ W.T / T))``, values and grads."""
    T = 0.7
    h, w, _, y = make_inputs((2, 6), 8, 29, torch.float64, bias=False, ignore_frac=0.0)

    def eager(h, w, y, bias=None):
        return eager_log_probs_and_entropy((h @ w.T) / T, y)
    outs, grads = outputs_and_grads(cce_inductor.linear_log_probs, h, w, None, y, logit_scale=1 / T,
                                    return_entropy=True)
    routs, rgrads = outputs_and_grads(eager, h, w, None, y)
    for o, r in zip(outs + list(grads), routs + list(rgrads)):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


def test_log_probs_outputs_in_order_and_without_targets():
    h, w, _, y = make_inputs((2, 3), 8, 29, torch.float64, bias=False, ignore_frac=0.0, requires_grad=False)
    logp, lse, entropy = cce_inductor.linear_log_probs(h, w, y, return_lse=True, return_entropy=True)
    want_logp, want_entropy = eager_log_probs_and_entropy(h @ w.T, y)
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(lse, torch.logsumexp(h @ w.T, -1))
    torch.testing.assert_close(entropy, want_entropy)
    only = cce_inductor.linear_log_probs(h, w, None, return_entropy=True)
    torch.testing.assert_close(only, want_entropy)
    lse2, entropy2 = cce_inductor.linear_log_probs(h, w, None, return_lse=True, return_entropy=True)
    torch.testing.assert_close(lse2, lse) and torch.testing.assert_close(entropy2, entropy)
    torch.testing.assert_close(cce_inductor.linear_log_probs(h, w, y), want_logp)


def test_ignore_index_gives_zero_log_probability_as_cross_entropy_does():
    h, w, _, y = make_inputs((10,), 8, 13, torch.float64, ignore_frac=0.3, ignore_index=-100)
    got = cce_inductor.linear_log_probs(h, w, y, ignore_index=-100)
    want = -F.cross_entropy(h @ w.T, y, reduction="none")
    torch.testing.assert_close(got, want)
    assert (got[y == -100] == 0).all()


def test_every_target_is_read_without_ignore_index():
    """The default reads every row, as torch.gather does: an index outside [0, V) (even -100) raises eagerly,
    and is NaN (never a silent 0) where the check cannot run."""
    h, w, _, y = make_inputs((6,), 8, 13, torch.float32, ignore_frac=0.0)
    y[2] = -100
    with pytest.raises(ValueError, match=r"target -100 at position \(2,\) is outside the vocabulary \[0, 13\) "
                                         r"\(every row is read"):
        cce_inductor.linear_log_probs(h, w, y)
    fn = torch.compile(lambda h, w, y: cce_inductor.linear_log_probs(h, w, y), backend="aot_eager", fullgraph=True)
    out = fn(h, w, y)
    assert math.isnan(out[2].item()) and not out[[0, 1, 3, 4, 5]].isnan().any()


def test_small_integer_targets():
    h, w, _, y = make_inputs((6,), 8, 13, torch.float32, ignore_frac=0.0)
    ref = cce_inductor.linear_log_probs(h, w, y)
    for dt in (torch.uint8, torch.int16, torch.int32):
        torch.testing.assert_close(cce_inductor.linear_log_probs(h, w, y.to(dt)), ref)


def test_no_grad_scoring_is_a_forward_only():
    """Reference-model scoring: under no_grad the op runs its forward alone and nothing is saved."""
    h, w, _, y = make_inputs((4, 5), 8, 40, torch.float32, ignore_frac=0.0)
    calls = []
    real = torch.ops.cce.linear_cross_entropy_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("for_backward"))
        return real(*args, **kwargs)
    torch.ops.cce.linear_cross_entropy_forward = spy
    try:
        with torch.no_grad():
            logp, entropy = cce_inductor.linear_log_probs(h, w, y, return_entropy=True)
    finally:
        torch.ops.cce.linear_cross_entropy_forward = real
    assert calls == [False] and logp.grad_fn is None and entropy.grad_fn is None
    want_logp, want_entropy = eager_log_probs_and_entropy(h.detach() @ w.detach().T, y)
    torch.testing.assert_close(logp, want_logp) and torch.testing.assert_close(entropy, want_entropy)


def test_compiled_log_probs_and_entropy_save_no_logits():
    """fullgraph, dynamic shapes: one op call, no recompile over sequence lengths, nothing N×V saved."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def fn(h, w, y):
        logp, entropy = cce_inductor.linear_log_probs(h, w, y, return_entropy=True, softcap=5.0)
        return (logp * 0.5).sum() - 0.01 * entropy.sum()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in (9, 17, 33):  # (N×V above the weight's V×D)
        h, w, _, y = make_inputs((n,), 8, 64, torch.float32, ignore_frac=0.0)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            out = compiled(h, w, y)
        got = torch.autograd.grad(out, [h, w])
        want = torch.autograd.grad(fn(h, w, y), [h, w])
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)
        assert saved and max(saved) < n * 64, saved
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1], "a new sequence length recompiled"
    assert sum("cce.linear_cross_entropy_forward" in str(g.code) for g in counter.graphs) == 1


# ---- the ops' schemas and the fast-path rule -------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_with_entropy(bias):
    h, w, b, t = make_inputs((6,), 8, 11, torch.float32, bias=bias)
    torch.library.opcheck(torch.ops.cce.linear_cross_entropy_forward.default,
                          (h, w, b, t, -100, 0.1, 3.0, 1.0), dict(with_entropy=True))
    _, lse, entropy, _, _ = torch.ops.cce.linear_cross_entropy_forward(h, w, b, t, -100, 0.1, 3.0, 1.0,
                                                                       with_entropy=True)
    assert entropy.shape == (6,)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.cce.linear_cross_entropy_backward.default,
                          (None, None, h.detach(), w.detach(), None if b is None else b.detach(), t, lse.detach(),
                           -100, 0.1, 3.0, 1.0), dict(grad_entropy=g, entropy=entropy.detach()))


def test_forward_without_entropy_returns_an_empty_third_output():
    h, w, _, t = make_inputs((6,), 8, 11, torch.float32)
    loss, lse, entropy, _, _ = torch.ops.cce.linear_cross_entropy_forward(h, w, None, t, -100, 0.0, None, 1.0)
    assert entropy.numel() == 0 and loss.shape == lse.shape == (6,)


def test_fast_path_refuses_the_entropy():
    assert fast_path_refusal("auto", "mean", False, True) is None
    assert "entropy" in fast_path_refusal("auto", "mean", False, True, True)
    h, w, _, t = make_inputs((6,), 8, 11, torch.float32)
    with cce_inductor.config.patch(path="fast"):  # a scalar loss + an entropy: the low-memory op serves both
        loss, entropy = cce_inductor.linear_cross_entropy(h, w, t, return_entropy=True)
    want, want_entropy = reference_linear_cross_entropy(h, w, t, return_entropy=True)
    torch.testing.assert_close(loss, want) and torch.testing.assert_close(entropy, want_entropy)


def test_bad_input_gets_a_clear_error():
    h, w, _, t = make_inputs((6,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="computes nothing"):
        cce_inductor.linear_log_probs(h, w, None)
    with pytest.raises(ValueError, match="grad_entropy needs the forward's entropy"):
        torch.ops.cce.linear_cross_entropy_backward(None, None, h.detach(), w.detach(), None, t, torch.zeros(6),
                                                    -100, 0.0, None, 1.0, grad_entropy=torch.ones(6))
    with pytest.raises(ValueError, match="targets shape"):
        cce_inductor.linear_log_probs(h, w, t[:3])
    assert NO_IGNORE_INDEX == -(2 ** 63)
