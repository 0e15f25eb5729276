"""The pass driver: :func:`rewrite_graph` matches and rewrites every loss of a Dynamo FX graph, and every per-row
read of lm-head logits (a log-probability, an entropy, a logsumexp: :mod:`.reads`) that no loss serves."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..logging_ import log
from .emit import emit_plan
from .fx_util import _call, _val, location
from .fx_util import _last_dim
from .match import Miss, match_loss, match_read
from .plan import plan_rewrite
from .reads import Quantity, find_reads
from .records import MissRecord, PassResult
from .regions import Regions
from .spellings import _CE_FNS, is_loss_node, match_matmul
from .unserved import find_unserved


def _any_ancestor(x: Node, pred, depth: int = 24) -> bool:
    """Is ``pred`` true of ``x`` or of one of its first ancestors (``depth`` generations of tensor inputs)?"""
    frontier, seen = [x], set()
    while frontier and depth > 0:
        depth -= 1
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if pred(n):
                return True
            nxt.extend(a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor))
        frontier = nxt
    return False


def _fed_by_matmul(x: Node) -> bool:
    """Is a matmul spelling among the first ancestors of ``x``, a loss's input or a read's logits (for
    reporting misses)?"""
    return _any_ancestor(x, lambda n: match_matmul(n) is not None)


def _fed_by_lm_head(x: Node) -> bool:
    """Are the logits ``x`` a read reads the output of an lm-head-shaped matmul (wider than its input, with
    ``x``'s last dim) among its first ancestors? A read of anything else (attention scores, a router) is not
    this pass's business, and is not reported."""
    v = _last_dim(x)

    def lm_head(n):
        mm = match_matmul(n)
        if mm is None:
            return False
        out, d = _last_dim(n), _last_dim(mm.hidden)
        return isinstance(out, int) and isinstance(d, int) and out > d and out == v
    return _any_ancestor(x, lm_head)


def _logits_are_graph_input(x: Node, depth: int = 16) -> bool:
    """Do the logits ``x`` (a loss's input, a read's logits) come straight from a graph input, through ops with
    one tensor input each (view, float, slice, scale, ...)? Then the matmul, if any, ran in another graph: a
    graph break between the lm-head and the loss, or logits computed outside torch.compile."""
    cur = x
    while isinstance(cur, Node) and depth > 0:
        if cur.op == "placeholder":
            return isinstance(_val(cur), torch.Tensor)
        inputs = [a for a in cur.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        if len(inputs) != 1:
            return False
        cur, depth = inputs[0], depth - 1
    return False


GRAPH_INPUT_REASON = ("the logits are an input of this graph: they were computed outside this compiled function (e.g. "
                      "`outputs.logits` handed to a loss function, such as a Trainer's compute_loss_func) or in "
                      "another graph after a graph break, so there is no matmul to fuse. Compile the code that "
                      "computes the logits together with the loss and return only the loss, or call "
                      "cce_inductor.linear_cross_entropy(hidden, lm_head.weight, labels) in place of both")


# Higher-order ops whose body runs as the same code would run inline (activation checkpointing only
# changes when it runs, and runs it again in the backward): a rewrite inside such a body is exactly as
# equivalent as one in the main graph. Bodies of other higher-order ops (torch.cond branches, loops,
# ...) are only searched, to report what is left alone there.
_INLINE_BODY_HOPS = frozenset({"tag_activation_checkpoint", "wrap"})


def _subgraph_bodies(graph: torch.fx.Graph):
    """(higher-order op name, body GraphModule) for each subgraph a higher-order op of ``graph`` calls."""
    owner = getattr(graph, "owning_module", None)
    if owner is None:
        return
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in node.args:
            if isinstance(arg, Node) and arg.op == "get_attr":
                body = getattr(owner, arg.target, None)
                if isinstance(body, GraphModule):
                    yield node.target.name(), body


def _loss_kind(loss: Node) -> str:
    return "cross_entropy" if _call(loss, _CE_FNS) else "nll_loss"


def _counters():
    """``torch._dynamo.utils.counters["cce"]``: "rewrites" and "misses" (tests and benchmarks read these)."""
    from torch._dynamo.utils import counters

    return counters["cce"]


def _record_miss(result: PassResult, where: str, kind: str, reason: str, category: str = "unsupported") -> None:
    result.misses.append(MissRecord(where, kind, reason, category))
    _counters()["misses"] += 1
    log.info("cce: left %s at %s alone: %s", kind, where, reason)


def _report_losses_left_in(body: GraphModule, hop: str, result: PassResult) -> None:
    for node in body.graph.nodes:
        if is_loss_node(node) and node.args and _fed_by_matmul(node.args[0]):
            _record_miss(result, location(node), _loss_kind(node),
                         f"inside the body of torch.ops.higher_order.{hop}, which the pass does not rewrite")
    for inner_hop, inner in _subgraph_bodies(body.graph):
        _report_losses_left_in(inner, inner_hop, result)


def _report_unserved(graph: torch.fx.Graph, result: PassResult, top_level: bool, handled: set,
                     read_nodes: frozenset = frozenset()) -> None:
    """Vocabulary-wide reads of lm-head logits other than a loss (RL log-probabilities, entropy, ...): misses,
    so that explain is never silent about logits it saw formed; returned logits: a note (top level only: a
    checkpointed body returns its values to its caller)."""
    try:
        found = find_unserved(graph, handled, read_nodes)
    except Exception:  # reporting must never fail a compile
        log.debug("cce: error while looking for unserved forms", exc_info=True)
        return
    for m in found.misses:
        _record_miss(result, m.where, m.loss, m.reason, m.category)
    if top_level:
        result.notes.extend(found.notes)


def _find_reads(graph: torch.fx.Graph) -> list:
    try:
        return find_reads(graph)
    except Exception:  # recognising reads must never fail a compile
        log.debug("cce: error while looking for reads", exc_info=True)
        return []


def _lm_head_shaped(m) -> bool:
    """A read (without a loss) is served for an lm-head only: a matmul wider than its input. Attention scores
    or a router's logits are no larger than what they are computed from, and the op would recompute them."""
    v, d = _last_dim(m.mm.node), m.D
    return not (isinstance(v, int) and isinstance(d, int) and v <= d)


def _record_rewrite(result: PassResult, r, kind: str, where: str) -> None:
    result.rewrites.append(r)
    _counters()["rewrites"] += 1
    log.info("cce: rewrote %s at %s (N=%s D=%s V=%s %s)%s", kind, where, r.N, r.D, r.V, r.options,
             "; " + "; ".join(r.notes) if r.notes else "")


def rewrite_graph(graph_or_module: Any) -> PassResult:
    """Rewrite every recognised linear + cross-entropy in a Dynamo FX graph, in place.

    Accepts a ``torch.fx.Graph`` (the custom-pass hook's argument) or a ``GraphModule`` (which is
    recompiled when anything changed). Returns what was rewritten and what was left alone, and why.
    Losses inside activation-checkpointed regions (their bodies are subgraphs) are rewritten too.
    """
    return _rewrite(graph_or_module, top_level=True)


def _internal_error(e: Exception, where: str) -> Miss:
    """An unforeseen graph shape while matching or planning: reported as a miss, never a failed compile."""
    log.debug("cce: matcher error at %s", where, exc_info=True)
    return Miss(f"internal error while matching: {type(e).__name__}: {e}")


def _matched(match_fn, start, where: str):
    """``match_fn(start)`` (a loss or a read), with any unforeseen error turned into a :class:`Miss`."""
    try:
        return match_fn(start)
    except Miss:
        raise
    except Exception as e:
        raise _internal_error(e, where) from e


def _planned(m, regions, reads, recomputed: bool, where: str):
    """``plan_rewrite`` with any unforeseen error turned into a :class:`Miss`."""
    try:
        return plan_rewrite(m, regions, reads, recomputed=recomputed)
    except Miss:
        raise
    except Exception as e:
        raise _internal_error(e, where) from e


def _rewrite(graph_or_module: Any, top_level: bool, recomputed: bool = False) -> PassResult:
    graph = graph_or_module.graph if isinstance(graph_or_module, GraphModule) else graph_or_module
    result = PassResult()
    for hop, body in _subgraph_bodies(graph):
        if hop in _INLINE_BODY_HOPS:
            inner = _rewrite(body, top_level=False, recomputed=hop == "tag_activation_checkpoint")
            result.rewrites.extend(inner.rewrites)
            result.misses.extend(inner.misses)
            result.notes.extend(inner.notes)
        else:
            _report_losses_left_in(body, hop, result)
    losses = [n for n in graph.nodes if is_loss_node(n)]
    reads = _find_reads(graph)
    if not losses and not reads:
        _report_unserved(graph, result, top_level, set())
        return result
    regions = Regions.of(graph)
    rewritten_here = 0
    matched: set = set()  # the matmuls of the losses handled here (rewritten or left alone with a reason)
    consumed: set = set()  # reads served by an op call already (their nodes are gone)
    for loss in losses:
        kind = _loss_kind(loss)
        where = location(loss)
        try:
            m = _matched(match_loss, loss, where)
            matched.update(m.mm.nodes)
            plan = _planned(m, regions, reads, recomputed, where)
            r = emit_plan(graph, plan)
        except Miss as e:
            if loss.args and _fed_by_matmul(loss.args[0]):
                _record_miss(result, where, kind, str(e), e.category)
            elif top_level and loss.args and _logits_are_graph_input(loss.args[0]):  # a body's inputs: its caller's
                _record_miss(result, where, kind, GRAPH_INPUT_REASON, "graph_input")
            continue
        consumed.update(sr.node for sr in plan.served)
        _record_rewrite(result, r, kind, where)
        rewritten_here += 1
    # Reads no loss served: a log-probability first (its ids make it the op's targets), then the others.
    for read in sorted(reads, key=lambda r: r.quantity is not Quantity.LOG_PROB):
        if read.node in consumed:
            continue
        kind, where = read.quantity.value, location(read.node)
        try:
            m = _matched(match_read, read, where)
            if m.mm.node in matched or not _lm_head_shaped(m):
                continue  # reported with the loss of the same logits; or not an lm-head (a router, scores)
            matched.update(m.mm.nodes)
            plan = _planned(m, regions, reads, recomputed, where)
            r = emit_plan(graph, plan)
        except Miss as e:
            if _fed_by_lm_head(read.src):
                _record_miss(result, where, kind, str(e), e.category)
            elif top_level and _logits_are_graph_input(read.src):
                _record_miss(result, where, kind, GRAPH_INPUT_REASON, "graph_input")
            continue
        consumed.update(sr.node for sr in plan.served)
        _record_rewrite(result, r, kind, where)
        rewritten_here += 1
    _report_unserved(graph, result, top_level, matched, frozenset(x for r in reads for x in r.nodes))
    if rewritten_here:  # a rewritten body recompiled itself; this graph only changed if it had rewrites
        graph.lint()
        owner = getattr(graph, "owning_module", None)
        if isinstance(graph_or_module, GraphModule):
            graph_or_module.recompile()
        elif isinstance(owner, GraphModule):
            owner.recompile()
    return result
