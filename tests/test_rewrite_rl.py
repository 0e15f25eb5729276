"""RL and scoring through the rewrite: per-token log-probabilities, entropy and logsumexp read from lm-head logits
(the spellings of TRL, verl, OpenRLHF, torchtune) become one op call that never forms the logits. Each form is
composed from orthogonal parts (read spelling x epilogue x layout x the loss around it); each test compares the
values and every gradient with eager (float64), asserts one op call and no N x V value left in the graph; the
in-place-write variants are left alone with their reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cce_inductor
from cce_inductor import dispatch
from cce_inductor.backend import make_backend
from helpers import _reset_dynamo, assert_left_alone, check, make_inputs  # noqa: F401

V, D = 11, 6


@pytest.fixture
def data():
    h, w, b, y = make_inputs((2, 5), D, V, torch.float64, bias=True, scale=3.0, ignore_frac=0.0, seed=3)
    return h, w, b, y


def _rl_tensors(shape, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(shape, generator=g, dtype=dtype)
    old = -torch.rand(shape, generator=g, dtype=dtype) * 3
    mask = (torch.rand(shape, generator=g) > 0.2).to(dtype)
    return adv, old, mask


# ---- the read spellings ---------------------------------------------------------------------------

def trl_selective_log_softmax(logits, index):
    """TRL's selective_log_softmax as it runs without its CUDA kernel: float32/64 logits take the gather minus a
    per-row logsumexp (one row at a time, to save memory); 16-bit logits a log_softmax per row."""
    index = index.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index)
        lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        per_token = selected - lse.unsqueeze(-1)
    else:
        rows = []
        for row_logits, row_labels in zip(logits, index, strict=True):
            rows.append(F.log_softmax(row_logits, dim=-1).gather(dim=-1, index=row_labels))
        per_token = torch.stack(rows)
    return per_token.squeeze(-1)


def trl_entropy_from_logits(logits, chunk_size=3):
    """TRL's entropy_from_logits without its CUDA kernel: flattened rows in chunks, -(exp(logp) * logp).sum."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(parts, dim=0).reshape(logits.shape[:-1])


LOG_PROBS = {
    "gather_log_softmax": lambda z, y: torch.gather(F.log_softmax(z, -1), -1, y.unsqueeze(-1)).squeeze(-1),
    "gather_method": lambda z, y: z.log_softmax(dim=-1).gather(dim=-1, index=y[..., None]).squeeze(dim=-1),
    "take_along_dim": lambda z, y: torch.take_along_dim(F.log_softmax(z, -1), y[..., None], dim=-1).squeeze(-1),
    "neg_cross_entropy": lambda z, y: -F.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none").view(y.shape),
    "gather_minus_logsumexp": lambda z, y: torch.gather(z, -1, y[..., None]).squeeze(-1) - torch.logsumexp(z, -1),
    "trl": trl_selective_log_softmax,
    "torchtune": lambda z, y: torch.gather(torch.log_softmax(z, dim=-1), 2, y.unsqueeze(-1)).squeeze(-1),
}

ENTROPIES = {
    "softmax_times_log_softmax": lambda z: -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1),
    "exp_log_softmax_negated_inside": lambda z: torch.sum(-torch.exp(F.log_softmax(z, -1)) * F.log_softmax(z, -1),
                                                          dim=-1),
    "verl_logsumexp_minus_mean_logit": lambda z: torch.logsumexp(z, dim=-1) - torch.sum(F.softmax(z, -1) * z, axis=-1),
    "trl_chunks": trl_entropy_from_logits,
}


def rewritten_graphs(fn, args):
    """The graphs the inner backend receives after the rewrite (aot_eager), and the per-graph pass results."""
    graphs, results = [], []

    def inner(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd  # noqa: F401
        return gm.forward
    compiled = torch.compile(fn, backend=make_backend(inner, on_result=results.append), fullgraph=True)
    compiled(*args)
    return graphs, results


def assert_one_op_and_no_logits(fn, args, n_tokens):
    """One op call and nothing of N x V left in the rewritten graph."""
    graphs, results = rewritten_graphs(fn, args)
    gm = graphs[-1]
    calls = [n for n in gm.graph.nodes if n.target is dispatch.linear_cross_entropy]
    assert len(calls) == 1, gm.graph
    for n in gm.graph.nodes:
        v = n.meta.get("example_value")
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[-1] == V:
            assert v.numel() < n_tokens * V, f"{n.name} {tuple(v.shape)} is N x V: {gm.graph}"
    return results[-1]


# ---- log-probabilities in a policy-gradient loss ------------------------------------------------------

@pytest.mark.parametrize("spelling", list(LOG_PROBS))
def test_policy_gradient_log_probs(data, spelling):
    h, w, b, y = data
    adv, _, mask = _rl_tensors(y.shape)
    logp_of = LOG_PROBS[spelling]

    def f(h, w, b, y):
        logp = logp_of(F.linear(h, w, b), y)
        return -(logp * adv * mask).sum() / mask.sum(), logp
    results = check(f, (h, w, b, y), 1, return_results=True)
    r = results[-1].rewrites[0]
    assert not r.logits_kept
    assert r.loss == ("cross_entropy" if spelling == "neg_cross_entropy" else "log_prob"), r
    assert_one_op_and_no_logits(f, (h, w, b, y), y.numel())


@pytest.mark.parametrize("spelling", list(ENTROPIES))
def test_entropy_bonus(data, spelling):
    h, w, b, y = data
    _, _, mask = _rl_tensors(y.shape)
    entropy_of = ENTROPIES[spelling]

    def f(h, w, b):
        ent = entropy_of(F.linear(h, w, b))
        return -(ent * mask).sum() / mask.sum(), ent
    r = check(f, (h, w, b), 1, return_results=True)[-1].rewrites[0]
    assert not r.logits_kept
    assert_one_op_and_no_logits(f, (h, w, b), y.numel())


def grpo_loss(logp, old_logp, ref_logp, adv, mask, entropy, eps=0.2, beta=0.04, ent_coef=0.01):
    """The GRPO objective per token: the clipped ratio, a k3 KL to the reference, an entropy bonus, masked."""
    ratio = torch.exp(logp - old_logp)
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = pg + beta * kl - ent_coef * entropy
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("logp_spelling,entropy_spelling,epilogue", [
    ("gather_log_softmax", "softmax_times_log_softmax", "temperature"),
    ("trl", "trl_chunks", "softcap_float"),
    ("gather_minus_logsumexp", "verl_logsumexp_minus_mean_logit", "plain"),
    ("torchtune", "exp_log_softmax_negated_inside", "temperature"),
])
def test_grpo_clipped_loss_with_an_entropy_bonus_is_one_op_call(data, logp_spelling, entropy_spelling, epilogue):
    h, w, b, y = data
    adv, old, mask = _rl_tensors(y.shape)
    ref = old + 0.1
    logp_of, entropy_of = LOG_PROBS[logp_spelling], ENTROPIES[entropy_spelling]

    def f(h, w, y):
        z = h @ w.T
        if epilogue == "temperature":
            z = z / 0.7
        elif epilogue == "softcap_float":
            z = (2.0 * torch.tanh(z / 2.0)).float()
        return grpo_loss(logp_of(z, y), old, ref, adv, mask, entropy_of(z))
    r = check(f, (h, w, y), 1, return_results=True)[-1].rewrites[0]
    assert r.options["reads"].split("+")[0] == "log_prob" and not r.logits_kept, r
    assert_one_op_and_no_logits(f, (h, w, y), y.numel())


def test_shifted_labels_and_a_z_loss(data):
    """Causal shift (``logits[:, :-1]``, ``ids[:, 1:]``), the log-probabilities, the entropy and a z-loss of the
    same rows: one op call with three outputs."""
    h, w, b, y = data

    def f(h, w, y):
        z = (h @ w.T)[:, :-1]
        ids = y[:, 1:]
        logp = torch.gather(F.log_softmax(z, -1), -1, ids[..., None]).squeeze(-1)
        ent = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
        return -logp.mean() - 0.01 * ent.mean() + 1e-3 * torch.logsumexp(z, -1).square().mean()
    r = check(f, (h, w, y), 1, return_results=True)[-1].rewrites[0]
    assert r.options["reads"] == "log_prob+entropy+logsumexp" and r.lse_served == 1
    assert_one_op_and_no_logits(f, (h, w, y), y.numel())


def test_cross_entropy_with_an_entropy_regulariser(data):
    """A mean cross-entropy (SFT) with an entropy term of the same logits: one op call (low-memory path)."""
    h, w, b, y = data

    def f(h, w, y):
        z = (h @ w.T).float()
        ent = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
        return F.cross_entropy(z.view(-1, V), y.view(-1)) - 0.01 * ent.mean()
    r = check(f, (h, w, y), 1, return_results=True)[-1].rewrites[0]
    assert r.loss == "cross_entropy" and r.options["reads"] == "entropy" and r.path == "low_memory"


# ---- scoring and metrics under no_grad ---------------------------------------------------------------

def test_no_grad_scoring_of_a_reference_model(data):
    """Reference-model log-probabilities (and an entropy metric) under no_grad: the op's forward alone."""
    h, w, b, y = data

    def score(h, w, y):
        with torch.no_grad():
            z = F.linear(h, w)
            return trl_selective_log_softmax(z, y), ENTROPIES["softmax_times_log_softmax"](z)
    r = check(score, (h, w, y), 1, return_results=True)[-1].rewrites[0]
    assert r.options["reads"] == "log_prob+entropy" and r.path == "low_memory"
    torch._dynamo.reset()
    assert not any(t.requires_grad for t in torch.compile(score, backend=make_backend("aot_eager"))(h, w, y))


def test_an_entropy_metric_under_no_grad_next_to_log_probs_with_grad(data):
    """TRL's ``entropy_requires_grad=False``: the entropy under no_grad after the log-probabilities: served
    detached by the same op call; it carries no gradient, as in eager."""
    h, w, b, y = data
    adv, _, _ = _rl_tensors(y.shape)

    def f(h, w, y):
        z = h @ w.T
        logp = trl_selective_log_softmax(z, y)
        with torch.no_grad():
            ent = trl_entropy_from_logits(z)
        return -(logp * adv).mean(), ent.mean()
    r = check(f, (h, w, y), 1, return_results=True)[-1].rewrites[0]
    assert any("detached" in n for n in r.notes), r.notes


def test_the_logits_computed_with_grad_and_read_under_no_grad(data):
    """Nothing else reads the logits: the op runs under the read's no_grad, as eager's read does."""
    h, w, b, y = data

    def f(h, w):
        z = h @ w.T
        with torch.no_grad():
            return ENTROPIES["softmax_times_log_softmax"](z).mean()
    check(f, (h, w), 1)


# ---- 16-bit logits and autocast ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["float_cast", "bf16_logits", "autocast"])
def test_16bit(where):
    h, w, b, y = make_inputs((2, 5), D, V, torch.float32, bias=False, scale=3.0, ignore_frac=0.0, seed=4)
    adv, _, _ = _rl_tensors(y.shape, dtype=torch.float32)

    def f(h, w, y):
        if where == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = h @ w.T
            z = z.float()
        elif where == "float_cast":
            z = (h.bfloat16() @ w.bfloat16().T).float()
        else:  # bf16 logits read as they are (TRL's row loop for 16-bit logits): bf16 outputs
            z = h.bfloat16() @ w.bfloat16().T
        logp = trl_selective_log_softmax(z, y)
        ent = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
        return -(logp.float() * adv).mean() - 0.01 * ent.float().mean(), logp
    check(f, (h, w, y), 1, rtol=3e-2, atol=3e-2)


# ---- what is left alone ---------------------------------------------------------------------------

def _temperature_in_place(h, w, y):
    z = h @ w.T
    z.div_(0.7)  # OpenRLHF divides the logits by the temperature in place
    return torch.gather(F.log_softmax(z, -1), -1, y[..., None]).sum()


def _write_to_the_log_softmax(h, w, y):
    logp = F.log_softmax(h @ w.T, -1)
    logp[..., 0] = 0.0
    return torch.gather(logp, -1, y[..., None]).sum()


def _mask_the_logits(h, w, y):
    z = h @ w.T
    z[..., -1] = float("-inf")  # a padded vocabulary masked in place
    return torch.gather(F.log_softmax(z, -1), -1, y[..., None]).sum()


def _write_to_hidden_between(h, w, y):
    z = h @ w.T
    logp = F.log_softmax(z, -1)
    h.mul_(2.0)
    return torch.gather(logp, -1, y[..., None]).sum()


@pytest.mark.parametrize("fn,reason", [
    (_temperature_in_place, "`.div_()` writes to the logits (or memory they share) between the matmul and the "
                            "log_prob read"),
    (_write_to_the_log_softmax, "writes to the logits"),
    (_mask_the_logits, "writes to the logits"),
    (_write_to_hidden_between, "writes to the hidden states"),
], ids=["temperature_div_", "setitem_log_softmax", "masked_vocab", "hidden_mul_"])
def test_in_place_writes_are_left_alone(data, fn, reason):
    h, w, b, y = data
    with torch.no_grad():
        assert_left_alone(fn, (h.detach().clone(), w.detach(), y), reason)


def test_log_probs_with_two_sets_of_ids_are_left_to_inductor(data):
    """Two log-probability reads of one matmul with different ids: one op call cannot serve both."""
    h, w, b, y = data

    def f(h, w, y):
        logp = F.log_softmax(h @ w.T, -1)
        return logp.gather(-1, y[..., None]).sum() + logp.gather(-1, y.flip(-1)[..., None]).sum()
    misses = assert_left_alone(f, (h, w, y), "left to Inductor: the logits are also needed by `gather`")
    assert len(misses) == 1 and misses[0].category == "logits_kept"


def test_logits_returned_with_the_log_probs_are_left_to_inductor(data):
    h, w, b, y = data

    def f(h, w, y):
        z = h @ w.T
        return LOG_PROBS["gather_log_softmax"](z, y), z
    assert_left_alone(f, (h, w, y), "left to Inductor: the logits are also needed by a graph output")


def test_gather_from_other_rows_is_not_a_log_probability(data):
    """``gather`` with an index of fewer rows than the logits reads the first rows only: not the op's form."""
    h, w, b, y = data

    def f(h, w, y):
        return torch.gather(F.log_softmax(h @ w.T, -1), -1, y[:, :3, None]).sum()
    results = check(f, (h, w, y), 0, return_results=True)
    assert [m.category for r in results for m in r.misses] == ["not_served"]


def test_a_narrow_matmul_is_not_an_lm_head(data):
    """A logsumexp of a matmul no wider than its input (attention scores, a router) is not rewritten nor
    reported: there are no large logits to save."""
    h, w, b, y = data
    r = torch.randn(4, D, dtype=h.dtype, requires_grad=True)
    results = check(lambda h, r: torch.logsumexp(h @ r.T, -1).sum(), (h, r), 0, return_results=True)
    assert not [m for res in results for m in res.misses]


def test_a_narrowing_dtype_in_log_softmax_is_left_alone(data):
    h, w, b, y = data

    def f(h, w, y):
        z = (h @ w.T).float()
        return torch.gather(F.log_softmax(z, -1, dtype=torch.bfloat16), -1, y[..., None]).float().sum()
    assert_left_alone(f, (h.float(), w.float(), y), "a narrowing cast of the logits")


def test_explain_names_the_reads(data):
    h, w, b, y = data

    def f(h, w, y):
        z = h @ w.T
        return -trl_selective_log_softmax(z, y).mean() - 0.01 * trl_entropy_from_logits(z).mean()
    report = cce_inductor.explain(f, h, w, y)
    text = str(report)
    assert "log_prob" in text and "reads=log_prob+entropy" in text, text
    assert len(report.rewrites) == 1 and not report.misses


def test_one_logsumexp_for_the_log_probs_and_the_entropy(data):
    """``lse`` computed once and used by both the selective log-probability and verl's entropy: the op serves the
    logsumexp too (it is inside the log-probability's spelling and used outside it)."""
    h, w, b, y = data
    adv, _, _ = _rl_tensors(y.shape)

    def f(h, w, y):
        z = h @ w.T
        lse = torch.logsumexp(z, -1)
        logp = torch.gather(z, -1, y[..., None]).squeeze(-1) - lse
        ent = lse - (F.softmax(z, -1) * z).sum(-1)
        return -(logp * adv).mean() - 0.01 * ent.mean()
    r = check(f, (h, w, y), 1, return_results=True)[-1].rewrites[0]
    assert r.options["reads"] == "log_prob+logsumexp+mean_logit" and not r.logits_kept, r
    assert_one_op_and_no_logits(f, (h, w, y), y.numel())


# ---- served values are tensors of their own (writes after the call) ---------------------------------

def _entropy_two_ways(h, w):
    z = h @ w.T
    ent = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
    logp = F.log_softmax(z, -1)
    return ent, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_reads_returned_and_written_in_place_after_the_call(data, inner):
    """Eager gives each read a tensor of its own, and autograd keeps what it saved apart from what it returns:
    two spellings of the entropy returned, one written in place after the call, leave the other and the
    gradient as eager has them (the op's backward keeps its own copies; a second read of one output is a copy
    the compiler cannot drop)."""
    h, w, _, _ = data

    def run(fn):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        a, b = fn(hh, ww)
        a.mul_(2)
        (a * 0.5 + b * 0.25).sum().backward()
        return b.detach(), hh.grad, ww.grad
    want = run(_entropy_two_ways)
    counter = []
    got = run(torch.compile(_entropy_two_ways, backend=make_backend(inner, on_result=counter.append)))
    assert len(counter) == 1 and len(counter[0].rewrites) == 1, counter
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_op_outputs_written_in_place_after_a_compiled_call(data):
    """The op called directly under torch.compile: an entropy output written in place after the call does not
    change the gradient (the op's backward reads its own copy)."""
    h, w, _, _ = data

    def fn(h, w):
        return cce_inductor.linear_log_probs(h, w, None, return_entropy=True)

    def run(f):
        hh = h.detach().clone().requires_grad_()
        e = f(hh, w)
        e.mul_(2)
        e.sum().backward()
        return hh.grad
    torch.testing.assert_close(run(torch.compile(fn, backend="aot_eager")), run(fn), rtol=1e-10, atol=1e-12)
