"""A LoRA adapter on the lm-head (``rewrite.low_rank``): ``h @ W.T + s·(u @ B.T)`` served as
``[h, s·u] @ [W, B].T``. Each form: one rewrite, loss and every gradient (h, W, A, B, bias) equal to eager's
(float64); each hazard: left alone with its reason. The parts are orthogonal (base spelling, term spelling, where the
scale stands, operand order, number of adapters); their combinations with epilogues, layouts, losses and
checkpointed regions are fuzzed in ``test_fuzz_rewrite`` (its ``lora`` matmul).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import _reset_dynamo, assert_left_alone, check, compile_counting  # noqa: F401

V, D, R = 13, 6, 3


def _inputs(seed=0, r=R, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 5, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) / D ** 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.3).requires_grad_()
    a = (torch.randn(r, D, generator=g, dtype=dtype) / D ** 0.5).requires_grad_()
    bb = torch.randn(V, r, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, :2] = -100
    return h, w, b, a, bb, y


BASES = {
    "linear": lambda h, w, b: F.linear(h, w),
    "linear_bias": lambda h, w, b: F.linear(h, w, b),
    "at_T": lambda h, w, b: h @ w.T,
}
TERMS = {  # u @ B.T in each matmul spelling
    "linear": lambda u, bb: F.linear(u, bb),
    "at_T": lambda u, bb: u @ bb.T,
    "matmul_t": lambda u, bb: torch.matmul(u, bb.t()),
}
SCALES = {  # where the adapter's scaling stands
    "after": lambda t: t * 2.0,
    "before": lambda t: 0.5 * t,
    "divided": lambda t: t / 3.0,
    "none": lambda t: t,
}


def _lora_logits(h, w, b, a, bb, base, term, scale, order, dropout=0.0):
    z = BASES[base](h, w, b)
    u = F.linear(F.dropout(h, dropout, training=dropout > 0), a)
    t = SCALES[scale](TERMS[term](u, bb))
    return z + t if order == "base_first" else t + z


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("term", list(TERMS))
def test_lora_spellings(base, term):
    _check_lora(base, term, "after", "base_first")


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("order", ["base_first", "term_first"])
def test_lora_scale_and_order(scale, order):
    _check_lora("linear", "linear", scale, order)


def _check_lora(base, term, scale, order):
    h, w, b, a, bb, y = _inputs()

    def f(h, w, b, a, bb, y):
        z = _lora_logits(h, w, b, a, bb, base, term, scale, order)
        return F.cross_entropy(z.float().view(-1, V), y.view(-1))
    r = check(f, (h, w, b, a, bb, y), 1, return_results=True)[0].rewrites[0]
    assert "LoRA (rank 3)" in r.spelling and r.D == D + R and not r.logits_kept


def test_two_adapters_and_an_epilogue():
    """Two adapters summed onto the lm-head, then a softcap, a cast and the shifted-slice layout."""
    h, w, b, a, bb, y = _inputs()
    a2 = torch.randn(2, D, dtype=torch.float64).requires_grad_()
    b2 = torch.randn(V, 2, dtype=torch.float64).requires_grad_()

    def f(h, w, a, bb, a2, b2, y):
        z = F.linear(h, w) + F.linear(F.linear(h, a), bb) * 2.0
        z = z + 0.25 * (F.linear(h, a2) @ b2.T)
        z = 5.0 * torch.tanh(z / 5.0)
        return F.cross_entropy(z[:, :-1].float().reshape(-1, V), y[:, 1:].reshape(-1))
    r = check(f, (h, w, a, bb, a2, b2, y), 1, return_results=True)[0].rewrites[0]
    assert "LoRA (rank 5)" in r.spelling and r.options["softcap"] == 5.0


def test_lora_z_loss_served():
    h, w, b, a, bb, y = _inputs()

    def f(h, w, a, bb, y):
        z = (F.linear(h, w) + F.linear(F.linear(h, a), bb) * 2.0).float()
        return F.cross_entropy(z.view(-1, V), y.view(-1)) + 1e-2 * z.logsumexp(-1).square().mean()
    assert check(f, (h, w, a, bb, y), 1, return_results=True)[0].rewrites[0].lse_served == 1


def test_frozen_lm_head():
    """LoRA's case: the lm-head weight frozen, only the adapter (and the hidden states) get gradients."""
    h, w, b, a, bb, y = _inputs()
    w = w.detach()

    def f(h, a, bb, y):
        z = F.linear(h, w) + F.linear(F.linear(h, a), bb) * 2.0
        return F.cross_entropy(z.view(-1, V), y.view(-1), reduction="sum")
    check(f, (h, a, bb, y), 1)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_lora_dropout_in_training_keeps_its_draw(p):
    """The adapter's dropout stays in the graph where it was (the op reads its result): the rewrite changes no
    random draw. Compared with the same program compiled without the rewrite, from the same seed (eager
    draws its dropout mask through another kernel)."""
    h, w, b, a, bb, y = _inputs()

    def f(h, w, a, bb, y):
        z = _lora_logits(h, w, None, a, bb, "linear", "linear", "after", "base_first", dropout=p)
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    compiled, results = compile_counting(f)
    torch.manual_seed(7)
    got = compiled(h, w, a, bb, y)
    got_g = torch.autograd.grad(got, [h, w, a, bb])
    torch._dynamo.reset()
    torch.manual_seed(7)
    want = torch.compile(f, backend="aot_eager", fullgraph=True)(h, w, a, bb, y)
    want_g = torch.autograd.grad(want, [h, w, a, bb])
    assert len(results[-1].rewrites) == 1
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for g, x in zip(got_g, want_g):
        torch.testing.assert_close(g, x, rtol=1e-9, atol=1e-10)
    if p == 0.0:
        torch.testing.assert_close(got, f(h, w, a, bb, y), rtol=1e-9, atol=1e-10)


# ---- hazards: left alone, with the reason ----------------------------------------------------------------

def test_write_to_the_down_projection_is_left_alone():
    """``u`` is read where the loss stands: a write to it after the adapter's matmul read it would change
    what the op sees and not what eager computed."""
    h, w, b, a, bb, y = _inputs()

    def f(h, w, a, bb, y):
        u = F.linear(h, a)
        z = F.linear(h, w) + F.linear(u, bb) * 2.0
        u.mul_(3.0)
        return F.cross_entropy(z.view(-1, V), y.view(-1)), u.sum()
    with torch.no_grad():
        assert_left_alone(f, (h, w, a, bb, y), "writes to the low-rank (LoRA) down-projection")


def test_write_to_hidden_between_the_matmuls_is_left_alone():
    h, w, b, a, bb, y = _inputs()

    def f(h, w, a, bb, y):
        hh = h.clone()
        z = F.linear(hh, w)
        hh.add_(1.0)
        z = z + F.linear(F.linear(hh, a), bb) * 2.0
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    with torch.no_grad():  # (eager's own backward would refuse the write)
        assert_left_alone(f, (h, w, a, bb, y), "writes to the hidden states")


def test_write_to_the_up_projection_weight_is_left_alone():
    h, w, b, a, bb, y = _inputs()

    def f(h, w, a, bb, y):
        bc = bb.clone()
        z = F.linear(h, w) + F.linear(F.linear(h, a), bc) * 2.0
        bc.mul_(2.0)
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    with torch.no_grad():
        assert_left_alone(f, (h, w, a, bb, y), "writes to the low-rank (LoRA) up-projection weight")


def test_tensor_scale_is_named():
    h, w, b, a, bb, y = _inputs()
    s = torch.tensor(2.0, dtype=torch.float64)

    def f(h, w, a, bb, s, y):
        z = F.linear(h, w) + F.linear(F.linear(h, a), bb) * s
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    assert_left_alone(f, (h, w, a, bb, s, y), "a low-rank (LoRA) adapter on the lm-head (or another matmul")


def test_bias_on_the_up_projection_is_named():
    h, w, b, a, bb, y = _inputs()

    def f(h, w, b, a, bb, y):
        z = F.linear(h, w) + F.linear(F.linear(h, a), bb, b) * 2.0
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    assert_left_alone(f, (h, w, b, a, bb, y), "with a bias on its up-projection")


def test_float32_adapter_on_a_bfloat16_head_is_left_alone():
    """Eager adds a float32 term to bf16 logits in float32; the op would compute the base in bf16's dtype."""
    h, w, b, a, bb, y = _inputs(dtype=torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()

    def f(hb, wb, h, a, bb, y):
        z = F.linear(hb, wb) + F.linear(F.linear(h, a), bb) * 2.0
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    assert_left_alone(f, (hb, wb, h, a, bb, y), "but it computes in torch.float32")
