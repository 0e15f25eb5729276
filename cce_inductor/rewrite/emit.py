"""Emitting the replacement: the ``linear_cross_entropy`` call, the layout replayed on hidden, the
z-loss terms, the erasure of what became dead, and the stable topological sort."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch.fx import Graph, Node

from ..logging_ import log
from .fx_util import _call, _dtype, _shape, _val, location
from .match import Match, Miss, Step
from .records import Rewrite
from .regions import _Regions
from .spellings import _FLATTEN_FNS, _RESHAPE_FNS, _transposed_2d
from .zloss import _find_logsumexps


def _fake_eval(node: Node) -> None:
    """Fill ``meta['example_value']`` of a node we inserted, by running it on its inputs' fake values."""
    from torch._guards import detect_fake_mode

    from ..distributed.rewrite_hook import fake_mode_of

    def conv(a):
        return torch.fx.node.map_arg(a, _val)

    args, kwargs = conv(node.args), conv(node.kwargs)
    flat = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mode = fake_mode_of(flat) or detect_fake_mode(flat)  # fake_mode_of looks inside DTensors too
    if mode is None:
        return
    try:
        with mode:
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        node.meta["example_value"] = out
    except Exception:  # pragma: no cover - meta is a nicety for later passes
        log.debug("could not compute example_value for %s", node.name, exc_info=True)


def _op():
    from ..api import linear_cross_entropy

    return linear_cross_entropy


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
    """Insert nodes before ``anchor``, copying the loss's source location into their meta."""

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
        """Erase what we inserted (used when the rewrite fails before the loss was replaced)."""
        for n in reversed(self.emitted):
            if not n.users:
                self.graph.erase_node(n)
        self.emitted.clear()

    def cast(self, x: Node, dtype: Optional[torch.dtype]) -> Node:
        if dtype is None or _dtype(x) == dtype:
            return x
        return self("call_method", "to", (x, dtype))


def _replay_layout(emit: _Emitter, h: Node, st: Step, d: int) -> Node:
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


def apply_match(graph: Graph, m: Match, regions: _Regions) -> Rewrite:
    loss = m.loss
    mm = m.mm
    compute = _dtype(mm.node)
    region = regions.autocast.get(loss)
    dev = _val(mm.hidden).device.type if isinstance(_val(mm.hidden), torch.Tensor) else "cpu"
    if region is not None and region[0] == dev and region[1] != compute:
        raise Miss("the loss sits in an autocast region the matmul is not in")
    if regions.grad.get(loss) != regions.grad.get(mm.node):
        raise Miss("the matmul and the loss run under different grad modes (torch.no_grad())")
    order = list(reversed(m.steps))  # matmul → loss
    scale = 1.0
    softcap = None
    bias = mm.bias
    for st in order:
        if st.kind == "scale":
            scale *= st.value
        elif st.kind == "softcap":
            softcap = st.value
        elif st.kind == "bias":
            bias = st.value
    lses = _find_logsumexps(m)

    emit = _Emitter(graph, loss)
    try:
        return _emit_rewrite(graph, m, emit, compute, order, scale, softcap, bias, lses)
    except Miss:
        emit.undo()
        raise
    except Exception as e:  # never break the user's compile: leave this loss as it was
        emit.undo()
        log.warning("cce: internal error while rewriting %s; left alone", location(loss), exc_info=True)
        raise Miss(f"internal error: {type(e).__name__}: {e}") from e


def _emit_rewrite(graph: Graph, m: Match, emit: _Emitter, compute: Optional[torch.dtype], order: list,
                  scale: float, softcap: Optional[float], bias: Optional[Node], lses: list) -> Rewrite:
    loss, mm = m.loss, m.mm
    h = emit.cast(mm.hidden, compute)
    if mm.weight is not None:
        w = emit.cast(mm.weight, compute)
    else:
        w = emit.cast(emit("call_method", "t", (mm.weight_t,)), compute)
    b = emit.cast(bias, compute) if bias is not None else None
    h_at = {-1: h}  # hidden after the i-th step (eager order)
    d_arg = m.D if isinstance(m.D, int) else None
    for i, st in enumerate(order):
        if st.kind == "layout":
            if d_arg is None and _call(st.node, _RESHAPE_FNS, ("view", "reshape")):
                d_arg = emit("call_method", "size", (h, -1))  # symbolic D: read it off hidden
            h = _replay_layout(emit, h, st, d_arg)
        h_at[i] = h
    kwargs = dict(bias=b, ignore_index=m.ignore_index, reduction=m.reduction,
                  label_smoothing=m.label_smoothing, softcap=softcap, logit_scale=scale)
    if lses:
        kwargs["return_lse"] = True
    if m.parallel is not None:  # a vocabulary-sharded DTensor lm-head (cce_inductor.distributed.rewrite_hook)
        kwargs.update(m.parallel.kwargs)
    call = emit("call_function", _op() if m.parallel is None else m.parallel.target, (h, w, m.target), kwargs)
    if lses:
        out = emit("call_function", operator.getitem, (call, 0))
        lse = emit("call_function", operator.getitem, (call, 1))
    else:
        out, lse = call, None
    out = emit.cast(out, _dtype(loss))
    for u, i, keepdim, extra_step in lses:
        hx = h_at[i]
        if extra_step is not None:
            hx = _replay_layout(emit, hx, extra_step, d_arg if d_arg is not None else emit("call_method", "size", (hx, -1)))
        lead = emit("call_function", operator.getitem, (emit("call_method", "size", (hx,)), slice(None, -1)))
        r = emit("call_method", "reshape", (lse, lead))
        if keepdim:
            r = emit("call_method", "unsqueeze", (r, -1))
        r = emit.cast(r, _dtype(u))
        u.replace_all_uses_with(r)
        src = u.args[0] if u.args else None
        graph.erase_node(u)
        if isinstance(src, Node) and src is not (m.mm.node if i == -1 else order[i].node) and not src.users:
            graph.erase_node(src)  # the separate z.float() / z.view(-1, V) feeding the logsumexp
    loss.replace_all_uses_with(out)
    graph.erase_node(loss)
    if lses:
        # a logsumexp computed before the loss had users earlier than the op call: restore the order
        _stable_topological_sort(graph)

    # erase what became dead: the chain (loss → matmul), softcap internals, and W.T
    dead_candidates = []
    for st in m.steps:
        dead_candidates.append(st.node)
        dead_candidates.extend(st.extra)
    dead_candidates.append(mm.node)
    if mm.weight_t is not None:
        dead_candidates.append(mm.weight_t)
    for n in mm.node.args:
        if isinstance(n, Node) and _transposed_2d(n) is not None:
            dead_candidates.append(n)
    erased = set()
    changed = True
    while changed:
        changed = False
        for n in dead_candidates:
            if n not in erased and not n.users:
                graph.erase_node(n)
                erased.add(n)
                changed = True
    logits_kept = mm.node not in erased

    t_shape = _shape(m.target) or ()
    n_tok = 1
    for s in t_shape:
        hint = _hint(s)
        n_tok = None if hint is None or n_tok is None else n_tok * hint
    has_upcast = any(st.kind == "cast" for st in m.steps)
    if n_tok is not None:
        per_row = 4 + (4 if has_upcast else 0) + (0 if logits_kept else _dtype_bytes(compute))
        saved = n_tok * (_hint(m.V) or 0) * per_row
    else:
        saved = None
    opts = {"reduction": m.reduction, "ignore_index": m.ignore_index}
    if m.label_smoothing:
        opts["label_smoothing"] = m.label_smoothing
    if softcap is not None:
        opts["softcap"] = softcap
    if scale != 1.0:
        opts["logit_scale"] = scale
    if bias is not None:
        opts["bias"] = True
    notes = []
    if logits_kept:
        live = [n for n in [mm.node] + [st.node for st in reversed(m.steps)] if n not in erased]
        outside = sorted({u.name if u.op != "output" else "graph output" for n in live for u in n.users
                          if u not in live})
        notes.append("logits kept (the original matmul stays for their other users: "
                     f"{', '.join(outside)}); the fp32 upcast and log-softmax copies are still avoided")
    if lses:
        notes.append(f"{len(lses)} logsumexp (z-loss) served by the op's lse")
    if m.parallel is not None:
        notes.append(m.parallel.note)
    n_sym = "x".join(str(s) for s in t_shape) or "1"
    return Rewrite(location(loss), m.kind, mm.spelling, n_sym if n_tok is None else n_tok, _size_str(m.D),
                   _size_str(m.V),
                   str(compute).replace("torch.", ""), opts, saved, logits_kept, len(lses), notes)


def _stable_topological_sort(graph: Graph) -> None:
    """Reorder so every node comes after its inputs, moving only the nodes that must move: a node
    waiting on an input is placed right after the last of its inputs is placed."""
    placed: set = set()
    waiting: dict = {}  # input node -> nodes waiting on it
    missing: dict = {}  # waiting node -> its inputs not yet placed
    order: list = []
    for n in list(graph.nodes):
        todo = [a for a in n.all_input_nodes if a not in placed]
        if todo:
            missing[n] = set(todo)
            for a in todo:
                waiting.setdefault(a, []).append(n)
            continue
        stack = [n]
        while stack:
            x = stack.pop()
            order.append(x)
            placed.add(x)
            for w in waiting.pop(x, []):
                deps = missing.get(w)
                if deps is not None:
                    deps.discard(x)
                    if not deps:
                        del missing[w]
                        stack.append(w)
    if missing:  # pragma: no cover - impossible in a graph without cycles
        return
    prev = None
    for n in order:
        if prev is not None and n.prev is not prev:
            prev.append(n)
        prev = n


def _size_str(x: Any) -> Any:
    return x if isinstance(x, int) else f"{x} (hint {_hint(x)})"
