"""Hypothesis fuzzing of the rewrite: random odd shapes × forms built from the orthogonal parts × options.

Each example builds an eager loss function from independent choices (matmul spelling, epilogue,
row layout, loss spelling — a cross-entropy, or the per-token reads of RL: log-probabilities, entropy, both —
options, main graph or checkpointed region), compiles it with the cce backend, asserts exactly one rewrite —
none, with the loss left to Inductor, where the logits are needed anyway (returned, or a z-loss over other
rows than the loss's), and none unreported where a read's matmul is no wider than its input (not an
lm-head) — and compares the loss and every gradient with eager (float64).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import check, fuzz_examples

# Budgets: shares of the hypothesis profile (conftest.py): quick 25 / 2, ci 150 / 11, long 1000 / 75 examples
# (--hypothesis-profile=long is random rather than derandomized).

MATMULS = ["linear", "linear_bias", "at_T", "matmul_t", "einsum", "plus_bias", "addmm2d", "mm2d", "lora"]
LAYOUTS = ["flat_view", "flatten", "shift_slice", "class_dim", "hidden_2d"]
LOSSES = ["ce", "nll"]
# Per-token reads (rewrite/reads.py) under a policy-gradient-like loss: log-probabilities (a gather of
# log_softmax; TRL's gather minus a logsumexp per row; TRL's log_softmax row by row), entropy (softmax times
# log_softmax; verl's logsumexp minus the mean logit), a log-probability with an entropy bonus, and both from one
# logsumexp.
READS = ["logp_gather", "logp_selective", "logp_rows", "entropy", "entropy_verl", "logp_entropy", "logp_entropy_lse"]


@st.composite
def forms(draw):
    f = dict(
        B=draw(st.integers(1, 3)), T=draw(st.sampled_from([2, 3, 5, 7])), D=draw(st.sampled_from([1, 3, 5, 9])),
        V=draw(st.sampled_from([2, 5, 13, 17])),
        matmul=draw(st.sampled_from(MATMULS)), layout=draw(st.sampled_from(LAYOUTS)),
        loss=draw(st.sampled_from(LOSSES + READS)),
        scales=draw(st.lists(st.sampled_from([0.5, 2.0, -1.5, "div3"]), max_size=2)),
        softcap=draw(st.sampled_from([None, None, 1.5, 4.0])),
        cast=draw(st.sampled_from([None, "float", "double"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=draw(st.sampled_from([-100, 0, 1])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.2])),
        z_loss=draw(st.booleans()),
        return_logits=draw(st.sampled_from([False, False, True])),
        autocast=draw(st.sampled_from([False, False, False, True])),
        region=draw(st.sampled_from(["main", "main", "checkpoint"])),
        seed=draw(st.integers(0, 2 ** 16)),
    )
    if f["matmul"] in ("addmm2d", "mm2d"):
        f["layout"] = "hidden_2d"
    if f["loss"] == "nll":
        f["label_smoothing"] = 0.0
    if f["loss"] in READS:  # a read has no class-dim layout, no smoothing, and reads every id
        f["label_smoothing"] = 0.0
        if f["layout"] == "class_dim":
            f["layout"] = "flat_view"
    return f


def build(f):
    """The eager function for a form: returns (fn, args)."""
    V, D = f["V"], f["D"]
    g = torch.Generator().manual_seed(f["seed"])
    dt = torch.float32 if f["autocast"] else torch.float64
    h = torch.randn(f["B"], f["T"], D, generator=g, dtype=dt).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dt) / max(D, 1) ** 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dt) * 0.1).requires_grad_()
    y = torch.randint(0, V, (f["B"], f["T"]), generator=g)
    if f["loss"] not in READS:  # (a gather reads every id)
        y[torch.rand(f["B"], f["T"], generator=g) < 0.25] = f["ignore_index"]

    def matmul(h, w, b):
        m = f["matmul"]
        if f["layout"] == "hidden_2d":
            h = h.reshape(-1, D)
        if m == "linear":
            return F.linear(h, w)
        if m == "linear_bias":
            return F.linear(h, w, b)
        if m == "at_T":
            return h @ w.T
        if m == "matmul_t":
            return torch.matmul(h, w.t())
        if m == "einsum":
            return torch.einsum("...d,vd->...v", h, w)
        if m == "plus_bias":
            return h @ w.T + b
        if m == "addmm2d":
            return torch.addmm(b, h, w.T)
        if m == "lora":  # a rank-1 adapter (rewrite.low_rank) whose A and B are views of w and b
            return F.linear(h, w) + F.linear(F.linear(h, w[:1]), b[:, None]) * 0.5
        return torch.mm(h, w.t())

    def epilogue(z):
        for s in f["scales"]:
            z = z / 3 if s == "div3" else z * s
        if f["softcap"] is not None:
            z = f["softcap"] * torch.tanh(z / f["softcap"])
        if f["cast"] == "float":
            z = z.float()
        elif f["cast"] == "double":
            z = z.double()
        return z

    def fn(h, w, b, y):
        if f["autocast"]:  # the matmul (and epilogue) in a bf16 autocast region, the loss outside
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = epilogue(matmul(h, w, b))
        else:
            z = epilogue(matmul(h, w, b))
        lay, t = f["layout"], y
        if lay == "flat_view":
            x, t = z.view(-1, V), y.view(-1)
        elif lay == "flatten":
            x, t = z.flatten(0, 1), y.flatten()
        elif lay == "shift_slice":
            x, t = z[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1)
        elif lay == "class_dim":
            x = z.transpose(1, 2)
        else:  # hidden_2d: z is already [N, V]
            x, t = z, y.reshape(-1)
        kw = dict(ignore_index=f["ignore_index"], reduction=f["reduction"])
        if f["loss"] in READS:
            adv = torch.cos(1.3 * t.to(x.dtype) + 0.5)  # per-token advantages of the ids' shape
            loss = _read_loss(f["loss"], x, t, adv, f["reduction"])
        elif f["loss"] == "ce":
            loss = F.cross_entropy(x, t, label_smoothing=f["label_smoothing"], **kw)
        else:
            cls_dim = 1
            loss = F.nll_loss(F.log_softmax(x, dim=cls_dim), t, **kw)
        if f["reduction"] == "none":
            loss = loss.sum() / 7
        if f["z_loss"]:
            loss = loss + 1e-2 * torch.logsumexp(z, dim=-1).square().mean()
        if f["return_logits"]:  # as HF does when the whole model is compiled: the logits stay
            return loss, z
        return loss

    if f["region"] == "checkpoint":  # the whole loss in an activation-checkpointed region (a subgraph)
        from torch.utils.checkpoint import checkpoint

        return (lambda *args: checkpoint(fn, *args, use_reentrant=False)), (h, w, b, y)
    return fn, (h, w, b, y)


@settings(max_examples=fuzz_examples())
@given(forms())
@example(
    f={'B': 1,
     'T': 2,
     'D': 1,
     'V': 2,
     'matmul': 'einsum',
     'layout': 'flat_view',
     'loss': 'ce',
     'scales': [],
     'softcap': None,
     'cast': None,
     'reduction': 'mean',
     'ignore_index': -100,
     'label_smoothing': 0.0,
     'z_loss': False,
     'return_logits': False,
     'autocast': True,
     'region': 'main',
     'seed': 0},
)  # autocast leaves einsum with D=1 (a mul) in float32: not a dtype mismatch
def test_fuzz_aot_eager(f):
    torch._dynamo.reset()
    _check_form(f, "aot_eager")


def _read_loss(kind, z, t, adv, reduction):
    """A policy-gradient-like loss of per-token reads of the logits z ([..., V]) with ids t ([...])."""
    import torch.nn.functional as F

    def logp():
        if kind == "logp_selective":
            return torch.gather(z, -1, t[..., None]).squeeze(-1) - torch.logsumexp(z, -1)
        if kind == "logp_rows":
            return torch.stack([F.log_softmax(row, -1).gather(-1, ids[..., None]) for row, ids in zip(z, t)]).squeeze(-1)
        return torch.gather(F.log_softmax(z, -1), -1, t.unsqueeze(-1)).squeeze(-1)

    def entropy():
        if kind == "entropy_verl":
            return torch.logsumexp(z, -1) - (F.softmax(z, -1) * z).sum(-1)
        return -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
    if kind == "logp_entropy_lse":  # one logsumexp for both
        lse = torch.logsumexp(z, -1)
        logp_ = torch.gather(z, -1, t[..., None]).squeeze(-1) - lse
        per_token = -logp_ * adv - 0.01 * (lse - (F.softmax(z, -1) * z).sum(-1))
    elif kind.startswith("entropy"):
        per_token = -entropy()
    elif kind == "logp_entropy":
        per_token = -logp() * adv - 0.01 * entropy()
    else:
        per_token = -logp() * adv
    if reduction == "mean":
        return per_token.mean()
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / 7


def logits_needed(f) -> bool:
    """The logits are needed besides the loss: returned, or read by a z-loss over all rows while the loss
    reads the shifted ones (the op's lse covers only the loss's rows)."""
    return f["return_logits"] or (f["z_loss"] and f["layout"] == "shift_slice")


def not_an_lm_head(f) -> bool:
    """A read (without a loss) of a matmul no wider than its input: not rewritten, not reported."""
    d = f["D"] + (1 if f["matmul"] == "lora" else 0)  # (the adapter's rank adds to the op's inner dim)
    return f["loss"] in READS and f["V"] <= d


def _check_form(f, inner):
    fn, args = build(f)
    tol = 5e-2 if f["autocast"] else 1e-5  # bf16 logits in eager vs fp32 accumulation in the op
    expect = 0 if logits_needed(f) or not_an_lm_head(f) else 1
    results = check(fn, args, expect, inner=inner, rtol=tol, atol=tol, return_results=True)
    if not expect:
        misses = [m for r in results for m in r.misses]
        if not_an_lm_head(f):
            assert not any(m.category != "logits_kept" for m in misses), misses
        else:
            assert misses and all(m.category == "logits_kept" for m in misses), misses


@settings(max_examples=fuzz_examples(0.075))  # ~5 s each on a CPU
@given(forms())
def test_fuzz_inductor(f):
    torch._dynamo.reset()
    _check_form(f, "inductor")
