"""The rewrite on CUDA through full Inductor (skipped without a GPU): bf16, autocast, install()."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import _reset_dynamo, counting_installed_pass  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _data(dtype, n_tok=(4, 257), d=128, v=1000):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(*n_tok, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(v, d, device="cuda", dtype=dtype, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, v, n_tok, device="cuda", generator=g)
    y[:, :3] = -100
    return h, w, y


def _run(fn, args, params):
    out = fn(*args)
    return out.detach(), torch.autograd.grad(out, params)


@pytest.mark.parametrize("mode", ["bf16", "autocast", "softcap_shift_fp32"])
def test_cuda_install_inductor(mode):
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    h, w, y = _data(dtype)
    v = w.shape[0]

    def fn(h, w, y):
        if mode == "autocast":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                z = h @ w.T
            return F.cross_entropy(z.float().view(-1, v), y.view(-1))
        if mode == "bf16":
            return F.cross_entropy(F.linear(h, w).float().view(-1, v), y.view(-1))
        z = 30.0 * torch.tanh(F.linear(h, w) / 30.0)
        return F.cross_entropy(z[:, :-1].reshape(-1, v), y[:, 1:].reshape(-1), label_smoothing=0.1)
    with counting_installed_pass() as seen:
        got, got_g = _run(torch.compile(fn, fullgraph=True), (h, w, y), [h, w])
    # reference: eager in float64
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()

    def ref_fn(h, w, y):
        with torch.autocast("cuda", enabled=False):
            return fn(h, w, y) if mode != "autocast" else F.cross_entropy((h @ w.T).view(-1, v), y.view(-1))
    want, want_g = _run(ref_fn, (h64, w64, y), [h64, w64])
    assert seen.rewrites == 1, seen
    tol = 2e-2 if mode != "softcap_shift_fp32" else 1e-4
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
    for g, r in zip(got_g, want_g):
        err = (g.double() - r).norm() / r.norm()
        assert err < tol, err


@pytest.mark.parametrize("grad", [True, False], ids=["grpo_loss", "no_grad_scoring"])
def test_cuda_rl_reads_through_inductor(grad):
    """A GRPO-style loss (log-probabilities as TRL writes them, verl's entropy, a temperature) and the no-grad
    scoring of the same logits, bf16 on CUDA through Inductor: one rewrite, values and gradients vs float64."""
    h, w, y = _data(torch.bfloat16)
    y = y.clamp_min(0)
    adv = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))

    def fn(h, w, y):
        with torch.set_grad_enabled(grad):
            z = F.linear(h, w)
            z = (z if z.dtype == torch.float64 else z.float()) / 0.8
            logp = torch.gather(z, -1, y[..., None]).squeeze(-1) - torch.stack([torch.logsumexp(r, -1) for r in z])
            ent = torch.logsumexp(z, -1) - torch.sum(F.softmax(z, -1) * z, dim=-1)
            return -(torch.exp(logp - logp.detach()) * adv).mean() - 0.01 * ent.mean()
    with counting_installed_pass() as seen:
        compiled = torch.compile(fn, fullgraph=True)
        got = compiled(h, w, y)
        got_g = torch.autograd.grad(got, [h, w]) if grad else None
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = fn(h64, w64, y)
    assert seen.rewrites == 1, seen
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)
    if grad:
        for g, r in zip(got_g, torch.autograd.grad(want, [h64, w64])):
            assert (g.double() - r).norm() / r.norm() < 2e-2
    else:
        assert not got.requires_grad
