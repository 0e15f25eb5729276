"""``torch.ops.cce.fresh_copy``: a tensor copied into a buffer of its own, opaque to the compiler.

The rewrite hands each read of the op's per-token lse / entropy a tensor of its own, as eager gives each read
a fresh one. When two reads of one program are the same quantity (two spellings of the entropy, say), both
would be views of one output; a plain ``clone`` between them is removed by Inductor as a no-op where it sees
no mutation inside the graph, and then two returned tensors share memory: writing one in place after the
call changes the other. An opaque copy keeps them apart. Its gradient passes through unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("cce::fresh_copy", mutates_args=())
def fresh_copy(x: Tensor) -> Tensor:
    return x.clone()


@fresh_copy.register_fake
def _(x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    return grad


fresh_copy.register_autograd(_backward, setup_context=_setup_context)
