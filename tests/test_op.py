"""The op on its CPU path (chunked PyTorch): every option against a float64 reference, fuzzing, opcheck,
torch.compile, autocast and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cce_inductor
from cce_inductor.reference import reference_linear_cross_entropy
from cce_inductor.select import use_triton_on_cpu
from cce_inductor.torch_impl import common as torch_common

from helpers import (TRITON_ON_CPU, float64_reference, fuzz_examples, loss_and_grads, make_inputs, option_grid,
                     option_id, rel_err)


@pytest.mark.parametrize("kw", option_grid(), ids=option_id)
def test_every_option_matches_float64_in_fp32(kw):
    kw = dict(kw)
    bias, return_lse = kw.pop("bias"), kw["return_lse"]
    h, w, b, t = make_inputs((3, 7), 16, 37, torch.float32, bias=bias, scale=4.0)
    loss, lse, grads = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t, **kw)
    rloss, rlse, rgrads = float64_reference(h, w, b, t, **kw)
    assert loss.dtype == torch.float32 and loss.shape == rloss.shape
    assert rel_err(loss, rloss) < 1e-5
    if return_lse:
        assert lse.shape == t.shape and rel_err(lse, rlse) < 1e-5
    for g, r in zip(grads, rgrads):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap,label_smoothing", [(None, 0.0), (30.0, 0.1)])
def test_16bit_gradients_as_exact_as_eager(dtype, softcap, label_smoothing):
    """Relative error vs float64 within 1.5x of eager PyTorch's own at the same dtype."""
    kw = dict(softcap=softcap, label_smoothing=label_smoothing)
    h, w, b, t = make_inputs((64,), 48, 301, dtype, bias=True, scale=8.0)
    _, _, grads = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t, **kw)
    _, _, eager = loss_and_grads(reference_linear_cross_entropy, h, w, b, t, **kw)
    _, _, ref = float64_reference(h, w, b, t, **kw)
    for g, e, r in zip(grads, eager, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 1.5 * rel_err(e, r) + 1e-6


def test_chunking_does_not_change_results(monkeypatch):
    h, w, b, t = make_inputs((50,), 8, 23, torch.float64, bias=True)
    full = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t, reduction="none", return_lse=True)
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 23 * 3)  # 3 rows per chunk, last chunk partial
    chunked = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t, reduction="none", return_lse=True)
    for a, c in zip([full[0], full[1], *full[2]], [chunked[0], chunked[1], *chunked[2]]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@settings(max_examples=fuzz_examples())
@given(
    n=st.integers(1, 40), d=st.integers(1, 33), v=st.integers(2, 70),
    ignore_frac=st.sampled_from([0.0, 0.5, 0.95]),
    bias=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.3]), softcap=st.sampled_from([None, 1.5, 20.0]),
    logit_scale=st.sampled_from([1.0, 0.25, 3.0]), ignore_index=st.sampled_from([-100, -1, 0]),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_shapes_and_options(n, d, v, ignore_frac, bias, reduction, label_smoothing, softcap, logit_scale,
                                   ignore_index, seed):
    h, w, b, t = make_inputs((n,), d, v, torch.float32, bias=bias, ignore_frac=ignore_frac, seed=seed, scale=3.0)
    t[t == -100] = ignore_index
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
              ignore_index=ignore_index, return_lse=True)
    loss, lse, grads = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t, **kw)
    rloss, rlse, rgrads = float64_reference(h, w, b, t, **kw)
    if reduction == "mean" and bool((t == ignore_index).all()):
        assert math.isnan(loss.item()) and math.isnan(rloss.item())  # eager's 0/0
        return
    assert rel_err(loss, rloss) < 1e-5 or (loss - rloss).abs().max() < 1e-6
    assert rel_err(lse, rlse) < 1e-5
    for g, r in zip(grads, rgrads):
        assert rel_err(g, r) < 1e-4 or (g.double() - r).abs().max() < 1e-6


def test_all_ignored_mean_is_nan_like_eager():
    h, w, _, t = make_inputs((5,), 4, 6, torch.float32)
    t[:] = -100
    assert math.isnan(cce_inductor.linear_cross_entropy(h, w, t).item())
    assert cce_inductor.linear_cross_entropy(h, w, t, reduction="sum").item() == 0.0


def test_gradcheck_float64_all_outputs():
    h, w, b, t = make_inputs((4, 3), 5, 7, torch.float64, bias=True)
    fn = lambda h, w, b: cce_inductor.linear_cross_entropy(  # noqa: E731
        h, w, t, bias=b, reduction="none", return_lse=True, softcap=2.0, label_smoothing=0.1, logit_scale=0.8)
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias):
    h, w, b, t = make_inputs((6,), 8, 11, torch.float32, bias=bias)
    torch.library.opcheck(torch.ops.cce.linear_cross_entropy_forward.default,
                          (h, w, b, t, -100, 0.1, 3.0, 1.0))
    _, lse, _, _, _ = torch.ops.cce.linear_cross_entropy_forward(h, w, b, t, -100, 0.1, 3.0, 1.0)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.cce.linear_cross_entropy_backward.default,
                          (g, g.clone(), h.detach(), w.detach(), None if b is None else b.detach(), t, lse.detach(),
                           -100, 0.1, 3.0, 1.0))


def test_compiles_fullgraph_with_dynamic_shapes_and_no_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda h, w, t: cce_inductor.linear_cross_entropy(h, w, t, softcap=5.0),
                       backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in (5, 9, 17):
        h, w, _, t = make_inputs((n,), 8, 13, torch.float32)
        loss = fn(h, w, t)
        loss.backward()
        ref = reference_linear_cross_entropy(h.detach(), w.detach(), t, softcap=5.0)
        torch.testing.assert_close(loss.detach(), ref)
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1], "a new sequence length recompiled"
    # one op call: the fast path's (a scalar loss with a gradient) or the low-memory forward
    assert sum(("cce.linear_cross_entropy_forward" in str(g.code) or "cce.fast_linear_cross_entropy" in str(g.code))
               for g in counter.graphs) == 1


def test_compiled_with_inductor_saves_no_logits():
    """The forward saves hidden, weight, targets and lse; nothing of size N×V."""
    h, w, _, t = make_inputs((16,), 8, 64, torch.float32)
    fn = torch.compile(lambda h, w, t: cce_inductor.linear_cross_entropy(h, w, t), fullgraph=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss = fn(h, w, t)
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference_linear_cross_entropy(h.detach(), w.detach(), t))
    assert saved and max(saved) < 16 * 64, f"something of N*V elements was saved: {saved}"
    _, _, (ref_dh, ref_dw) = loss_and_grads(reference_linear_cross_entropy, h.detach().requires_grad_(),
                                            w.detach().requires_grad_(), None, t, upstream_seed=None)
    torch.testing.assert_close(h.grad, ref_dh)
    torch.testing.assert_close(w.grad, ref_dw)


def test_autocast_casts_like_linear():
    """Under autocast the op sees bf16 operands (as F.linear would) and its gradients are as exact as
    eager autocast's against float64 on the bf16-rounded inputs."""
    h, w, b, t = make_inputs((2, 5), 16, 40, torch.float32, bias=True, scale=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, grads = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, b, t)
        eager_loss, _, eager = loss_and_grads(reference_linear_cross_entropy, h, w, b, t)
        out = cce_inductor.linear_cross_entropy(h, w, t, bias=b)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    ref_loss, _, ref = float64_reference(h.detach().bfloat16(), w.detach().bfloat16(), b.detach().bfloat16(), t)
    assert rel_err(out, ref_loss) <= 1.5 * rel_err(eager_loss, ref_loss) + 1e-6
    for g, e, r in zip(grads, eager, ref):
        assert rel_err(g, r) <= 1.5 * rel_err(e, r) + 1e-6


def test_non_contiguous_inputs():
    h, w, _, t = make_inputs((6, 4), 10, 9, torch.float64)
    h_nc = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, other strides
    w_nc = w.detach().t().contiguous().t().requires_grad_()
    a = loss_and_grads(cce_inductor.linear_cross_entropy, h, w, None, t)
    c = loss_and_grads(cce_inductor.linear_cross_entropy, h_nc, w_nc, None, t)
    torch.testing.assert_close(a[0], c[0])
    for x, y in zip(a[2], c[2]):
        torch.testing.assert_close(x, y)


# ---- bad input: a clear error naming the problem --------------------------------------------------------

def _good():
    h, w, b, t = make_inputs((4,), 6, 10, torch.float32, bias=True)
    return h, w, b, t


@pytest.mark.parametrize("mutate,match", [
    (lambda h, w, b, t: (h, w, b, torch.tensor([0, 1, 10, 2])), r"target 10 .* outside the vocabulary \[0, 10\)"),
    (lambda h, w, b, t: (h, w, b, torch.tensor([0, -5, 1, 2])), r"target -5 .* outside"),
    (lambda h, w, b, t: (h, w, b, t.float()), r"integer class indices"),
    (lambda h, w, b, t: (h, w.double(), b, t), r"weight dtype torch.float64 does not match hidden dtype"),
    (lambda h, w, b, t: (h, w, b.half(), t), r"bias dtype"),
    (lambda h, w, b, t: (h, w[:, :5], b, t), r"hidden's last dim \(6\) must equal weight's second dim"),
    (lambda h, w, b, t: (h, w[None], b, t), r"weight must have shape \[V, D\]"),
    (lambda h, w, b, t: (h, w, b[:3], t), r"bias must have shape \[V\]"),
    (lambda h, w, b, t: (h, w, b, t[:3]), r"targets shape \(3,\) must equal hidden's leading shape \(4,\)"),
    (lambda h, w, b, t: (h.long(), w, b, t), r"hidden must be a floating-point tensor"),
])
def test_bad_input_gets_a_clear_error(mutate, match):
    h, w, b, t = mutate(*_good())
    with pytest.raises((ValueError, TypeError), match=match):
        cce_inductor.linear_cross_entropy(h, w, t, bias=b)


def test_bad_options_get_a_clear_error():
    h, w, b, t = _good()
    with pytest.raises(ValueError, match="reduction must be one of"):
        cce_inductor.linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cce_inductor.linear_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap must be a finite positive"):
        cce_inductor.linear_cross_entropy(h, w, t, softcap=-1.0)


def test_out_of_range_target_under_compile_is_nan_not_garbage():
    h, w, _, t = make_inputs((4,), 6, 10, torch.float32)
    t = torch.tensor([0, 1, 12, 2])
    fn = torch.compile(lambda h, w, t: cce_inductor.linear_cross_entropy(h, w, t, reduction="none"),
                       backend="aot_eager", fullgraph=True)
    out = fn(h, w, t)
    assert math.isnan(out[2].item()) and not out[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("triton_on_cpu", TRITON_ON_CPU)
def test_lse_alone_backpropagates(triton_on_cpu):
    """Only the lse output used (a z-loss with the loss discarded): the loss's gradient arrives as None."""
    h, w, _, t = make_inputs((5,), 16, 40, torch.float32)
    with use_triton_on_cpu(triton_on_cpu):
        _, lse = cce_inductor.linear_cross_entropy(h, w, t, reduction="none", return_lse=True)
        dh, dw = torch.autograd.grad((lse**2).sum(), [h, w])
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.logsumexp(h64 @ w64.T, -1)
    rdh, rdw = torch.autograd.grad((ref**2).sum(), [h64, w64])
    assert rel_err(dh, rdh) < 1e-5 and rel_err(dw, rdw) < 1e-5


@pytest.mark.parametrize("triton_on_cpu", TRITON_ON_CPU)
@pytest.mark.parametrize("compiled", [False, True])
def test_frozen_weight_skips_its_gradient(triton_on_cpu, compiled):
    """A frozen lm-head (LoRA, frozen embeddings): d_hidden exact, no d_weight computed or returned."""
    h, w, b, t = make_inputs((3, 5), 16, 40, torch.float32, bias=True)
    w = w.detach()  # frozen
    fn = lambda h, w, t, b: cce_inductor.linear_cross_entropy(h, w, t, bias=b, softcap=3.0)  # noqa: E731
    if compiled:
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with use_triton_on_cpu(triton_on_cpu):
        loss = fn(h, w, t, b)
        loss.backward()
    assert w.grad is None
    _, _, (rdh, _, rdb) = float64_reference(h, w, b, t, softcap=3.0, upstream_seed=None)
    assert rel_err(h.grad, rdh) < 1e-5 and rel_err(b.grad, rdb) < 1e-5
    out = torch.ops.cce.linear_cross_entropy_backward(torch.ones(15), None, h.detach().reshape(15, 16), w, None,
                                                      t.reshape(-1), torch.zeros(15), -100, 0.0, None, 1.0, False)
    assert out[1].numel() == 0


def test_opcheck_backward_without_d_weight():
    h, w, _, t = make_inputs((6,), 8, 11, torch.float32)
    _, lse, _, _, _ = torch.ops.cce.linear_cross_entropy_forward(h, w, None, t, -100, 0.0, None, 1.0)
    torch.library.opcheck(torch.ops.cce.linear_cross_entropy_backward.default,
                          (torch.randn(6), None, h.detach(), w.detach(), None, t, lse.detach(),
                           -100, 0.0, None, 1.0, False))


def test_small_integer_targets_are_accepted():
    h, w, _, t = make_inputs((6,), 8, 11, torch.float32, ignore_frac=0.0)
    ref = cce_inductor.linear_cross_entropy(h, w, t)
    torch.testing.assert_close(cce_inductor.linear_cross_entropy(h, w, t.to(torch.uint8)), ref)
    torch.testing.assert_close(cce_inductor.linear_cross_entropy(h, w, t.to(torch.int16)), ref)
