"""One input factory and the eager baseline every benchmark compares with."""
from __future__ import annotations

import torch
import torch.nn.functional as F

REGIMES = ("flat", "zipf")


def make_inputs(N, D, V, regime="flat", *, logit_std=1.0, seed=1, device="cuda", dtype=torch.bfloat16,
                requires_grad=True):
    """``e [N, D]``, ``c [V, D]`` in ``dtype`` and int64 targets ``t [N]``, drawn on ``device`` from a
    generator seeded with ``seed`` (same seed, same tensors).

    ``flat``: early-training data: ``e`` standard normal, ``c`` normal scaled so the logits have a standard
    deviation of about ``logit_std``, uniform targets. With ``logit_std=2.0, seed=0`` these are the CUDA
    tests' model-shape inputs (the draws of ``tests/helpers.make_inputs`` without bias or ignored targets).

    ``zipf``: trained-like data: a Zipf prior over a shuffled vocabulary carried by hidden dimension 0, plus
    a random context term of scale 3 (``logit_std`` is not used); targets are sampled from the model's own
    softmax, so the loss is what a trained model's would be (the regime of ``shared/bench/peers.py``).

    ``e`` and ``c`` are leaves that require grad unless ``requires_grad=False``.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    e = torch.randn(N, D, device=device, generator=g)
    if regime == "flat":
        c = torch.randn(V, D, device=device, generator=g) * (logit_std / D**0.5)
        t = torch.randint(0, V, (N,), device=device, generator=g)
        e, c = e.to(dtype), c.to(dtype)
    elif regime == "zipf":
        rank = torch.randperm(V, device=device, generator=g).float()
        prior = -1.1 * torch.log(rank + 2.7)
        c = torch.randn(V, D, device=device, generator=g) * (3.0 / D**0.5)
        c[:, 0] = prior - torch.logsumexp(prior, 0)
        e[:, 0] = 1.0
        e, c = e.to(dtype), c.to(dtype)
        t = torch.empty(N, dtype=torch.long, device=device)
        with torch.no_grad():
            for s in range(0, N, 2048):
                p = torch.softmax((e[s:s + 2048] @ c.T).float(), -1)
                t[s:s + 2048] = torch.multinomial(p, 1, generator=g).squeeze(1)
                del p
    else:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if requires_grad:
        e.requires_grad_(), c.requires_grad_()
    return e, c, t


def eager(e, c, t):
    """The baseline: logits in the input dtype, loss in float32 (what a model's loss code does)."""
    return F.cross_entropy((e @ c.T).float(), t)


def eager_copy(e, c, t):
    """:func:`eager` with its own code object. Dynamo caches compiled code per code object: a second
    ``torch.compile`` of the baseline (another backend, a no-grad compile) is given this one."""
    return F.cross_entropy((e @ c.T).float(), t)


def model_inputs(N, D, V, dtype=torch.bfloat16, seed=0, device="cuda"):
    """The kernels' check inputs (CUDA tests, ``fast_path_check.py --kernels``): flat, logits of standard
    deviation 2, no grad."""
    return make_inputs(N, D, V, "flat", logit_std=2.0, seed=seed, device=device, dtype=dtype, requires_grad=False)
