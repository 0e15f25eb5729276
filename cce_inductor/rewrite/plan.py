"""The plan: everything the replacement needs, decided — and every reason to refuse found — before the
graph is touched.

:func:`plan_rewrite` turns a :class:`~.match.Match` (the walk's result: loss, typed steps, matmul) into a
:class:`Plan`: the folded epilogue constants, the dtype the op computes in and the dtype of every input
it is handed, the z-loss terms it serves. It refuses (raises :class:`~.match.Miss` with the reason) when
the replacement would not compute what eager computes:

* **modes** — any node the op stands for (the matmul, each step, a served logsumexp and what feeds it)
  under another grad mode than the loss, or inside a torch.func transform / forward-AD level;
* **options** — a zero, non-finite scale or softcap; a bias that is not ``[V]``; ``D == 0``;
* **dtypes** — operands eager would reject (mixed dtypes with no autocast), a narrowing cast of the logits
  (or of a z-loss's copy of them) to 16 bits (the op would skip that rounding); a bias is handed over in
  the precision eager adds it in;
* **mutation and aliasing** — anything writing, between the matmul and the loss, to the logits (or a
  z-loss's copy of them), the hidden states, the weight or the bias, or to any tensor sharing memory with
  them; any write at all between a served logsumexp and the loss; writes after the loss to what the op
  saves; hooks on the logits;
* **served logsumexps** — what uses one before the loss moves after the op: refused when the op's own
  inputs are computed from it, or a moved node runs under another mode or draws random numbers.

Emission (``emit``) then only builds what the plan says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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
from .regions import Regions
from .steps import StepKind
from .zloss import find_logsumexps

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # autocast never casts float64


@dataclass
class Plan:
    match: Match
    compute_dtype: torch.dtype  # eager's matmul output dtype: hidden and weight are handed to the op in it
    bias: Optional[Node]
    bias_dtype: Optional[torch.dtype]  # the dtype the bias is handed to the op in
    options: LossOptions
    lse_users: list  # (logsumexp node, eager-order position of its input, keepdim, extra layout step)
    path: str = "auto"  # the op's path= argument ("auto" | "fast" | "low_memory")
    expected_path: str = ""  # what that resolves to at the traced sizes ("fast" | "low_memory"), for explain
    path_reason: str = ""


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


def _lse_feeder(u: Node) -> Optional[Node]:
    """The tensor a served ``logsumexp`` reads (a chain node, or a cast / reshape of one)."""
    return u.args[0] if u.args else u.kwargs.get("input")


def _replaced_nodes(m: Match, lse_users: list) -> list:
    """Every node whose value the op's outputs stand for: the matmul, each step (and its extra nodes),
    each served logsumexp and what feeds it."""
    nodes = list(m.mm.nodes) + [st.node for st in m.steps] + [x for st in m.steps for x in st.extra]
    for u, *_ in lse_users:
        nodes += [u] + [f for f in (_lse_feeder(u),) if isinstance(f, Node)]
    return nodes + [m.loss]


def _check_modes(m: Match, regions: Regions, lse_users: list) -> None:
    """The op computes every replaced value under the loss's grad mode: a ``no_grad`` block around any of
    them (a step, a z-loss metric) makes eager's value carry no gradient where the op's would."""
    for n in _replaced_nodes(m, lse_users):
        if regions.grad.get(n) != regions.grad.get(m.loss):
            what = "the matmul" if n in m.mm.nodes else f"`{n.name}` ({location(n)})"
            raise Miss(f"{what} and the loss run under different grad modes (torch.no_grad() / enable_grad())")
        if regions.transforms.get(n, 0):
            raise Miss("inside a torch.func transform (grad/vmap/jvp) or a forward-mode AD level: left to eager "
                       "autograd")


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
                 lse_users: list) -> tuple[torch.dtype, Optional[torch.dtype]]:
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
    for u, *_ in lse_users:
        f = _lse_feeder(u)
        src = f.args[0] if isinstance(f, Node) and f.op == "call_method" and f.args else None
        to, frm = _dtype(f), _dtype(src) if isinstance(src, Node) else None
        if frm is not None and to != frm and not widens(frm, to) and _more_precise(torch.float32, to):
            raise Miss(f"the z-loss's logsumexp reads the logits cast to {to}: the op's lse skips that rounding")
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


def _check_mutation(m: Match, bias: Optional[Node], lse_users: list, pos: dict) -> None:
    """Nothing may write, between the matmul and the last node the replacement stands for, to memory the
    replacement reads (hidden, weight, bias) or that eager's logits live in (every step's value); nor,
    after that, to what the op saves for its backward (hidden, weight, bias, targets)."""
    mm = m.mm
    reads = dict((what, node) for what, node in mm.operands() if what != "bias")
    if bias is not None:
        reads["bias"] = bias
    # (storages, what) of each tensor the op saves for its backward, and of each the window must not touch.
    saved = [(storages(node), what) for what, node in list(reads.items()) + [("targets", m.target)]]
    protected = [(keys, what) for keys, what in saved if what != "targets"]
    chain = [n for n in _replaced_nodes(m, lse_users) if n is not m.loss]
    logits = [(storages(n), "logits") for n in chain]
    protected += logits
    start = min(pos[n] for n in mm.nodes)  # a sum of matmuls: from the first of them
    end = max([pos[m.loss]] + [pos[u[0]] for u in lse_users])
    # The op stands where the loss stands; what uses a served logsumexp before that moves after it, past
    # anything in between, so nothing in between may write at all.
    first_lse = min([pos[u[0]] for u in lse_users], default=end)
    chain = set(chain)
    for n in m.loss.graph.nodes:
        p = pos[n]
        if p <= start or n in chain:
            continue
        written = writes(n)
        if first_lse < p < pos[m.loss] and written:
            raise Miss(f"{_what_writes(n)} writes between the z-loss's logsumexp and the loss, at {location(n)}: "
                       "the op's lse is ready only where the loss stands")
        for w in written:
            keys = storages(w)
            if p < end:
                hit = _first_sharing(keys, protected)
                if hit is not None:
                    raise Miss(f"{_what_writes(n)} writes to the {hit} (or memory they share) between the "
                               f"matmul and the loss, at {location(n)}")
            elif p > end:
                hit = _first_sharing(keys, saved)
                if hit is not None:
                    raise Miss(f"{_what_writes(n)} writes to the {hit} after the loss, at {location(n)}: "
                               "the op saves them for its backward")
    # Hooks / retain_grad on the logits would miss the loss's part of their gradient.
    for n in m.loss.graph.nodes:
        seen = observed_for_grad(n)
        if seen is not None and _first_sharing(storages(seen), logits) is not None:
            raise Miss(f"{callee_name(n)}() on the logits at {location(n)}: their gradient would not include "
                       "the loss's")


# Ops that draw random numbers: moving one past another would change what each draws.
_RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_",
    "random_", "poisson", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
    "dropout2d", "dropout3d", "rrelu", "native_dropout",
})


def _check_served_lse_users(m: Match, bias: Optional[Node], lse_users: list, regions: Regions, pos: dict) -> None:
    """The op stands where the loss stands, so what is computed from a served logsumexp before the loss
    moves after it. Refused when that cannot be done without changing the program: the op's own inputs
    computed from that logsumexp (a cycle), or a moved node running under another grad mode, autocast
    region or transform than the loss, or drawing random numbers."""
    if not lse_users:
        return
    downstream: set = set()
    stack = [u for u, *_ in lse_users]
    while stack:
        for user in stack.pop().users:
            if user not in downstream:
                downstream.add(user)
                stack.append(user)
    mm = m.mm
    for what, node in [(w, n) for w, n in mm.operands() if w != "bias"] + [("bias", bias), ("targets", m.target)]:
        if node is not None and node in downstream:
            raise Miss(f"the {what} of the loss are computed from the z-loss's logsumexp: the op would need "
                       "its own output")

    def region(n):
        return regions.grad.get(n), tuple(regions.autocast.get(n, ())), regions.transforms.get(n, 0)
    loss_at, loss_region = pos[m.loss], region(m.loss)
    for n in sorted(downstream, key=pos.__getitem__):
        if pos[n] >= loss_at:
            break
        if region(n) != loss_region:
            raise Miss(f"`{n.name}` uses the z-loss's logsumexp before the loss under another grad mode or "
                       f"autocast region, at {location(n)}: the op's lse is ready only where the loss stands")
        if n.op in ("call_function", "call_method") and callee_name(n) in _RANDOM_OPS:
            raise Miss(f"`{n.name}` draws random numbers from the z-loss's logsumexp before the loss, at "
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


def _plan_path(m: Match, regions: Regions, compute: torch.dtype, lse_users: list, recomputed: bool):
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
    n_tokens = 1
    for s_ in _shape(m.target) or ():
        n_tokens = n_tokens * s_
    choice = choose_path(n_tokens, m.D, m.V, compute, _val(mm.hidden).device, m.reduction, bool(lse_users),
                         needs_grad, config.path)
    return config.path, choice.path, choice.reason


def plan_rewrite(m: Match, regions: Regions, recomputed: bool = False) -> Plan:
    """Decide the whole replacement for a match, or raise Miss with the reason. A loss whose logits are
    needed anyway (returned, or read by something else) is left to Inductor, after every other check: that
    reason is reported only when nothing else stands in the way."""
    lse_users = find_logsumexps(m)
    _check_modes(m, regions, lse_users)
    scale, softcap, bias = _fold_epilogue(m)
    _check_shapes(m, bias)
    try:
        options = LossOptions(ignore_index=m.ignore_index, label_smoothing=m.label_smoothing, softcap=softcap,
                              logit_scale=scale)
    except ValueError as e:
        raise Miss(f"options the op refuses: {e}") from e
    compute, bias_dtype = _plan_dtypes(m, regions, bias, lse_users)
    pos = _node_positions(m.loss.graph)
    _check_mutation(m, bias, lse_users, pos)
    _check_served_lse_users(m, bias, lse_users, regions, pos)
    check_logits_unshared(m, lse_users, in_region=recomputed)
    path, expected, reason = _plan_path(m, regions, compute, lse_users, recomputed)
    return Plan(m, compute, bias, bias_dtype, options, lse_users, path, expected, reason)


__all__ = ["Plan", "plan_rewrite", "widens", "stat_dtype"]
