"""z-loss terms: ``torch.logsumexp(z, -1)`` of the same logits, served by the op's lse output."""
from __future__ import annotations

import operator
from typing import Optional

from torch.fx import Node

from .fx_util import _bind, _call, _last_dim, _norm_dim, _shape
from .match import Match
from .spellings import _LOGSUMEXP_FNS, _LOGSUMEXP_SIG, _as_cast, _as_layout
from .steps import Step, StepKind


def _logsumexp_users(f: Node, i: int, extra_step: Optional[Step], seen: set) -> list:
    """``torch.logsumexp(f, -1)`` / ``f.logsumexp(dim=-1, keepdim=...)`` users of ``f``."""
    out = []
    for u in list(f.users):
        if u in seen or not _call(u, _LOGSUMEXP_FNS, ("logsumexp",)):
            continue
        a = _bind(u, _LOGSUMEXP_SIG)
        if not a or u.kwargs.get("out") is not None or not isinstance(a["keepdim"], bool):
            continue
        dim = a["dim"]
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        nd = len(_shape(f))
        if _norm_dim(dim, nd) == nd - 1:
            seen.add(u)
            out.append((u, i, a["keepdim"], extra_step))
    return out


def find_logsumexps(m: Match) -> list:
    """z-loss terms we can serve from the op's lse: ``torch.logsumexp(z, -1)`` of a chain node that
    already carries every scale/softcap/bias (so its rows' lse equals the op's) and is separated from
    the loss input only by reshapes and casts (no slicing), before any log_softmax / class transpose.
    Returns (logsumexp node, eager-order position of its input, keepdim)."""
    order = m.order  # matmul → loss; position -1 is the matmul output itself
    value_kinds = {StepKind.SCALE, StepKind.SOFTCAP, StepKind.BIAS}
    first = max((i for i, st in enumerate(order) if st.kind in value_kinds), default=-1)
    served = []
    seen: set = set()
    for i in range(first, len(order)):
        if i >= 0 and order[i].kind in (StepKind.NORMALIZE, StepKind.CLASS_DIM):
            break
        if any(s.kind is StepKind.LAYOUT and _call(s.node, (operator.getitem,)) for s in order[i + 1:]):
            continue  # a slice between this node and the loss: its rows are not the loss's rows
        x = m.mm.node if i == -1 else order[i].node
        # logsumexp(z), or of a separate z.float() / z.view(-1, V) (a cast or a reshape of a chain node)
        feeders = [(x, None)]
        for c in x.users:
            if c.op == "call_method" and _as_cast(c) is x:
                feeders.append((c, None))
            elif not _call(c, (operator.getitem,)) and _as_layout(c, _last_dim(x)) is x:
                feeders.append((c, Step(StepKind.LAYOUT, c, x)))
        for f, extra_step in feeders:
            served.extend(_logsumexp_users(f, i, extra_step, seen))
    return served
