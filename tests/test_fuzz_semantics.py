"""Property: for generated programs — the matched forms combined with in-place writes, aliases, casts and
biases at random points — ``backend="cce"`` computes what eager computes, or reports the loss as left alone.

A program is: hidden/weight/bias → [hazard A] → matmul → [hazard B] → epilogue (scale, softcap) →
[z-loss] → [hazard C] → cast → loss, where a hazard is an in-place write (to the logits, a view of them,
through ``_foreach_mul_`` or inside a checkpointed body, to the hidden states, the weight, the bias, the
targets, an unrelated tensor), a hook on the logits, a step under ``no_grad``, or nothing; the z-loss
is a ``logsumexp`` of the logits (plain, under ``no_grad``, of a bf16 copy, or with a ``no_grad`` user),
added to the loss. The
property, checked for each example: compiling never fails; if the loss was rewritten, the loss, whether
it requires grad, and every gradient equal eager's; if it was not, the pass reported a miss with a reason.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import _reset_dynamo, compile_counting, fuzz_examples  # noqa: F401

# Budget: 1.5x the hypothesis profile's (conftest.py): quick 38, ci 225, long 1500 (random) examples.

WRITES = ["none", "logits_setitem", "logits_mul_", "logits_view_setitem", "logits_masked_fill_", "logits_iadd",
          "logits_foreach_mul_", "logits_checkpoint_mul_", "logits_hook", "no_grad_step",
          "hidden_add_", "hidden_base_mul_", "weight_mul_", "bias_zero_", "targets_setitem", "unrelated_add_"]
# Hazards that eager autograd itself cannot differentiate through, or (``_foreach_mul_`` on a tensor that
# requires grad: torch 2.13's torch.compile drops the factor from the gradient, with or without the pass)
# where plain torch.compile's gradients differ from eager's: those programs run without grad.
NO_GRAD_WRITES = ("hidden", "weight", "bias", "logits_checkpoint_mul_", "logits_foreach_mul_")
ZLOSS = [None, "plain", "no_grad", "bf16", "no_grad_user"]
CASTS = ["none", "float", "double", "bfloat16", "half"]


@st.composite
def programs(draw):
    p = dict(
        B=draw(st.integers(1, 3)), T=draw(st.sampled_from([2, 3, 5])), D=draw(st.sampled_from([3, 5, 8])),
        V=draw(st.sampled_from([5, 11, 17])),
        matmul=draw(st.sampled_from(["linear", "linear_bias", "at_T", "plus_bias", "einsum"])),
        scale=draw(st.sampled_from([None, 0.5, -2.0])), softcap=draw(st.sampled_from([None, 3.0])),
        cast=draw(st.sampled_from(CASTS)), write=draw(st.sampled_from(WRITES)),
        where=draw(st.sampled_from(["before_matmul", "after_matmul", "after_epilogue", "after_loss"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])), dtype=draw(st.sampled_from(["float64", "float32"])),
        zloss=draw(st.sampled_from(ZLOSS)),
        seed=draw(st.integers(0, 2 ** 16)),
    )
    return p


def _write(p, where, z, h, w, b, y, extra):
    """Apply the program's hazard if it sits at ``where``; returns the (possibly new) logits."""
    if p["where"] != where or p["write"] == "none" or z is None and p["write"].startswith(("logits", "no_grad")):
        return z
    kind = p["write"]
    if kind == "logits_setitem":
        z[..., 0] = 4.0
    elif kind == "logits_mul_":
        z.mul_(1.5)
    elif kind == "logits_view_setitem":
        z.view(-1, z.shape[-1])[:, -1] = -3.0
    elif kind == "logits_masked_fill_":
        z.masked_fill_(torch.arange(z.shape[-1]) % 2 == 1, -2.0)
    elif kind == "logits_iadd":
        z += 0.25
    elif kind == "logits_foreach_mul_":
        torch._foreach_mul_([z], 1.5)
    elif kind == "logits_checkpoint_mul_":
        from torch.utils.checkpoint import checkpoint

        checkpoint(lambda t: t.mul_(1.5).sum(), z, use_reentrant=False)
    elif kind == "logits_hook":
        if z.requires_grad:
            z.register_hook(lambda g: g * 2.0)
    elif kind == "no_grad_step":
        with torch.no_grad():
            z = z * 1.0
    elif kind == "hidden_add_":
        h.add_(0.5)
    elif kind == "hidden_base_mul_":
        extra["base"].mul_(2.0)
    elif kind == "weight_mul_":
        w.mul_(0.5)
    elif kind == "bias_zero_" and b is not None:
        b.zero_()
    elif kind == "targets_setitem":
        y[..., 0] = 0
    elif kind == "unrelated_add_":
        extra["scratch"].add_(1.0)
    return z


def build(p):
    """(fn, args, differentiable): the program as an eager function of (hidden, weight, bias, targets)."""
    g = torch.Generator().manual_seed(p["seed"])
    dt = getattr(torch, p["dtype"])
    B, T, D, V = p["B"], p["T"], p["D"], p["V"]
    h = torch.randn(B, T, D, generator=g, dtype=dt)
    w = torch.randn(V, D, generator=g, dtype=dt) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=dt) * 0.3
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.2] = -100
    # Writes to the hidden states, weight or bias would break eager's own backward (version counter):
    # those programs run without grad and compare values only.
    # So do writes to the targets after the loss (the loss saved them).
    # So do writes to the logits after the z-loss's logsumexp read them (it saves them for its backward).
    logits_written = p["write"].startswith("logits") and p["write"] != "logits_hook"
    differentiable = not (p["write"].startswith(NO_GRAD_WRITES)
                          or (p["write"] == "targets_setitem" and p["where"] == "after_loss")
                          or (p["zloss"] is not None and logits_written
                              and p["where"] in ("after_epilogue", "after_loss")))

    def fn(h, w, b, y):
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            scratch = torch.zeros(2, dtype=h.dtype)
            base = torch.cat([h, h], dim=-1)
            hh = base[..., :D] if p["write"] == "hidden_base_mul_" else h.clone()
            extra = {"base": base, "scratch": scratch}
            ww, bb, yy = w.clone(), b.clone(), y.clone()
            _write(p, "before_matmul", None, hh, ww, bb, yy, extra)
            m = p["matmul"]
            if m == "linear":
                z = F.linear(hh, ww)
            elif m == "linear_bias":
                z = F.linear(hh, ww, bb)
            elif m == "at_T":
                z = hh @ ww.T
            elif m == "plus_bias":
                z = hh @ ww.T + bb
            else:
                z = torch.einsum("btd,vd->btv", hh, ww)
            z = _write(p, "after_matmul", z, hh, ww, bb, yy, extra)
            if p["scale"] is not None:
                z = z * p["scale"]
            if p["softcap"] is not None:
                z = p["softcap"] * torch.tanh(z / p["softcap"])
            zl = None
            if p["zloss"] is not None:  # read before hazard C (a write there lies between it and the loss)
                src = z.bfloat16() if p["zloss"] == "bf16" else z
                with torch.set_grad_enabled(p["zloss"] != "no_grad" and torch.is_grad_enabled()):
                    lse = torch.logsumexp(src, -1)
                    zl = (lse.float().square() * (1.0 + scratch[0])).mean()
                if p["zloss"] == "no_grad_user":  # a user of the logsumexp that carries no gradient
                    with torch.no_grad():
                        zl = zl * lse.float().mean()
            z = _write(p, "after_epilogue", z, hh, ww, bb, yy, extra)
            if p["cast"] != "none":
                z = getattr(z, p["cast"])()
            loss = F.cross_entropy(z.reshape(-1, V), yy.reshape(-1), reduction=p["reduction"])
            _write(p, "after_loss", z, hh, ww, bb, yy, extra)
            out = loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss
            out = out.sum() + scratch.sum()
            return out if zl is None else out + 1e-2 * zl.to(out.dtype)
    return fn, (h, w, b, y), differentiable


def _tolerance(p):
    low = p["cast"] in ("bfloat16", "half") or p["zloss"] == "bf16"
    if low:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=1e-6) if p["dtype"] == "float32" or p["cast"] == "float" else dict(rtol=1e-9,
                                                                                                  atol=1e-10)


@settings(max_examples=fuzz_examples(1.5))
@given(programs())
def test_rewrite_equals_eager_or_is_reported(p):
    torch._dynamo.reset()
    fn, (h, w, b, y), differentiable = build(p)

    def leaves():
        return [t.detach().clone().requires_grad_(differentiable) for t in (h, w, b)] + [y.clone()]
    eh, ew, eb, ey = leaves()
    want = fn(eh, ew, eb, ey)
    compiled, results = compile_counting(fn, fullgraph=False)
    ch, cw, cb, cy = leaves()
    got = compiled(ch, cw, cb, cy)  # compiling must not fail
    rewrites = sum(len(r.rewrites) for r in results)
    misses = [m for r in results for m in r.misses]
    if rewrites == 0:
        assert misses and all(m.reason for m in misses), (p, results)
    tol = _tolerance(p)
    torch.testing.assert_close(got, want, equal_nan=True, **tol, msg=lambda m: f"{p}\n{results}\n{m}")
    assert got.requires_grad == want.requires_grad, (p, results)
    if differentiable and want.requires_grad:
        gw = torch.autograd.grad(want, [eh, ew, eb], allow_unused=True)
        gg = torch.autograd.grad(got, [ch, cw, cb], allow_unused=True)
        for a, c in zip(gw, gg):
            if a is None:
                assert c is None or not c.abs().sum(), p
                continue
            torch.testing.assert_close(c, a, equal_nan=True, **tol, msg=lambda m: f"{p}\n{results}\n{m}")
