"""A sum of matmuls is one matmul: a LoRA adapter on the lm-head.

PEFT's LoRA ``Linear`` computes, in the Dynamo graph::

    result = torch._C._nn.linear(h, W, None)                 # the frozen lm-head
    u = torch._C._nn.linear(F.dropout(h, p, training), A)    # lora_A (dropout: nn.Identity when p = 0)
    t = torch._C._nn.linear(u, B)                            # lora_B
    logits = result + t * scaling                            # scaling = alpha / r, a Python number

and ``h @ W.T + s·(u @ B.T) = [h, s·u] @ [W, B].T`` exactly. :func:`match_low_rank_sum` reads that sum
(any matmul spelling for each part, any number of terms, either order, the scale by a number before or
after: ``t * s``, ``s * t``, ``t / c``) as one :class:`~.spellings.Matmul` whose ``terms`` the emission
concatenates: the op gets ``torch.cat([h, s·u], -1)`` and ``torch.cat([W, B], 1)``, and the gradients of
``h``, ``u`` (so A and, through the dropout, ``h``) and ``B`` flow through ordinary autograd of those
concatenations. ``u`` is the graph's own node, so a dropout before ``lora_A`` keeps its draw: the rewrite
is exact for any dropout probability. Every part must compute in one dtype (a float32 adapter on a bf16
lm-head adds in float32 what the op would compute in bf16: refused by the plan's dtype check).

A term that looks like an adapter but is not this form (a bias on B, a tensor scale, DoRA's magnitude)
raises :class:`~.match.Miss` with a reason that says so, rather than "unsupported op ... add".
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx import Node

from .fx_util import _call, _same_size, _shape, _val
from .records import Miss
from .spellings import _ADD_FNS, _ADD_METHODS, LowRankTerm, Matmul, _as_scale, match_matmul

LORA = "a low-rank (LoRA) adapter on the lm-head"


def _same_shape(a: Node, b: Node) -> bool:
    sa, sb = _shape(a), _shape(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(_same_size(x, y) for x, y in zip(sa, sb))


def _has_matmul_ancestor(node: Node, depth: int = 4) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node):
                continue
            if match_matmul(n) is not None:
                return True
            nxt.extend(a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor))
        frontier = nxt
    return False


def _inner_width(node: Node) -> int:
    """The inner (hidden) dim of the matmul ``node`` is, or 0 (not a plain matmul, or a symbolic size)."""
    mm = match_matmul(node)
    d = (_shape(mm.hidden) or (0,))[-1] if mm is not None else 0
    return d if isinstance(d, int) else 0


def _as_term(node: Node, base: Matmul) -> Optional[LowRankTerm]:
    """``s * (u @ B.T)`` / ``(u @ B.T) * s`` / ``(u @ B.T) / c`` / ``u @ B.T`` with the base's output shape and
    ``u``'s leading dims the base hidden's; None when ``node`` is none of these; Miss when it is one that cannot
    be folded."""
    scaled = _as_scale(node)
    inner, scale, nodes = (scaled[0], scaled[1], (node,)) if scaled else (node, 1.0, ())
    t = match_matmul(inner)
    if t is None:
        return None
    if t.terms:  # pragma: no cover - match_matmul never builds sums
        return None
    hs, us = _shape(base.hidden), _shape(t.hidden)
    if hs is None or us is None or len(hs) != len(us) or not all(_same_size(a, b) for a, b in zip(hs[:-1], us[:-1])):
        raise Miss(f"{LORA}: its down-projection has shape {list(us or ())}, not the hidden states' leading dims "
                   f"{list((hs or ())[:-1])}")
    if t.bias is not None:
        raise Miss(f"{LORA} with a bias on its up-projection (lora_bias) is not folded")
    if not math.isfinite(scale):
        raise Miss(f"{LORA} scaled by {scale} (not finite) is not folded")
    return LowRankTerm(t.hidden, t.weight, t.weight_t, scale, nodes + (t.node,))


def match_low_rank_sum(node: Node) -> Optional[Matmul]:
    """``base + Σ s_i·(u_i @ B_i.T)`` (a matmul plus low-rank terms) as one :class:`Matmul` with ``terms``;
    None when ``node`` is not such a sum; Miss naming the adapter when it is one in a form not folded."""
    if not _call(node, _ADD_FNS, _ADD_METHODS) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not (isinstance(a, Node) and isinstance(b, Node) and _same_shape(a, b) and _same_shape(a, node)):
        return None
    # The base is the wider matmul (the lm-head's D against the adapter's rank): with two plain matmuls both
    # readings are the same sum, the report should name the adapter as the term.
    pairs = sorted(((a, b), (b, a)), key=lambda p: -_inner_width(p[0]))
    for base_node, other in pairs:
        base = match_matmul(base_node) or match_low_rank_sum(base_node)
        if base is None:
            continue
        term = _as_term(other, base)
        if term is None:
            if _has_matmul_ancestor(other):
                raise Miss(f"{LORA} (or another matmul added to the logits) in a form not folded: the term added is "
                           "not `s * (u @ B.T)` with a constant number s (e.g. a tensor scale, or DoRA's magnitude)")
            continue
        terms = base.terms + (term,)
        rank = sum(int(_shape(t.hidden)[-1]) if isinstance(_shape(t.hidden)[-1], int) else 0 for t in terms)
        spelling = base.spelling.split(" + ")[0] + f" + LoRA (rank {rank})"
        return Matmul(node, base.hidden, base.weight, base.weight_t, base.bias, spelling, terms,
                      tuple(base.nodes) + term.nodes)
    return None


__all__ = ["match_low_rank_sum", "LORA"]
