"""Logits the program needs anyway: then the loss is left to Inductor.

The op recomputes the logits from the hidden states and the weight. When the logits are also returned
from the compiled function (``torch.compile(model)`` of a Hugging Face model returns ``outputs.logits``),
or read by anything else (an accuracy metric, a second loss, a ``logsumexp`` the op cannot serve), the
original matmul has to stay for that user: the rewritten step would then compute the logits twice (the
matmul kept, plus the op's own), which is slower than torch.compile's cross-entropy over the logits it
already has, and holds the logits as well. So such a loss is not rewritten; :func:`check_logits_unshared`
raises :class:`LogitsNeeded` naming the other users and what to write instead.

Users that cost nothing are not "other users": a ``torch.logsumexp`` of the same rows (a z-loss), an entropy
of them, are served by the op's outputs (``served``), and a cast or reshape that feeds only such reads dies
with them. The nodes inside a read (a log_softmax, a softmax, their product) count as the logits: anything
else that reads them needs the logits too (a log_softmax shared by a log-probability and an entropy served
together is not that).
"""
from __future__ import annotations

from torch.fx import Node

from .fx_util import short_location
from .match import Match, Miss
from .mutation import callee_name
from .spellings import is_loss_node


class LogitsNeeded(Miss):
    """The logits have users besides the loss: the loss is left to Inductor (not a form the pass refuses)."""

    category = "logits_kept"


ADVICE = ("compile a function that returns only the loss (e.g. `lambda ids, labels: model(input_ids=ids, "
          "labels=labels).loss`), or, under the Hugging Face Trainer, use cce_inductor.integrations.transformers. "
          "(Where the compiled function already returns only the loss, a graph break before the lm-head made the "
          "model's forward a graph of its own that returns the logits: see the graph breaks explain lists.)")


def chain_nodes(m: Match) -> list:
    """Every node whose value is the logits on their way to the loss: the matmul (and the parts of a
    sum of matmuls), each step and its inner nodes, and the nodes inside the read the op stands for."""
    read_inner = list(m.read.inner) if m.read is not None else []
    return list(m.mm.nodes) + [st.node for st in m.steps] + [x for st in m.steps for x in st.extra] + read_inner


def _served(served: list) -> set:
    """The served reads' nodes and the casts/reshapes that feed only them (they die with them)."""
    nodes = {x for sr in served for x in sr.read.nodes}
    for sr in served:
        f = sr.feeder
        if f is not None and f.users and all(x in nodes for x in f.users):
            nodes.add(f)
    return nodes


def other_users(m: Match, served: list) -> list:
    """The nodes outside the loss's chain (and the reads served with it) that read the logits (``output`` for a
    graph output)."""
    chain = chain_nodes(m)
    inside = set(chain) | _served(served) | {m.loss}
    scan = chain + [x for sr in served for x in sr.read.inner] + [sr.feeder for sr in served if sr.feeder is not None]
    replaced = {sr.node for sr in served}  # (what uses a served read's value reads the op's output)
    seen, out = set(), []
    for n in (n for n in scan if n not in replaced):
        for u in n.users:
            if u not in inside and u not in seen:
                seen.add(u)
                out.append(u)
    return out


def _loss_reached(u: Node, depth: int = 8):
    """The loss node ``u`` leads to through ops of one tensor input (a view, a cast, a transpose), if any."""
    frontier = [u]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if is_loss_node(n):
                return n
            if n.op == "output" or len([a for a in n.all_input_nodes if a.op != "get_attr"]) > 1 and n is not u:
                continue
            nxt.extend(n.users)
        frontier = nxt
    return None


def describe_user(u: Node, in_region: bool = False) -> str:
    if u.op == "output":
        return ("an output of the checkpointed region that computes them" if in_region else
                "a graph output (the compiled function returns them, as `torch.compile(model)` of a Hugging Face "
                "model returns `outputs.logits`)")
    loss = _loss_reached(u)
    what = "another cross-entropy" if loss is not None else f"`{callee_name(u)}`"
    return f"{what} at {short_location(loss if loss is not None else u)}"


def check_logits_unshared(m: Match, served: list, in_region: bool = False) -> None:
    """Raise :class:`LogitsNeeded` when anything besides the loss (and the reads served with it) reads the
    logits."""
    users = other_users(m, served)
    if not users:
        return
    what = "; ".join(describe_user(u, in_region) for u in users[:4]) + (" ..." if len(users) > 4 else "")
    raise LogitsNeeded(f"left to Inductor: the logits are also needed by {what}. The op recomputes the logits, so a "
                       "rewrite would compute them twice; torch.compile's own cross-entropy over the logits kept "
                       f"anyway is faster and needs little more memory. To have the logits never formed, {ADVICE}")


__all__ = ["LogitsNeeded", "check_logits_unshared", "other_users", "chain_nodes", "ADVICE"]
