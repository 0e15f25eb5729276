"""Emitting a :class:`~.plan.Plan`: the op call, the layout replayed on hidden, the reads served from its outputs
(a log-probability is minus the per-token loss; entropy, lse, ``Σ p z = lse - entropy``); then the switch of
the loss's (or read's) users to the op's output and the erasure of what became dead.

Emission is a transaction. Every new node is inserted before the loss and evaluated on the fake values
Dynamo recorded (so the op's own input checks run now, not later when the graph is traced); only when
all of that succeeded are the loss's users switched over. If anything fails before the switch, the
inserted nodes are erased and the graph is exactly as it was: the failure becomes a miss, never a
compile error.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch.fx import Graph, Node

from .. import dispatch
from .dtensor_hook import fake_mode_of
from .fx_util import _call, _dtype, _shape, _val, location
from .match import Miss
from .mutation import PURE_CALLABLES
from .plan import Plan
from .reads import Quantity, Read
from .records import Rewrite
from .spellings import _FLATTEN_FNS, _RESHAPE_FNS, _transposed_2d
from .steps import Step, StepKind


def op_target():
    """The callable the rewrite inserts: the public op minus autocast (the plan already chose the dtypes)."""
    PURE_CALLABLES.add(dispatch.linear_cross_entropy)  # it writes none of its inputs
    return dispatch.linear_cross_entropy


def _fake_eval(node: Node) -> None:
    """Set ``meta['example_value']`` of a node we inserted by running it on its inputs' fake values.
    Raises what the call raises: that is how the op's own checks run at rewrite time."""
    from torch._guards import detect_fake_mode

    def conv(a):
        return torch.fx.node.map_arg(a, _val)

    args, kwargs = conv(node.args), conv(node.kwargs)
    flat = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mode = fake_mode_of(flat) or detect_fake_mode(flat)  # fake_mode_of looks inside DTensors too
    if mode is None:
        return
    with mode:
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    node.meta["example_value"] = out


def _dtype_bytes(dt: Optional[torch.dtype]) -> int:
    return torch.empty((), dtype=dt).element_size() if dt is not None else 4


def _hint(x: Any) -> Optional[int]:
    if isinstance(x, int):
        return x
    try:
        return int(x.node.hint) if x.node.hint is not None else None
    except Exception:
        return None


class _Emitter:
    """Insert nodes before ``anchor`` (copying its source location into their meta); ``undo`` erases them."""

    def __init__(self, graph: Graph, anchor: Node):
        self.graph, self.anchor = graph, anchor
        self.meta = {k: anchor.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack")
                     if k in anchor.meta}
        self.emitted: list = []

    def __call__(self, op: str, target: Any, args: tuple, kwargs: Optional[dict] = None) -> Node:
        with self.graph.inserting_before(self.anchor):
            n = self.graph.create_node(op, target, args, kwargs or {})
        self.emitted.append(n)
        n.meta.update(self.meta)
        _fake_eval(n)
        return n

    def undo(self) -> None:
        for n in reversed(self.emitted):
            for u in list(n.users):  # only our own nodes can use them before the switch
                if u not in self.emitted:  # pragma: no cover - the switch happens after emission
                    raise RuntimeError("cannot undo: an emitted node has users outside the emission")
            self.graph.erase_node(n)
        self.emitted.clear()

    def cast(self, x: Node, dtype: Optional[torch.dtype]) -> Node:
        if dtype is None or _dtype(x) == dtype:
            return x
        return self("call_method", "to", (x, dtype))


def _replay_layout(emit: _Emitter, h: Node, st: Step, d: Any) -> Node:
    """Apply a logits row-layout op to hidden: same op, with D in place of V in an explicit shape.
    ``view`` becomes ``reshape`` (hidden need not be contiguous where the fresh logits were)."""
    n = st.node
    if _call(n, (), ("contiguous",)):
        return h
    if _call(n, _RESHAPE_FNS, ("view", "reshape")):
        shape = n.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        shape = tuple(shape[:-1]) + (d,)
        return emit("call_method", "reshape", (h, shape))
    if _call(n, _FLATTEN_FNS, ("flatten",)):
        return emit(n.op, n.target, (h,) + tuple(n.args[1:]), dict(n.kwargs))
    return emit("call_function", operator.getitem, (h, n.args[1]))


def emit_plan(graph: Graph, plan: Plan) -> Rewrite:
    """Carry out a plan. Raises Miss (graph untouched) if any emitted node fails on the fake values."""
    emit = _Emitter(graph, plan.match.loss)
    try:
        out, replacements = _emit_nodes(emit, plan)
    except Exception as e:
        emit.undo()
        raise Miss(f"the replacement does not trace here ({type(e).__name__}: {e})") from e
    return _switch_and_clean(graph, plan, out, replacements)


def _emit_nodes(emit: _Emitter, plan: Plan) -> tuple[Node, list]:
    m, mm = plan.match, plan.match.mm
    compute = plan.compute_dtype
    h = emit.cast(mm.hidden, compute)
    w = emit.cast(mm.weight if mm.weight is not None else emit("call_method", "t", (mm.weight_t,)), compute)
    if mm.terms:  # h @ W.T + Σ s·(u @ B.T) = [h, s·u, ...] @ [W, B, ...].T (rewrite.low_rank)
        h, w = _concat_low_rank(emit, h, w, mm.terms, compute)
    b = emit.cast(plan.bias, plan.bias_dtype) if plan.bias is not None else None
    order = m.order
    h_at = {-1: h}  # hidden after the i-th step (eager order)
    d_arg = m.D if isinstance(m.D, int) else None
    for i, st in enumerate(order):
        if st.kind is StepKind.LAYOUT:
            if d_arg is None and _call(st.node, _RESHAPE_FNS, ("view", "reshape")):
                d_arg = emit("call_method", "size", (h, -1))  # symbolic D: read it off hidden
            h = _replay_layout(emit, h, st, d_arg)
        h_at[i] = h
    o = plan.options
    kwargs = dict(bias=b, ignore_index=o.ignore_index, reduction=m.reduction, label_smoothing=o.label_smoothing,
                  softcap=o.softcap, logit_scale=o.logit_scale, path=plan.path)
    if plan.needs_lse:
        kwargs["return_lse"] = True
    if plan.needs_entropy:
        kwargs["return_entropy"] = True
    target = op_target()
    if m.parallel is not None:  # a vocabulary-sharded DTensor lm-head (rewrite/dtensor_hook.py)
        kwargs.pop("path")
        kwargs.update(m.parallel.kwargs)
        target = m.parallel.target
        PURE_CALLABLES.add(target)  # it writes none of its inputs
    ids = m.target
    if m.read is not None and m.read.ids_unit:  # a log-probability's ids given as gather's index [..., 1]
        ids = emit("call_method", "squeeze", (ids, -1))
    call = emit("call_function", target, (h, w, ids), kwargs)
    outputs = {"loss": call}
    if plan.needs_lse or plan.needs_entropy:
        names = ["loss"] + (["lse"] if plan.needs_lse else []) + (["entropy"] if plan.needs_entropy else [])
        outputs = {name: emit("call_function", operator.getitem, (call, k)) for k, name in enumerate(names)}
    handed: set = set()  # outputs already handed out as a read's value (see _serve)
    if m.read is None:
        out = emit.cast(outputs["loss"], _dtype(m.loss))
    else:  # the op's per-token outputs are at the read's rows already
        out = _serve(emit, m.read, outputs, None, handed)
    replacements = []
    for sr in plan.served:
        hx = h_at[sr.position]
        if sr.extra_step is not None:
            hx = _replay_layout(emit, hx, sr.extra_step,
                                d_arg if d_arg is not None else emit("call_method", "size", (hx, -1)))
        lead = emit("call_function", operator.getitem, (emit("call_method", "size", (hx,)), slice(None, -1)))
        replacements.append((sr, _serve(emit, sr.read, outputs, lead, handed, detach=sr.detach)))
    return out, replacements


def _serve(emit: _Emitter, read: Read, outputs: dict, lead: Optional[Node], handed: set,
           detach: bool = False) -> Node:
    """The value of ``read`` from the op's outputs (reshaped to ``lead`` rows when given). Eager gives each read
    a tensor of its own: the first read of an output that is not computed from it (a bare lse or entropy) is
    a view of it (the op's outputs are its callers' alone: its backward keeps copies), a later bare read of
    the same output gets its own copy (``handed``: the outputs already handed out bare), so that writing one
    read in place never changes another."""
    def rows(x):
        return x if lead is None else emit("call_method", "reshape", (x, lead))
    q, sign = read.quantity, read.sign
    base = None  # the output v is a view of (None: v is a new tensor)
    if q is Quantity.LOG_PROB:  # log p[t] = -loss
        v, sign, base = rows(outputs["loss"]), -sign, "loss"
    elif q is Quantity.ENTROPY:
        v, base = rows(outputs["entropy"]), "entropy"
    elif q is Quantity.LSE:
        v, base = rows(outputs["lse"]), "lse"
    else:  # Σ p z = lse - H
        v = emit("call_function", operator.sub, (rows(outputs["lse"]), rows(outputs["entropy"])))
    if sign < 0:
        v, base = emit("call_function", operator.neg, (v,)), None
    cast = emit.cast(v, _dtype(read.node))
    if cast is not v:
        v, base = cast, None
    if base is not None:
        if base in handed:
            v = emit("call_function", torch.ops.cce.fresh_copy.default, (v,))
        handed.add(base)
    if read.keepdim:
        v = emit("call_method", "unsqueeze", (v, -1))
    if detach:
        v = emit("call_method", "detach", (v,))
    return v


def _concat_low_rank(emit: _Emitter, h: Node, w: Node, terms: tuple, compute: torch.dtype) -> tuple[Node, Node]:
    hs, ws = [h], [w]
    for t in terms:
        u = emit.cast(t.hidden, compute)
        hs.append(u if t.scale == 1.0 else emit("call_function", operator.mul, (u, t.scale)))
        ws.append(emit.cast(t.weight if t.weight is not None else emit("call_method", "t", (t.weight_t,)), compute))
    return emit("call_function", torch.cat, (hs, -1)), emit("call_function", torch.cat, (ws, 1))


def _switch_and_clean(graph: Graph, plan: Plan, out: Node, replacements: list) -> Rewrite:
    """Point the loss's (and served reads') users at the op, then erase what became dead."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    m, mm = plan.match, plan.match.mm
    for sr, r in replacements:
        sr.node.replace_all_uses_with(r)
        graph.erase_node(sr.node)
    m.loss.replace_all_uses_with(out)
    graph.erase_node(m.loss)
    if replacements:
        stable_topological_sort(graph)  # a read before the loss had users earlier than the op call

    reads = ([m.read] if m.read is not None else []) + [sr.read for sr in plan.served]
    dead_candidates = [x for st in m.steps for x in (st.node, *st.extra)] + list(mm.nodes)
    dead_candidates += [w for w in [mm.weight_t] + [t.weight_t for t in mm.terms] if w is not None]
    dead_candidates += [n for x in mm.nodes for n in x.args if isinstance(n, Node) and _transposed_2d(n) is not None]
    dead_candidates += [x for r in reads for x in (*r.inner, *r.aux)]
    dead_candidates += [sr.feeder for sr in plan.served if sr.feeder is not None]
    erased: set = {m.loss, *(sr.node for sr in plan.served)}
    changed = True
    while changed:
        changed = False
        for n in dead_candidates:
            if n not in erased and not n.users:
                graph.erase_node(n)
                erased.add(n)
                changed = True
    return _record(plan, erased)


def _record(plan: Plan, erased: set) -> Rewrite:
    m, mm = plan.match, plan.match.mm
    logits_kept = mm.node not in erased
    # the rows: the loss's targets, or the read's
    t_shape = (_shape(m.target) if m.read is None else tuple(_shape(m.read.src)[:-1])) or ()
    n_tok: Optional[int] = 1
    for s in t_shape:
        hint = _hint(s)
        n_tok = None if hint is None or n_tok is None else n_tok * hint
    has_upcast = any(st.kind is StepKind.CAST for st in m.steps)
    saved = None
    if n_tok is not None:
        per_row = 4 + (4 if has_upcast else 0) + (0 if logits_kept else _dtype_bytes(plan.compute_dtype))
        saved = n_tok * (_hint(m.V) or 0) * per_row
    o = plan.options
    opts = {"reduction": m.reduction, "ignore_index": o.ignore_index} if m.read is None else {}
    if m.read is not None or plan.served:
        opts["reads"] = "+".join(dict.fromkeys(q.value for q in plan.quantities))
    if o.label_smoothing:
        opts["label_smoothing"] = o.label_smoothing
    if o.softcap is not None:
        opts["softcap"] = o.softcap
    if o.logit_scale != 1.0:
        opts["logit_scale"] = o.logit_scale
    if plan.bias is not None:
        opts["bias"] = str(plan.bias_dtype).replace("torch.", "")
    notes = []
    if logits_kept:
        live = [n for n in [mm.node] + [st.node for st in reversed(m.steps)] if n not in erased]
        outside = sorted({u.name if u.op != "output" else "graph output" for n in live for u in n.users
                          if u not in live})
        notes.append("logits kept (the original matmul stays for their other users: "
                     f"{', '.join(outside)}); the fp32 upcast and log-softmax copies are still avoided")
    if m.read is not None:
        notes.append(f"reads {m.read.describe()}")
    n_lse = sum(sr.read.quantity is Quantity.LSE for sr in plan.served)
    if n_lse:
        notes.append(f"{n_lse} logsumexp (a z-loss, an entropy's lse) served by the op's lse")
    others = [sr for sr in plan.served if sr.read.quantity is not Quantity.LSE or sr.detach]
    if others:
        notes.append("also served by the op's outputs: " + "; ".join(
            f"{sr.read.describe()}{' (detached: read under no_grad)' if sr.detach else ''}" for sr in others))
    if m.parallel is not None:
        notes.append(m.parallel.note)
    n_sym = "x".join(str(s) for s in t_shape) or "1"
    path, reason = (plan.expected_path, plan.path_reason) if m.parallel is None else ("vocab_parallel", "")
    return Rewrite(location(m.loss), m.kind, mm.spelling, n_sym if n_tok is None else n_tok, _size_str(m.D),
                   _size_str(m.V), str(plan.compute_dtype).replace("torch.", ""), opts, saved, logits_kept,
                   n_lse, notes, path, reason)


def _size_str(x: Any) -> Any:
    return x if isinstance(x, int) else f"{x} (hint {_hint(x)})"
