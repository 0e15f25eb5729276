"""Activation checkpointing as users write it: the loss after checkpointed layers is rewritten and exact,
and where Dynamo cannot compile the layers, ``explain`` names the graph break and its fix.

Reentrant checkpointing refuses ``torch.autograd.grad``: every test backpropagates with ``.backward()`` and
compares ``.grad``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cce_inductor
from helpers import _reset_dynamo, compile_counting  # noqa: F401

V, D = 53, 8
SIDE_EFFECT_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def _grads_by_backward(fn, params, *args):
    for p in params:
        p.grad = None
    out = fn(*args)
    out.backward()
    return out.detach(), [p.grad.clone() for p in params]


def _assert_same(got, want, rtol=1e-6, atol=1e-8):
    (gl, gg), (wl, wg) = got, want
    torch.testing.assert_close(gl, wl, rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(gg, wg)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad {i}: {m}")


# ---- a plain model: torch.utils.checkpoint around each block ------------------------------------------------

class Block(nn.Module):
    def __init__(self, seen=None):
        super().__init__()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.seen = seen  # a list the block appends to: a Python side effect inside the checkpointed region

    def forward(self, x):
        if self.seen is not None:
            self.seen.append(1)
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self, reentrant, seen=None, write_logits=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block(seen), Block(seen)])
        self.head = nn.Linear(D, V, bias=False)
        self.reentrant, self.write_logits = reentrant, write_logits

    def forward(self, ids, labels):
        h = self.embed(ids)
        for blk in self.blocks:
            h = checkpoint(blk, h, use_reentrant=self.reentrant)
        logits = self.head(h)
        if self.write_logits:
            logits.mul_(0.5)
        return F.cross_entropy(logits.float().view(-1, V), labels.view(-1))


def _ids():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 7), generator=g)
    return ids, torch.roll(ids, -1, 1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpointed_blocks(reentrant):
    net = Net(reentrant).double()
    ids, labels = _ids()
    compiled, results = compile_counting(net)
    got = _grads_by_backward(compiled, list(net.parameters()), ids, labels)
    want = _grads_by_backward(net, list(net.parameters()), ids, labels)
    assert len(results[-1].rewrites) == 1 and not results[-1].rewrites[0].logits_kept, results
    _assert_same(got, want)


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpointed_blocks_write_to_logits_left_alone(reentrant):
    """The same model with an in-place write to the logits between the lm-head and the loss."""
    net = Net(reentrant, write_logits=True).double()
    ids, labels = _ids()
    compiled, results = compile_counting(net)
    got = _grads_by_backward(compiled, list(net.parameters()), ids, labels)
    want = _grads_by_backward(net, list(net.parameters()), ids, labels)
    assert not results[-1].rewrites
    assert any("writes to the logits" in m.reason for m in results[-1].misses), results
    _assert_same(got, want)


def test_side_effect_in_a_checkpointed_block_is_explained():
    """A block that appends to a list: without the flag Dynamo cannot compile the checkpointed region, the
    frame runs eagerly and nothing is compiled; explain names the break and the flag."""
    report = cce_inductor.explain(Net(False, seen=[]).double(), *_ids())
    assert not report.rewrites
    assert any("checkpointed region" in b and SIDE_EFFECT_FLAG in b and "Fix:" in b for b in report.breaks), report


@pytest.mark.parametrize("reentrant", [False, True])
def test_side_effect_in_a_checkpointed_block_with_the_flag(reentrant):
    """With the flag the blocks compile (the side effect runs once, not again in the backward's recompute) and
    the loss is rewritten; loss and gradients are eager's."""
    net = Net(reentrant, seen=[]).double()
    ids, labels = _ids()
    compiled, results = compile_counting(net)
    with torch._dynamo.config.patch(**{SIDE_EFFECT_FLAG: True}):
        got = _grads_by_backward(compiled, list(net.parameters()), ids, labels)
    want = _grads_by_backward(net, list(net.parameters()), ids, labels)
    assert len(results[-1].rewrites) == 1, results
    _assert_same(got, want)


# ---- Hugging Face: model.gradient_checkpointing_enable() ----------------------------------------------------

T = pytest.importorskip("transformers")


def _hf(reentrant):
    import hf_tiny

    model = hf_tiny.llama(dtype=torch.float64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train(), hf_tiny.batch()


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_recipe(reentrant):
    """The recipe (README, "Gradient checkpointing"): ``use_cache=False`` and Dynamo's side-effect flag:
    the checkpointed layers compile, one rewrite with the logits dead, loss and gradients equal eager's."""
    model, inputs = _hf(reentrant)
    model.config.use_cache = False

    def f(ids, labels):
        return model(input_ids=ids, labels=labels).loss
    compiled, results = compile_counting(f)
    with torch._dynamo.config.patch(**{SIDE_EFFECT_FLAG: True}):
        got = _grads_by_backward(compiled, list(model.parameters()), inputs["input_ids"], inputs["labels"])
    want = _grads_by_backward(f, list(model.parameters()), inputs["input_ids"], inputs["labels"])
    assert len(results) == 1 and len(results[0].rewrites) == 1 and not results[0].rewrites[0].logits_kept, results
    _assert_same(got, want, rtol=1e-5, atol=1e-7)  # HF's loss upcasts the logits with .float(): fp32 arithmetic


def test_hf_gradient_checkpointing_without_the_recipe_is_explained():
    """As a user first writes it: the loss is left to Inductor (the lm-head's graph returns the logits) and
    explain names the graph breaks with their fixes (the use_cache warning on every transformers release
    tested; the checkpoint side effect where transformers' attention layers set a context variable)."""
    model, inputs = _hf(False)
    report = cce_inductor.explain(lambda ids, labels: model(input_ids=ids, labels=labels).loss,
                                  inputs["input_ids"], inputs["labels"])
    assert not report.rewrites and report.misses and all(m.category == "logits_kept" for m in report.misses), report
    assert any("use_cache" in b and "Fix: set model.config.use_cache = False" in b for b in report.breaks), report
    for b in report.breaks:
        if b.startswith("activation checkpointing"):
            assert SIDE_EFFECT_FLAG in b and "integrations.transformers" in b
