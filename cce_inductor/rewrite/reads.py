"""What a program reads from the logits per row, besides a loss: the read spellings the op's outputs serve.

With ``p = softmax(z)`` over the vocabulary (the last dim), the op computes per row the loss (so the
log-probability of a target: ``log p[t] = -loss``), ``lse`` and the entropy ``H = -Σ p log p``. A *read* is
eager code whose value is one of these quantities (times ±1):

==============  ====================  ======================================================================
quantity        value per row         spellings (``t`` the target ids, ``L = log_softmax(z, -1)``)
==============  ====================  ======================================================================
``log_prob``    ``log p[t]``          ``torch.gather(L, -1, t[..., None])`` (``L.gather``, ``take_along_dim``);
                                      ``gather(z, -1, t[..., None]) - logsumexp(z, -1, keepdim=True)``
                                      (TRL's / verl's selective log-softmax)
``entropy``     ``-Σ p log p``        ``(softmax(z) * L).sum(-1)`` and ``(L.exp() * L).sum(-1)`` (= -H; a
                                      minus sign anywhere in it, or around it, gives H)
``mean_logit``  ``Σ p z = lse - H``   ``(softmax(z) * z).sum(-1)`` (verl's entropy is ``logsumexp(z) - this``)
``lse``         ``log Σ exp z``       ``torch.logsumexp(z, -1)``
==============  ====================  ======================================================================

They compose: a negation flips the sign; ``squeeze(-1)`` / ``unsqueeze(-1)`` drop / add the trailing unit
dim; and a *row decomposition* — a Python loop over the rows (``for row in z``: ``z[0], z[1], ...``) or
over chunks (``z.split(c)``, ``z.chunk(k)``), each read the same way, put back by ``torch.stack`` /
``torch.cat`` — is the read of the whole tensor (TRL's and verl's loops that save peak memory; a loop over
``zip(z, t)`` splits the ids the same way).

:func:`find_reads` returns the outermost reads of a graph. A read never includes the logits themselves
(``src``: a node of the chain the walk in ``match`` goes up from); its ``inner`` nodes (the log_softmax,
softmax, products, gathers, pieces) die with it. Whether those are needed by anything else is the plan's
question (``kept_logits``): a log_softmax read by a log-probability and an entropy is shared by two reads
served together.
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from ..options import NO_IGNORE_INDEX
from .fx_util import _bind, _call, _dtype, _norm_dim, _same_size, _shape, _sig, _val
from .spellings import _LOGSUMEXP_FNS, _LOGSUMEXP_SIG, _as_log_softmax


class Quantity(enum.Enum):
    LOG_PROB = "log_prob"      # log softmax(z)[t] = -(the op's per-token loss)
    ENTROPY = "entropy"        # -Σ p log p (the op's entropy output)
    MEAN_LOGIT = "mean_logit"  # Σ p z = lse - entropy
    LSE = "logsumexp"          # the op's lse output

    @property
    def needs_lse(self) -> bool:
        return self in (Quantity.LSE, Quantity.MEAN_LOGIT)

    @property
    def needs_entropy(self) -> bool:
        return self in (Quantity.ENTROPY, Quantity.MEAN_LOGIT)


@dataclass(frozen=True)
class Read:
    quantity: Quantity
    node: Node               # the outermost node: its value is ``sign * quantity`` per row of ``src``
    src: Node                # the logits it reads (vocabulary last)
    sign: float = 1.0
    keepdim: bool = False    # the value keeps a trailing unit dim ([..., 1])
    ids: Optional[Node] = None  # log_prob: the class ids, the read's rows' shape ([...]) or with a unit dim
    ids_unit: bool = False      # ``ids`` has the trailing unit dim (gather's own index, [..., 1])
    inner: tuple = ()        # nodes that die with it
    aux: tuple = ()          # nodes that die with it where nothing else uses them (pieces of the ids)
    casts: tuple = ()        # dtypes the spelling computes in (``log_softmax(z, dtype=...)``)
    spelling: str = ""

    @property
    def nodes(self) -> tuple:
        return (*self.inner, self.node)

    def describe(self) -> str:
        return f"{'-' if self.sign < 0 else ''}{self.quantity.value} ({self.spelling})"


_NEG_FNS = (operator.neg, torch.neg)
_SUB_FNS = (operator.sub, torch.sub)
_MUL_FNS = (operator.mul, torch.mul)
_SUM_FNS = (torch.sum,)
_EXP_FNS = (torch.exp,)
_SOFTMAX_FNS = (F.softmax, torch.softmax)
_GATHER_FNS = (torch.gather,)
_TAKE_ALONG_FNS = (torch.take_along_dim,)
_SQUEEZE_FNS = (torch.squeeze,)
_UNSQUEEZE_FNS = (torch.unsqueeze,)
_STACK_FNS = (torch.stack,)
_CAT_FNS = (torch.cat, torch.concat, torch.concatenate)
_SPLIT_FNS = (torch.split, torch.chunk, torch.tensor_split)

_SOFTMAX_SIG = _sig("input, dim=None, _stacklevel=3, dtype=None")
_GATHER_SIG = _sig("input, dim, index, *, sparse_grad=False, out=None")
_TAKE_ALONG_SIG = _sig("input, indices, dim=None, *, out=None")
_SUM_SIG = _sig("input, dim=None, keepdim=False, *, dtype=None, out=None")
_SQUEEZE_SIG = _sig("input, dim=None")
_STACK_SIG = _sig("tensors, dim=0, *, out=None")


def _ndim(node: Any) -> int:
    return len(_shape(node) or ())


def _is_last(node: Node, dim: Any) -> bool:
    """``dim`` (an int or a one-element list) is the last dim of ``node``'s value."""
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    nd = _ndim(node)
    return nd > 0 and _norm_dim(dim, nd) == nd - 1


def _single_tensor_arg(node: Node) -> Optional[Node]:
    return node.args[0] if node.args and isinstance(node.args[0], Node) else None


def _strip_neg(node: Any) -> tuple[Any, float, tuple]:
    """(x, sign, negation nodes) for ``-(-(x))`` ..."""
    sign, negs = 1.0, ()
    while isinstance(node, Node) and _call(node, _NEG_FNS, ("neg", "__neg__")) and len(node.args) == 1:
        sign, negs, node = -sign, negs + (node,), node.args[0]
    return node, sign, negs


# ---- the leaves: one vocabulary-wide op each -------------------------------------------------------

def _log_softmax_of(node: Any) -> Optional[tuple[Node, Any]]:
    """(z, dtype) for ``log_softmax(z, -1[, dtype])``."""
    if not isinstance(node, Node) or (ls := _as_log_softmax(node)) is None:
        return None
    z, dim, dt = ls
    return (z, dt) if isinstance(z, Node) and _is_last(z, dim) else None


def _softmax_of(node: Any) -> Optional[tuple[Node, Any, tuple]]:
    """(z, dtype, inner) for ``softmax(z, -1)`` or ``exp(log_softmax(z, -1))``."""
    if not isinstance(node, Node):
        return None
    if _call(node, _SOFTMAX_FNS, ("softmax",)):
        a = _bind(node, _SOFTMAX_SIG)
        if a and isinstance(a["input"], Node) and _is_last(a["input"], a["dim"]):
            return a["input"], a["dtype"], ()
        return None
    if _call(node, _EXP_FNS, ("exp",)) and len(node.args) == 1 and not node.kwargs:
        ls = _log_softmax_of(node.args[0])
        if ls is not None:
            return ls[0], ls[1], (node.args[0],)
    return None


def _logsumexp(node: Node) -> Optional[Read]:
    """``torch.logsumexp(z, -1[, keepdim])``, ``z.logsumexp(dim=-1)``."""
    if not _call(node, _LOGSUMEXP_FNS, ("logsumexp",)):
        return None
    a = _bind(node, _LOGSUMEXP_SIG)
    if not a or a.get("out") is not None or not isinstance(a["input"], Node) or not isinstance(a["keepdim"], bool):
        return None
    if not _is_last(a["input"], a["dim"]):
        return None
    return Read(Quantity.LSE, node, a["input"], keepdim=a["keepdim"], spelling="logsumexp")


def _without_unit_dim(index: Node) -> Optional[Node]:
    """t for an index written ``t.unsqueeze(-1)`` / ``t[..., None]`` / ``t[:, :, None]``, else None."""
    if _call(index, _UNSQUEEZE_FNS, ("unsqueeze",)) and len(index.args) == 2 and not index.kwargs:
        t, dim = index.args
        if isinstance(t, Node) and _norm_dim(dim, _ndim(t) + 1) == _ndim(t):
            return t
    if _call(index, (operator.getitem,)) and len(index.args) == 2 and isinstance(index.args[0], Node):
        t, key = index.args
        full = slice(None, None, None)
        if isinstance(key, tuple) and key and key[-1] is None and (
                key[:-1] == (Ellipsis,) or (len(key) == _ndim(t) + 1 and all(k == full for k in key[:-1]))):
            return t
    return None


def _ids(index: Node) -> tuple[Node, bool]:
    """(ids, ids has the unit dim) of a gather index ``[..., 1]``."""
    t = _without_unit_dim(index)
    return (t, False) if t is not None else (index, True)


def _gather_args(node: Node) -> Optional[tuple[Node, Node]]:
    """(input, index) for a gather over the last dim: ``torch.gather(x, -1, i)``, ``x.gather(-1, i)``,
    ``torch.take_along_dim(x, i, dim=-1)``, the index an int64 ``[..., 1]`` of the input's leading shape."""
    if _call(node, _GATHER_FNS, ("gather",)):
        a = _bind(node, _GATHER_SIG)
        if not a or a.get("out") is not None or a.get("sparse_grad"):
            return None
        x, dim, index = a["input"], a["dim"], a["index"]
    elif _call(node, _TAKE_ALONG_FNS, ("take_along_dim",)):
        a = _bind(node, _TAKE_ALONG_SIG)
        if not a or a.get("out") is not None or a["dim"] is None:
            return None
        x, dim, index = a["input"], a["dim"], a["indices"]
    else:
        return None
    if not (isinstance(x, Node) and isinstance(index, Node) and _is_last(x, dim)):
        return None
    if _dtype(index) != torch.int64 or index_rows_match(x, index) is not True:
        return None  # gather reads an index of another shape from other rows (or several ids per row)
    return x, index


def index_rows_match(x: Any, index: Any) -> Optional[bool]:
    """For ``gather(x, -1, index)``: None unless ``index`` has ``x``'s rank and one id per row (a unit last
    dim); then whether its leading sizes are provably ``x``'s (gather also reads a shorter index)."""
    xs, ixs = _shape(x), _shape(index)
    if not xs or not ixs or len(ixs) != len(xs) or not _same_size(ixs[-1], 1):
        return None
    return all(_same_size(a, b) for a, b in zip(ixs[:-1], xs[:-1]))


def _gathered_log_softmax(node: Node) -> Optional[Read]:
    """``torch.gather(log_softmax(z, -1), -1, t[..., None])`` → log p[t], keepdim."""
    g = _gather_args(node)
    if g is None or (ls := _log_softmax_of(g[0])) is None:
        return None
    ids, unit = _ids(g[1])
    return Read(Quantity.LOG_PROB, node, ls[0], keepdim=True, ids=ids, ids_unit=unit, inner=(g[0],),
                aux=() if unit else (g[1],), casts=(ls[1],) if ls[1] is not None else (),
                spelling="gather of log_softmax")


def _target_logit(node: Any) -> Optional[tuple[Node, Node, bool, tuple]]:
    """(z, index, keepdim, inner) for ``gather(z, -1, t[..., None])`` (optionally ``.squeeze(-1)``)."""
    if not isinstance(node, Node):
        return None
    if (sq := _squeezed_input(node)) is not None:
        inner = _target_logit(sq)
        return (inner[0], inner[1], False, inner[3] + (sq,)) if inner is not None and inner[2] else None
    g = _gather_args(node)
    return (g[0], g[1], True, ()) if g is not None else None


def _logit_minus_lse(node: Node) -> Optional[Read]:
    """``gather(z, -1, t[..., None]) - logsumexp(z, -1, keepdim=True)`` (either keepdim, matching) → log p[t]."""
    if not _call(node, _SUB_FNS, ("sub", "__sub__")) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    t = _target_logit(a)
    lse = _read(b) if isinstance(b, Node) else None
    if t is None or lse is None or lse.quantity is not Quantity.LSE or lse.sign != 1.0:
        return None
    z, index, keepdim, inner = t
    if lse.src is not z or lse.keepdim != keepdim:
        return None
    ids, unit = _ids(index)
    return Read(Quantity.LOG_PROB, node, z, keepdim=keepdim, ids=ids, ids_unit=unit, inner=(a, *inner, *lse.nodes),
                aux=(*lse.aux, *(() if unit else (index,))), spelling="gather minus logsumexp")


def _summed_product(node: Node) -> Optional[Read]:
    """``(P * L).sum(-1)`` → -H and ``(P * z).sum(-1)`` → Σ p z, with ``P = softmax(z)`` or ``L.exp()``,
    ``L = log_softmax(z)``; either factor (or the product) may be negated."""
    if not _call(node, _SUM_FNS, ("sum",)):
        return None
    kwargs = dict(node.kwargs)
    if "axis" in kwargs:  # torch.sum(x, axis=-1): numpy's name, which torch accepts
        kwargs["dim"] = kwargs.pop("axis")
    try:
        a = _SUM_SIG.bind(*node.args, **kwargs).arguments
    except TypeError:
        return None
    if a.get("dtype") is not None or a.get("out") is not None or not isinstance(a.get("keepdim", False), bool):
        return None
    prod, sign, negs = _strip_neg(a["input"])
    if not (_call(prod, _MUL_FNS, ("mul", "__mul__", "__rmul__")) and len(prod.args) == 2 and not prod.kwargs
            and "dim" in a and _is_last(prod, a["dim"])):
        return None
    factors = []
    for f in prod.args:
        x, s, n = _strip_neg(f)
        sign, negs = sign * s, negs + n
        factors.append(x)
    for p_node, other in (factors, factors[::-1]):
        sm = _softmax_of(p_node)
        if sm is None or not isinstance(other, Node):
            continue
        z, dt, sm_inner = sm
        casts = (dt,) if dt is not None else ()
        if (ls := _log_softmax_of(other)) is not None and ls[0] is z:
            casts += (ls[1],) if ls[1] is not None else ()
            return Read(Quantity.ENTROPY, node, z, sign=-sign, keepdim=a.get("keepdim", False),
                        inner=tuple(dict.fromkeys((*negs, prod, p_node, *sm_inner, other))), casts=casts,
                        spelling="sum of softmax times log_softmax")
        if other is z:
            return Read(Quantity.MEAN_LOGIT, node, z, sign=sign, keepdim=a.get("keepdim", False),
                        inner=tuple(dict.fromkeys((*negs, prod, p_node, *sm_inner))), casts=casts,
                        spelling="sum of softmax times the logits")
    return None


# ---- composition: signs, unit dims, row decompositions ------------------------------------------------

def _negated(node: Node) -> Optional[Read]:
    if not (_call(node, _NEG_FNS, ("neg", "__neg__")) and len(node.args) == 1 and isinstance(node.args[0], Node)):
        return None
    r = _read(node.args[0])
    return replace(r, node=node, sign=-r.sign, inner=r.nodes) if r is not None else None


def _squeezed_input(node: Node) -> Optional[Node]:
    """x for ``x.squeeze(-1)`` / ``torch.squeeze(x, -1)`` squeezing a last dim of size 1."""
    if not _call(node, _SQUEEZE_FNS, ("squeeze",)):
        return None
    a = _bind(node, _SQUEEZE_SIG)
    if not a or not isinstance(a["input"], Node) or a["dim"] is None or not _is_last(a["input"], a["dim"]):
        return None
    return a["input"] if _same_size((_shape(a["input"]) or (None,))[-1], 1) else None


def _squeezed(node: Node) -> Optional[Read]:
    x = _squeezed_input(node)
    r = _read(x) if x is not None else None
    return replace(r, node=node, keepdim=False, inner=r.nodes) if r is not None and r.keepdim else None


def _unsqueezed(node: Node) -> Optional[Read]:
    """``x.unsqueeze(-1)`` (a new last dim)."""
    if not _call(node, _UNSQUEEZE_FNS, ("unsqueeze",)) or len(node.args) != 2 or node.kwargs:
        return None
    x, dim = node.args
    if not isinstance(x, Node) or _norm_dim(dim, _ndim(x) + 1) != _ndim(x):
        return None
    r = _read(x)
    return replace(r, node=node, keepdim=True, inner=r.nodes) if r is not None and not r.keepdim else None


def _pieces(nodes: list, combine: str) -> Optional[tuple[Node, tuple]]:
    """(whole, piece nodes) when ``nodes`` are, in order, every row of one tensor along dim 0 (``combine`` is
    "stack": ``x[0], x[1], ...`` of an ``[n, ...]`` x) or every chunk of it ("cat": the outputs of one
    ``x.split(...)`` / ``x.chunk(...)`` along dim 0)."""
    if not nodes or not all(isinstance(n, Node) and _call(n, (operator.getitem,)) and len(n.args) == 2
                            for n in nodes):
        return None
    bases = {n.args[0] for n in nodes}
    if len(bases) != 1 or [n.args[1] for n in nodes] != list(range(len(nodes))):
        return None
    base = bases.pop()
    if not isinstance(base, Node):
        return None
    if combine == "stack":
        shape = _shape(base)
        return (base, ()) if shape and isinstance(shape[0], int) and shape[0] == len(nodes) else None
    if not _call(base, _SPLIT_FNS, ("split", "chunk", "tensor_split")) or not isinstance(base.args[0], Node):
        return None
    parts = _val(base)
    if not isinstance(parts, (tuple, list)) or len(parts) != len(nodes):
        return None
    dims = [v for k, v in base.kwargs.items() if k == "dim"] + list(base.args[2:3])
    if dims and _norm_dim(dims[0], _ndim(base.args[0])) != 0:
        return None
    return base.args[0], (base,)


def _combined_rows(node: Node) -> Optional[Read]:
    """``torch.stack([R(z[0]), R(z[1]), ...])`` / ``torch.cat([R(c) for c in z.split(k)])``: the read R of the
    whole of z (with the ids split the same way for a log-probability)."""
    if _call(node, _STACK_FNS):
        combine = "stack"
    elif _call(node, _CAT_FNS):
        combine = "cat"
    else:
        return None
    a = _bind(node, _STACK_SIG)
    if not a or a.get("out") is not None or not isinstance(a["tensors"], (list, tuple)) or _norm_dim(
            a["dim"], _ndim(node)) != 0:
        return None
    reads = [_read(e) if isinstance(e, Node) else None for e in a["tensors"]]
    if not reads or any(r is None for r in reads):
        return None
    first = reads[0]
    if any((r.quantity, r.sign, r.keepdim, r.casts) != (first.quantity, first.sign, first.keepdim, first.casts)
           for r in reads):
        return None
    whole = _pieces([r.src for r in reads], combine)
    if whole is None:
        return None
    z, split_nodes = whole
    ids, aux = None, ()
    if first.quantity is Quantity.LOG_PROB:
        if any(r.ids_unit != first.ids_unit for r in reads):
            return None
        whole_ids = _pieces([r.ids for r in reads], combine)
        if whole_ids is None:
            return None
        ids, aux = whole_ids[0], (*[r.ids for r in reads], *whole_ids[1])
    want = tuple((_shape(z) or ())[:-1]) + ((1,) if first.keepdim else ())
    got = _shape(node)
    if got is None or len(got) != len(want) or not all(_same_size(g, w) for g, w in zip(got, want)):
        return None
    inner = tuple(dict.fromkeys(x for r in reads for x in (*r.nodes, r.src))) + split_nodes
    return Read(first.quantity, node, z, sign=first.sign, keepdim=first.keepdim, ids=ids, ids_unit=first.ids_unit,
                inner=inner,
                aux=tuple(dict.fromkeys((*aux, *(x for r in reads for x in r.aux)))), casts=first.casts,
                spelling=f"{first.spelling}, row by row ({combine})")


_RECOGNIZERS = (_negated, _squeezed, _unsqueezed, _gathered_log_softmax, _logit_minus_lse, _summed_product,
                _logsumexp, _combined_rows)


def _read(node: Node) -> Optional[Read]:
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    if not isinstance(_val(node), torch.Tensor):
        return None
    for recognize in _RECOGNIZERS:
        r = recognize(node)
        if r is not None:
            if not (_dtype(r.src) or torch.int64).is_floating_point:
                return None
            return r
    return None


def read_options(read: Read) -> tuple[int, str]:
    """(ignore_index, reduction) of the op call a read stands on: a log-probability reads every row as
    ``torch.gather`` does (``NO_IGNORE_INDEX``: an id outside [0, V) gives NaN, never a silent 0); the other
    quantities read no ids (every row counts as ignored: the loss output is not read)."""
    return (NO_IGNORE_INDEX if read.quantity is Quantity.LOG_PROB else -100), "none"


def as_read(node: Node) -> Optional[Read]:
    """The read ``node`` is (its outermost spelling ending at ``node``), or None."""
    return _read(node)


def find_reads(graph: Graph) -> list:
    """The reads of ``graph``, in graph order: the outermost ones (a read inside another, e.g. the ``sum`` under
    a negation or the logsumexp of a selective log-softmax, is part of the outer one), and a read inside
    another whose value is also used elsewhere (``lse = logsumexp(z)`` for a log-probability and an entropy
    both): the op serves it as well."""
    reads = [r for n in graph.nodes if (r := _read(n)) is not None]
    parents: dict = {}
    for r in reads:
        for x in r.inner:
            parents.setdefault(x, []).append(r)
    out = []
    for r in reads:
        outer = [p for p in parents.get(r.node, ()) if p.node not in parents]  # the outermost reads around it
        if not outer or any(u not in set(p.nodes) for p in outer for u in r.node.users):
            out.append(r)
    return out


__all__ = ["Quantity", "Read", "as_read", "find_reads", "read_options"]
