"""``explain`` is never silent: vocabulary-wide reads of lm-head logits the op does not serve (spellings of
log-probabilities and entropy that are not provably the op's, a KL term, a lone softmax), a loss whose logits
are a graph input, and logits returned with no loss are all reported, with what they are. Nothing here is
rewritten, and values stay eager's. (The served RL forms: ``test_rewrite_rl.py``.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cce_inductor
from helpers import _reset_dynamo, check, make_inputs  # noqa: F401

V, D = 11, 6


@pytest.fixture
def data():
    return make_inputs(d=D, v=V, bias=False, ignore_frac=0.0)


FORMS = {
    # log(softmax(z)) underflows to -inf where log_softmax does not: not the op's value
    "log_of_softmax": (lambda z, y: torch.log(F.softmax(z, -1)).gather(-1, y.unsqueeze(-1)).mean(),
                       "softmax", "a softmax over the vocabulary"),
    "several_ids_per_row": (lambda z, y: torch.gather(F.log_softmax(z, -1), -1, torch.stack([y, y.flip(-1)], -1)).mean(),
                            "log_softmax+gather", "per-token log-probabilities"),
    "entropy_with_eps": (lambda z, y: -(F.softmax(z, -1) * torch.log(F.softmax(z, -1) + 1e-10)).sum(-1).mean(),
                         "softmax", "a softmax over the vocabulary"),
    "kl_to_uniform": (lambda z, y: F.kl_div(F.log_softmax(z, -1), torch.full_like(z, 1.0 / V), reduction="sum"),
                      "log_softmax", "a log_softmax over the vocabulary"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_unserved_form_is_reported(data, form):
    h, w, b, y = data
    fn, name, what = FORMS[form]

    def f(h, w, y):
        return fn(h @ w.T, y)
    results = check(f, (h, w, y), 0, return_results=True)  # nothing rewritten; values and gradients eager's
    misses = [m for r in results for m in r.misses]
    assert len(misses) == 1 and misses[0].category == "not_served", misses
    assert misses[0].loss == name and what in misses[0].reason and "V=11, D=6" in misses[0].reason, misses[0]


def test_unserved_next_to_a_served_loss(data):
    """A cross-entropy and an entropy bonus in a spelling the op does not serve (``log(p + eps)``) over the same
    logits: the logits are needed by the entropy, so the loss is left to Inductor and the report names the other
    users (not a second, silent miss)."""
    h, w, b, y = data

    def f(h, w, y):
        z = h @ w.T
        p = F.softmax(z, -1)
        ent = -(p * torch.log(p + 1e-10)).sum(-1).mean()
        return F.cross_entropy(z.view(-1, V), y.view(-1)) - 0.01 * ent
    results = check(f, (h, w, y), 0, return_results=True)
    misses = [m for r in results for m in r.misses]
    assert [m.category for m in misses] == ["logits_kept"], misses
    assert "`softmax`" in misses[0].reason


def test_narrow_matmul_is_not_an_lm_head(data):
    """A softmax over a matmul no wider than its input (an MoE router, attention scores) is not reported."""
    h, w, b, y = data
    router = torch.randn(4, D, dtype=h.dtype, requires_grad=True)
    results = check(lambda h, r: F.softmax(h @ r.T, -1).topk(2, -1).values.sum(), (h, router), 0,
                    return_results=True)
    assert not [m for r in results for m in r.misses]


def test_loss_of_graph_input_logits(data):
    """A loss function compiled on its own (the logits computed outside, e.g. a Trainer's compute_loss_func
    on outputs.logits): the miss says where the logits came from and what to write instead."""
    h, w, b, y = data
    logits = (h @ w.T).detach().requires_grad_()
    report = cce_inductor.explain(lambda z, y: F.cross_entropy(z.float().view(-1, V), y.view(-1)), logits, y)
    assert not report.rewrites and [m.category for m in report.misses] == ["graph_input"], report
    reason = report.misses[0].reason
    assert "computed outside this compiled function" in reason and "linear_cross_entropy" in reason
    assert "logits from outside the graph" in str(report)


def test_logits_returned_without_a_loss_is_a_note():
    """An lm-head whose logits the graph returns with no loss of them (an eval forward, or a model compiled
    for a loss computed outside it): a note, not a miss."""
    h = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(40, 4, requires_grad=True)
    report = cce_inductor.explain(lambda h, w: (h @ w.T).float(), h, w)
    assert not report.rewrites and not report.misses
    assert any("returns the logits" in n and "V=40, D=4" in n for n in report.findings), report


def test_nothing_seen_is_said(data):
    h, w, b, y = data
    report = cce_inductor.explain(lambda h: (h * 2).sum(), h)
    assert "No cross-entropy of a matmul was seen in the compiled code" in str(report)


def test_one_report_per_loss_left_to_inductor(data):
    """A loss the pass handled (here left to Inductor: the logits are returned) is reported once, not again as
    an unserved logsumexp, also through the (N, C, d) layout whose transpose hides the vocabulary dim (found by
    the fuzzer: class_dim layout + z-loss + returned logits)."""
    h, w, b, y = data

    def f(h, w, y):
        z = F.linear(h, w)
        loss = F.cross_entropy(z.transpose(1, 2), y) + 1e-2 * torch.logsumexp(z, -1).square().mean()
        return loss, z
    results = check(f, (h, w, y), 0, return_results=True)
    misses = [m for r in results for m in r.misses]
    assert [m.category for m in misses] == ["logits_kept"], misses


def test_gather_with_rows_not_provably_the_logits_rows_is_named():
    """Separate hidden and ids inputs with dynamic sizes: torch.gather also accepts fewer index rows, so the read is
    not provably the op's and is left alone; the reason says so (and how to make it provable), and slicing the ids
    to the hidden's rows makes it served."""
    h, w, _, y = make_inputs((12,), d=D, v=V, bias=False, ignore_frac=0.0)
    torch._dynamo.mark_dynamic(h, 0)
    torch._dynamo.mark_dynamic(y, 0)

    def f(h, w, y):
        return torch.gather(F.log_softmax(h @ w.T, -1), -1, y[:, None]).squeeze(-1).sum()
    report = cce_inductor.explain(f, h, w, y)
    assert not report.rewrites and len(report.misses) == 1, report
    assert "cannot prove equal to the logits' rows" in report.misses[0].reason, report.misses[0]

    def sliced(h, w, y):
        return f(h, w, y[: h.shape[0]])
    torch._dynamo.reset()
    assert len(cce_inductor.explain(sliced, h, w, y).rewrites) == 1


@pytest.mark.parametrize("split", ["split", "chunk", "unbind"])
def test_unserved_reads_of_split_rows_are_reported(data, split):
    """Reads of the logits' rows taken apart by split / chunk / unbind in a spelling the op does not serve (a
    softmax's top probability per piece): reported, not silent."""
    h, w, _, y = data

    def f(h, w, y):
        z = (h @ w.T).reshape(-1, V)
        pieces = {"split": lambda: z.split(2), "chunk": lambda: z.chunk(3), "unbind": lambda: z.unbind(0)}[split]()
        return sum(F.softmax(p, -1).max(-1).values.sum() for p in pieces)
    report = cce_inductor.explain(f, h, w, y)
    assert not report.rewrites and len(report.misses) == 1 and report.misses[0].category == "not_served", report


def test_special_logsumexp_is_served(data):
    """``torch.special.logsumexp`` is ``torch.logsumexp``: served as a logsumexp read."""
    h, w, _, y = data

    def f(h, w, y):
        return (torch.special.logsumexp(h @ w.T, -1) * torch.linspace(0.5, 1.5, y.numel()).view(y.shape)).sum()
    check(f, (h, w, y), 1)
