"""Reads the op serves besides the one it stands for: a z-loss's ``torch.logsumexp(z, -1)``, an entropy bonus or
metric, verl's ``Σ p z`` — any read (:mod:`.reads`) of the same logits rows that the op's lse and entropy
outputs give, so that every read of one lm-head's logits is one op call."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

from torch.fx import Node

from .fx_util import _call, _last_dim
from .match import Match
from .reads import Quantity, Read
from .spellings import _as_cast, _as_layout
from .steps import Step, StepKind


@dataclass(frozen=True)
class ServedRead:
    """A read served from the op's outputs, at the rows of the chain node it reads."""

    read: Read
    position: int                # eager-order position of that chain node (-1: the matmul output)
    chain_node: Node             # that chain node
    extra_step: Optional[Step]   # a reshape of that chain node the read reads through (replayed on hidden)
    detach: bool = False         # read under no_grad while the op runs with grad: served detached

    @property
    def node(self) -> Node:
        return self.read.node

    @property
    def feeder(self) -> Optional[Node]:
        """The separate cast / reshape of a chain node the read reads (it dies with the read), or None."""
        return None if self.read.src is self.chain_node else self.read.src

    @property
    def nodes(self) -> tuple:
        """Every node the op's output stands for: the read's nodes and its feeder."""
        return self.read.nodes + ((self.feeder,) if self.feeder is not None else ())


def describe(sr_or_read) -> str:
    """How the reasons name a served read: a logsumexp is "the z-loss's logsumexp" (as ever)."""
    read = sr_or_read.read if isinstance(sr_or_read, ServedRead) else sr_or_read
    return "the z-loss's logsumexp" if read.quantity is Quantity.LSE else f"the served {read.quantity.value}"


def find_served_reads(m: Match, reads: list) -> list:
    """Reads (of ``reads``, other than the one the op stands for) that the op's lse / entropy outputs serve:
    reads without ids (not a second log-probability) of a chain node that already carries every
    scale/softcap/bias (so its rows' lse and entropy are the op's), separated from the op's rows only by
    reshapes and casts (no slicing), before any log_softmax / class transpose of the loss — or of a cast or
    a reshape of such a node. Returns :class:`ServedRead` s (the plan decides whether to detach them)."""
    order = m.order  # matmul → loss; position -1 is the matmul output itself
    value_kinds = {StepKind.SCALE, StepKind.SOFTCAP, StepKind.BIAS}
    first = max((i for i, st in enumerate(order) if st.kind in value_kinds), default=-1)
    by_src: dict = {}
    for r in reads:
        if r is not m.read and r.quantity is not Quantity.LOG_PROB and r.node is not m.loss:
            by_src.setdefault(r.src, []).append(r)
    served, seen = [], set()
    for i in range(first, len(order)):
        if i >= 0 and order[i].kind in (StepKind.NORMALIZE, StepKind.CLASS_DIM):
            break
        if any(s.kind is StepKind.LAYOUT and _call(s.node, (operator.getitem,)) for s in order[i + 1:]):
            continue  # a slice between this node and the loss: its rows are not the loss's rows
        x = m.mm.node if i == -1 else order[i].node
        # read of z, or of a separate z.float() / z.view(-1, V) (a cast or a reshape of a chain node)
        feeders = [(x, None)]
        for c in x.users:
            if c.op == "call_method" and _as_cast(c) is x:
                feeders.append((c, None))
            elif not _call(c, (operator.getitem,)) and _as_layout(c, _last_dim(x)) is x:
                feeders.append((c, Step(StepKind.LAYOUT, c, x)))
        for f, extra_step in feeders:
            for r in by_src.get(f, ()):
                if r.node not in seen:
                    seen.add(r.node)
                    served.append(ServedRead(r, i, x, extra_step))
    return served


__all__ = ["ServedRead", "find_served_reads", "describe"]
