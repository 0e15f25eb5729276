"""The plan: everything the replacement needs, decided — and every reason to refuse found — before the
graph is touched.

:func:`plan_rewrite` turns a :class:`~.match.Match` (the walk's result: a loss or a per-row read, typed
steps, matmul) into a :class:`Plan`: the folded epilogue constants, the dtype the op computes in and the
dtype of every input it is handed, the other reads of the same logits it serves (z-loss logsumexps,
entropies: :mod:`.served`). It refuses (raises :class:`~.match.Miss` with the reason) when the replacement
would not compute what eager computes:

* **modes** — a node the op stands for (the matmul, each step, the read's own nodes) under no_grad while the
  loss (or read) it stands for runs with grad; a served read under grad while the op runs without; anything
  inside a torch.func transform / forward-AD level. (A served read under no_grad next to an op with grad is
  served detached; an op whose loss or read runs under no_grad runs without grad, whatever computed the
  logits: nothing else reads them.)
* **options** — a zero, non-finite scale or softcap; a bias that is not ``[V]``; ``D == 0``;
* **dtypes** — operands eager would reject (mixed dtypes with no autocast), a narrowing cast of the logits
  (or of a z-loss's copy of them) to 16 bits (the op would skip that rounding); a bias is handed over in
  the precision eager adds it in;
* **mutation and aliasing** — anything writing, between the matmul and the loss, to the logits (or a
  read's copy of them: a log_softmax, a softmax), the hidden states, the weight or the bias, or to any
  tensor sharing memory with them; any write at all between a served read and the loss; writes after the
  loss to what the op saves; hooks on the logits;
* **served reads** — what uses one before the loss moves after the op: refused when the op's own
  inputs are computed from it, or a moved node runs under another mode or draws random numbers.

Emission (``emit``) then only builds what the plan says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.fx import Node

from .. import config
from ..options import LossOptions
from ..paths import choose_path
from .fx_util import _dtype, _same_size, _shape, _val, location
from .kept_logits import check_logits_unshared
from .match import Match, Miss
from .mutation import callee_name, may_share_memory, observed_for_grad, storages, writes
from .reads import Quantity
from .regions import Regions
from .served import ServedRead, describe, find_served_reads
from .steps import StepKind

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # autocast never casts float64


@dataclass
class Plan:
    match: Match
    compute_dtype: torch.dtype  # eager's matmul output dtype: hidden and weight are handed to the op in it
    bias: Optional[Node]
    bias_dtype: Optional[torch.dtype]  # the dtype the bias is handed to the op in
    options: LossOptions
    served: list  # ServedRead: the other reads of the same logits the op's outputs serve
    path: str = "auto"  # the op's path= argument ("auto" | "fast" | "low_memory")
    expected_path: str = ""  # what that resolves to at the traced sizes ("fast" | "low_memory"), for explain
    path_reason: str = ""

    @property
    def quantities(self) -> list:
        """The quantities read: the op's anchor read (if it stands for one) and the served reads."""
        return ([self.match.read.quantity] if self.match.read is not None else []) + [
            sr.read.quantity for sr in self.served]

    @property
    def needs_lse(self) -> bool:
        return any(q.needs_lse for q in self.quantities)

    @property
    def needs_entropy(self) -> bool:
        return any(q.needs_entropy for q in self.quantities)


def stat_dtype(compute: torch.dtype) -> torch.dtype:
    """The op's arithmetic dtype for a given input dtype (as ``core.dtypes.stat_dtype``)."""
    return torch.float64 if compute == torch.float64 else torch.float32


def _more_precise(a: torch.dtype, b: torch.dtype) -> bool:
    """True when floating dtype ``a`` has a finer resolution than ``b``."""
    return torch.finfo(a).eps < torch.finfo(b).eps


def widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """True when every value of ``src`` is exactly a value of ``dst`` (a cast that cannot round)."""
    if src == dst:
        return True
    if not (src.is_floating_point and dst.is_floating_point):
        return False
    a, b = torch.finfo(src), torch.finfo(dst)
    return a.eps >= b.eps and a.max <= b.max and a.tiny >= b.tiny


def _fold_epilogue(m: Match) -> tuple[float, Optional[float], Optional[Node]]:
    scale, softcap, bias = 1.0, None, m.mm.bias
    for st in m.order:
        if st.kind is StepKind.SCALE:
            if not math.isfinite(st.value) or st.value == 0:
                raise Miss(f"a logit scale of {st.value} (zero or not finite) is not folded")
            scale *= st.value
        elif st.kind is StepKind.SOFTCAP:
            softcap = st.value
        elif st.kind is StepKind.BIAS:
            bias = st.value
    if not math.isfinite(scale) or scale == 0:
        raise Miss(f"the folded logit scale {scale} is zero or not finite")
    return scale, softcap, bias


def _anchor_noun(m: Match) -> str:
    """How reasons name what the op stands for: "the loss", or the read ("the log_prob read")."""
    return "the loss" if m.read is None else f"the {m.kind} read"


def _replaced_nodes(m: Match, served: list) -> list:
    """Every node whose value the op's outputs stand for: the matmul, each step (and its extra nodes), the
    read the op stands for, each served read and what feeds it."""
    nodes = list(m.mm.nodes) + [st.node for st in m.steps] + [x for st in m.steps for x in st.extra]
    if m.read is not None:
        nodes += list(m.read.inner)
    for sr in served:
        nodes += list(sr.nodes)
    return nodes + [m.loss]


def _check_modes(m: Match, regions: Regions, served: list) -> list:
    """The op runs under the grad mode of the loss (or read) it stands for. Nodes before it under no_grad
    while it runs with grad would make eager's value carry no gradient where the op's would; with the op under
    no_grad nothing carries a gradient, as in eager (nothing else reads the logits: ``kept_logits``). A served
    read under no_grad next to an op with grad is served detached; one under grad next to an op without is
    refused. Returns ``served`` with the detach decisions."""
    anchor_grad = regions.grad.get(m.loss)
    own = [n for n in _replaced_nodes(m, []) if n is not m.loss]
    for n in own + [m.loss] + [x for sr in served for x in sr.nodes]:
        if regions.transforms.get(n, 0):
            raise Miss("inside a torch.func transform (grad/vmap/jvp) or a forward-mode AD level: left to eager "
                       "autograd")
    if anchor_grad:
        for n in own:
            if not regions.grad.get(n):
                what = "the matmul" if n in m.mm.nodes else f"`{n.name}` ({location(n)})"
                raise Miss(f"{what} and {_anchor_noun(m)} run under different grad modes (torch.no_grad() / "
                           "enable_grad())")
    decided = []
    for sr in served:
        modes = {bool(regions.grad.get(n)) for n in sr.nodes}
        if len(modes) > 1 or (modes == {True} and not anchor_grad):
            raise Miss(f"{describe(sr)} at {location(sr.node)} and {_anchor_noun(m)} run under different grad "
                       "modes (torch.no_grad() / enable_grad())")
        decided.append(replace(sr, detach=bool(anchor_grad) and modes == {False}))
    return decided


def _check_shapes(m: Match, bias: Optional[Node]) -> None:
    if isinstance(m.D, int) and m.D == 0:
        raise Miss("the hidden size D is 0")
    if isinstance(m.V, int) and m.V == 0:
        raise Miss("the vocabulary size V is 0")
    if bias is not None:
        bs = _shape(bias)
        if bs is None or len(bs) != 1 or not _same_size(bs[0], m.V):
            raise Miss(f"the bias has shape {list(bs) if bs is not None else '?'}, not [V] = [{m.V}] "
                       "(a broadcast bias is left alone)")


def _plan_dtypes(m: Match, regions: Regions, bias: Optional[Node],
                 served: list) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """(compute dtype, bias dtype): hidden/weight are handed over in the matmul's own output dtype, as
    eager (with autocast, if any) computes it; a bias added after the matmul keeps its own precision."""
    mm = m.mm
    compute = _dtype(mm.node)
    if compute not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise Miss(f"the logits matmul computes in {compute}")
    device = _val(mm.hidden).device.type
    amp = regions.autocast_dtype(mm.node, device)
    for name, node in mm.operands():
        dt = _dtype(node)
        cast_by_autocast = amp is not None and dt in _AUTOCAST_ELIGIBLE and amp == compute
        if dt != compute and not cast_by_autocast:  # (einsum with D=1 is a mul: autocast leaves it alone)
            raise Miss(f"the matmul's {name} is {dt} but it computes in {compute} with no autocast cast between "
                       "(eager rejects mixed dtypes here)")
    # The op computes in float32 (float64 for float64 inputs). Steps eager computes in a wider dtype agree
    # with it to that precision; what it must not do is skip a rounding to 16 bits that eager does, or
    # round to 16 bits what eager keeps wider.
    for st in m.order:
        to = st.value if st.kind is StepKind.NORMALIZE else _dtype(st.node) if st.kind is StepKind.CAST else None
        if isinstance(to, torch.dtype) and not widens(_dtype(st.src), to) and _more_precise(torch.float32, to):
            raise Miss(f"a narrowing cast of the logits ({_dtype(st.src)} -> {to}) rounds them; the op would not")
    for sr in served:
        f = sr.feeder
        to, frm = (_dtype(f), _dtype(sr.chain_node)) if f is not None and f.op == "call_method" else (None, None)
        if frm is not None and to != frm and not widens(frm, to) and _more_precise(torch.float32, to):
            raise Miss(f"{describe(sr)} reads the logits cast to {to}: the op's output skips that rounding")
    for read in ([m.read] if m.read is not None else []) + [sr.read for sr in served]:
        for to in read.casts:  # log_softmax(z, dtype=...), softmax(z, dtype=...)
            if isinstance(to, torch.dtype) and not widens(_dtype(read.src), to) and _more_precise(torch.float32, to):
                raise Miss(f"a narrowing cast of the logits ({_dtype(read.src)} -> {to}) in the "
                           f"{read.quantity.value} read rounds them; the op would not")
    bias_dtype = None
    if bias is not None:
        if not (_dtype(bias) or torch.int64).is_floating_point:
            raise Miss("the bias is not floating point")
        if bias is mm.bias:
            bias_dtype = compute  # F.linear / addmm: the bias takes the matmul's dtype (autocast casts it too)
        else:  # z + b is computed in promote(z, b): hand the bias over in the op's own arithmetic dtype
            bias_dtype = _dtype(bias) if _dtype(bias) == compute else stat_dtype(compute)
            if _more_precise(_dtype(bias), bias_dtype):
                raise Miss(f"a {_dtype(bias)} bias after a {compute} matmul: eager computes the loss in "
                           f"{_dtype(bias)}, the op would in {bias_dtype}")
    return compute, bias_dtype


def _node_positions(graph: torch.fx.Graph) -> dict:
    return {n: i for i, n in enumerate(graph.nodes)}


def _check_mutation(m: Match, bias: Optional[Node], served: list, pos: dict) -> None:
    """Nothing may write, between the matmul and the last node the replacement stands for, to memory the
    replacement reads (hidden, weight, bias) or that eager's logits live in (every step's value); nor,
    after that, to what the op saves for its backward (hidden, weight, bias, targets)."""
    mm = m.mm
    reads = dict((what, node) for what, node in mm.operands() if what != "bias")
    if bias is not None:
        reads["bias"] = bias
    # (storages, what) of each tensor the op saves for its backward, and of each the window must not touch.
    targets = [("targets", m.target)] if m.target is not None else []
    saved = [(storages(node), what) for what, node in list(reads.items()) + targets]
    protected = [(keys, what) for keys, what in saved if what != "targets"]
    chain = [n for n in _replaced_nodes(m, served) if n is not m.loss]
    logits = [(storages(n), "logits") for n in chain]
    protected += logits
    start = min(pos[n] for n in mm.nodes)  # a sum of matmuls: from the first of them
    end = max([pos[m.loss]] + [pos[sr.node] for sr in served])
    # The op stands where the loss stands; what uses a served read before that moves after it, past
    # anything in between, so nothing in between may write at all.
    first = min(served, key=lambda sr: pos[sr.node], default=None)
    first_at = pos[first.node] if first is not None else end
    chain = set(chain)
    noun = _anchor_noun(m)
    for n in m.loss.graph.nodes:
        p = pos[n]
        if p <= start or n in chain:
            continue
        written = writes(n)
        if first_at < p < pos[m.loss] and written:
            raise Miss(f"{_what_writes(n)} writes between {describe(first)} and {noun}, at {location(n)}: "
                       f"the op's output is ready only where {noun} stands")
        for w in written:
            keys = storages(w)
            if p < end:
                hit = _first_sharing(keys, protected)
                if hit is not None:
                    raise Miss(f"{_what_writes(n)} writes to the {hit} (or memory they share) between the "
                               f"matmul and {noun}, at {location(n)}")
            elif p > end:
                hit = _first_sharing(keys, saved)
                if hit is not None:
                    raise Miss(f"{_what_writes(n)} writes to the {hit} after {noun}, at {location(n)}: "
                               "the op saves them for its backward")
    # Hooks / retain_grad on the logits would miss the loss's part of their gradient.
    for n in m.loss.graph.nodes:
        seen = observed_for_grad(n)
        if seen is not None and _first_sharing(storages(seen), logits) is not None:
            raise Miss(f"{callee_name(n)}() on the logits at {location(n)}: their gradient would not include "
                       f"{'the loss' if m.read is None else 'the read'}'s")


# Ops that draw random numbers: moving one past another would change what each draws.
_RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_",
    "random_", "poisson", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
    "dropout2d", "dropout3d", "rrelu", "native_dropout",
})


def _check_moved_users(m: Match, bias: Optional[Node], served: list, regions: Regions, pos: dict) -> None:
    """The op stands where the loss (or read) stands, so what is computed from a served read before it moves
    after it. Refused when that cannot be done without changing the program: the op's own inputs computed
    from that read (a cycle), or a moved node running under another grad mode, autocast region or transform
    than the loss, or drawing random numbers."""
    if not served:
        return
    downstream: set = set()
    of: dict = {}
    stack = [(sr.node, sr) for sr in served]
    while stack:
        node, sr = stack.pop()
        for user in node.users:
            if user not in downstream:
                downstream.add(user)
                of[user] = sr
                stack.append((user, sr))
    mm = m.mm
    noun = _anchor_noun(m)
    for what, node in [(w, n) for w, n in mm.operands() if w != "bias"] + [("bias", bias), ("targets", m.target)]:
        if node is not None and node in downstream:
            raise Miss(f"the {what} of {noun} are computed from {describe(of[node])}: the op would need "
                       "its own output")

    def region(n):
        return regions.grad.get(n), tuple(regions.autocast.get(n, ())), regions.transforms.get(n, 0)
    loss_at, loss_region = pos[m.loss], region(m.loss)
    for n in sorted(downstream, key=pos.__getitem__):
        if pos[n] >= loss_at:
            break
        if region(n) != loss_region:
            raise Miss(f"`{n.name}` uses {describe(of[n])} before {noun} under another grad mode or "
                       f"autocast region, at {location(n)}: the op's output is ready only where {noun} stands")
        if n.op in ("call_function", "call_method") and callee_name(n) in _RANDOM_OPS:
            raise Miss(f"`{n.name}` draws random numbers from {describe(of[n])} before {noun}, at "
                       f"{location(n)}: moving it after the op would change what it draws")


def _first_sharing(keys, named: list) -> Optional[str]:
    """The name of the first (storages, name) in ``named`` that may share memory with ``keys``."""
    for other, what in named:
        if may_share_memory(keys, other):
            return what
    return None


def _what_writes(n: Node) -> str:
    if n.op == "call_method":
        return f"`.{n.target}()`"
    name = callee_name(n)
    return "`setitem` (z[...] = ...)" if name == "setitem" else f"`{name}`"


def _plan_path(m: Match, regions: Regions, compute: torch.dtype, needs_lse: bool, needs_entropy: bool,
               recomputed: bool):
    """(path argument, expected path, reason). The argument is ``config.path`` as it is now (so it is part of
    the graph, and of every cache key), or "low_memory" inside an activation-checkpointed region: that code
    runs again in the backward, and the fast path would form the gradients twice. The expected path is
    ``paths.choose_path`` at the traced sizes (the op decides again from the real sizes when it runs)."""
    if recomputed:
        return "low_memory", "low_memory", "inside an activation-checkpointed region (recomputed in the backward)"
    grad_on = regions.grad.get(m.loss, torch.is_grad_enabled())
    mm = m.mm
    inputs = [node for _, node in mm.operands()]
    needs_grad = grad_on and any(isinstance(_val(n), torch.Tensor) and _val(n).requires_grad
                                 for n in inputs if n is not None)
    n_tokens = 1  # (a log-probability's ids have a trailing unit dim)
    for s_ in (_shape(m.target) if m.target is not None else _shape(m.read.src)[:-1]) or ():
        n_tokens = n_tokens * s_
    choice = choose_path(n_tokens, m.D, m.V, compute, _val(mm.hidden).device, m.reduction, needs_lse,
                         needs_grad, config.path, return_entropy=needs_entropy)
    return config.path, choice.path, choice.reason


def plan_rewrite(m: Match, regions: Regions, reads: list = (), recomputed: bool = False) -> Plan:
    """Decide the whole replacement for a match, or raise Miss with the reason. ``reads``: every read of the
    graph (``reads.find_reads``): those of the same logits the op's outputs give are served by it too. A loss
    whose logits are needed anyway (returned, or read by something else) is left to Inductor, after every
    other check: that reason is reported only when nothing else stands in the way."""
    served = find_served_reads(m, list(reads))
    served = _check_modes(m, regions, served)
    scale, softcap, bias = _fold_epilogue(m)
    _check_shapes(m, bias)
    try:
        options = LossOptions(ignore_index=m.ignore_index, label_smoothing=m.label_smoothing, softcap=softcap,
                              logit_scale=scale)
    except ValueError as e:
        raise Miss(f"options the op refuses: {e}") from e
    compute, bias_dtype = _plan_dtypes(m, regions, bias, served)
    if m.parallel is not None and any(sr.read.quantity is not Quantity.LSE for sr in served):
        raise Miss("an entropy read of a vocabulary-sharded (DTensor) lm-head: the vocabulary-parallel op serves "
                   "cross_entropy / nll_loss and a logsumexp only")
    pos = _node_positions(m.loss.graph)
    _check_mutation(m, bias, served, pos)
    _check_moved_users(m, bias, served, regions, pos)
    check_logits_unshared(m, served, in_region=recomputed)
    plan = Plan(m, compute, bias, bias_dtype, options, served)
    plan.path, plan.expected_path, plan.path_reason = _plan_path(m, regions, compute, plan.needs_lse,
                                                                 plan.needs_entropy, recomputed)
    return plan


__all__ = ["Plan", "plan_rewrite", "widens", "stat_dtype", "ServedRead"]
