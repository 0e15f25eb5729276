"""The graph rewrite: ``cross_entropy(epilogue(hidden @ weight.T))`` → one ``linear_cross_entropy`` call.

It works on the Dynamo (torch-level) FX graph, where ``F.linear`` and ``F.cross_entropy`` are still
single nodes. Starting from each loss node it walks up towards the logits, classifying every node on
the way into one of a few orthogonal kinds of *steps*:

==============  ============================================================================
kind            eager code it stands for
==============  ============================================================================
``layout``      ``z.view(-1, V)``, ``z.reshape(...)``, ``z.flatten(0, 1)``, ``z[:, :-1]``,
                ``z.contiguous()``: row-to-row ops on the leading dims (the last dim stays V)
``cast``        ``z.float()``, ``z.to(torch.float32)``, ``z.bfloat16()``, ``z.to(device)``
``scale``       ``z * 2.0``, ``0.5 * z``, ``z / 8``  (a Python number)
``softcap``     ``s * torch.tanh(z / s)``
``bias``        ``z + b`` with ``b`` of shape [V] (``h @ W.T + b``)
``class_dim``   ``z.transpose(1, 2)`` / ``z.permute(0, 2, 1)`` right before the loss: the (N, C, d)
                layout of ``F.cross_entropy``
``normalize``   ``F.log_softmax(z, -1)`` feeding ``F.nll_loss``
==============  ============================================================================

until it reaches a matmul spelling (``F.linear``, ``@``, ``torch.matmul``, ``mm``, ``einsum``,
``addmm``). A separate check then validates the order of the steps against what the op computes
(``softcap(logit_scale * (h @ W.T + b))``). The layout steps are replayed on ``hidden`` (with ``D`` in
place of ``V``; the linear is row-wise so rows map to rows), and the loss node is replaced by::

    linear_cross_entropy(hidden', weight, target, bias=b, ignore_index=..., reduction=...,
                         label_smoothing=..., softcap=s, logit_scale=a)

A ``torch.logsumexp(z, -1)`` of the same logits (a z-loss) is served by the op's lse output. Nodes
that become dead are erased; logits that have other users (returned from the graph, printed, ...)
stay, the loss is rewritten anyway and the report says the logits were kept.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .logging_ import log

# ---------------------------------------------------------------------------------------------
# Small helpers over FX nodes
# ---------------------------------------------------------------------------------------------


def _val(x: Any) -> Any:
    """The fake tensor (or value) Dynamo recorded for a node; plain values are returned as is."""
    if isinstance(x, Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _shape(node: Any) -> Optional[tuple]:
    v = _val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _dtype(node: Any) -> Optional[torch.dtype]:
    v = _val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _last_dim(node: Any) -> Any:
    """The last dim's size (an int, or a SymInt under dynamic shapes), or None."""
    s = _shape(node)
    return s[-1] if s else None


def _same_size(a: Any, b: Any) -> bool:
    """``a == b`` for sizes, True only when provable without adding a guard."""
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover
        return False


def _call(node: Any, functions: tuple = (), methods: tuple = ()) -> bool:
    """True when ``node`` is ``f(...)`` for one of ``functions`` or ``x.m(...)`` for one of ``methods``."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    if node.op == "call_method":
        return node.target in methods
    return False


def _bind(node: Node, signature: inspect.Signature) -> Optional[dict]:
    """The node's arguments by parameter name (``self`` first for method calls), or None."""
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _sig(text: str) -> inspect.Signature:
    namespace: dict = {}
    exec(f"def f({text}): pass", namespace)  # noqa: S102 - a fixed local signature string
    return inspect.signature(namespace["f"])


def _norm_dim(dim: Any, ndim: int) -> Optional[int]:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        return None
    return dim % ndim


def location(node: Node) -> str:
    """``file:line  code`` of the user's source line that produced ``node`` (from Dynamo's stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        if ln.startswith("File "):
            try:
                file_part, line_part = ln.split(", line ", 1)
                fname = file_part[len('File "'):].rstrip('"')
                lineno = line_part.split(",", 1)[0]
                code = lines[i + 1].strip() if i + 1 < len(lines) else ""
                return f"{fname}:{lineno}  {code}".strip()
            except ValueError:  # pragma: no cover
                return ln
    return f"<graph node {node.name}>"


# ---------------------------------------------------------------------------------------------
# Spellings: each recognizer reads one eager spelling (shown in its docstring)
# ---------------------------------------------------------------------------------------------

_LINEAR = (F.linear, torch._C._nn.linear)
_MATMUL_FNS = (operator.matmul, torch.matmul, torch.mm)
_MATMUL_METHODS = ("matmul", "mm", "__matmul__")
_ADDMM_FNS = (torch.addmm,)
_EINSUM_FNS = (torch.einsum,)
_MUL_FNS = (operator.mul, torch.mul)
_MUL_METHODS = ("mul", "__mul__", "__rmul__")
_DIV_FNS = (operator.truediv, torch.div, torch.true_divide)
_DIV_METHODS = ("div", "true_divide", "__truediv__")
_ADD_FNS = (operator.add, torch.add)
_ADD_METHODS = ("add", "__add__", "__radd__")
_TANH_FNS = (torch.tanh, F.tanh)
_CE_FNS = (F.cross_entropy,)
_NLL_FNS = (F.nll_loss,)
_LOG_SOFTMAX_FNS = (F.log_softmax, torch.log_softmax)
_LOGSUMEXP_FNS = (torch.logsumexp,)
_TRANSPOSE_FNS = (torch.transpose, torch.swapaxes, torch.swapdims)
_TRANSPOSE_METHODS = ("transpose", "swapaxes", "swapdims")
_PERMUTE_FNS = (torch.permute,)
_RESHAPE_FNS = (torch.reshape,)
_FLATTEN_FNS = (torch.flatten,)
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}

_CE_SIG = _sig("input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
               "reduction='mean', label_smoothing=0.0")
_NLL_SIG = _sig("input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
                "reduction='mean'")
_LINEAR_SIG = _sig("input, weight, bias=None")
_ADDMM_SIG = _sig("input, mat1, mat2, *, beta=1, alpha=1, out=None")
_LOG_SOFTMAX_SIG = _sig("input, dim=None, _stacklevel=3, dtype=None")
_LOGSUMEXP_SIG = _sig("input, dim, keepdim=False, out=None")
_FLATTEN_SIG = _sig("input, start_dim=0, end_dim=-1")


def is_loss_node(node: Node) -> bool:
    """``F.cross_entropy(z, t, ...)`` (also ``nn.CrossEntropyLoss()(z, t)``, inlined by Dynamo) or
    ``F.nll_loss(logp, t, ...)``."""
    return _call(node, _CE_FNS + _NLL_FNS)


def _transposed_2d(node: Any) -> Optional[Node]:
    """``W`` when ``node`` is ``W.T`` / ``W.t()`` / ``W.mT`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)``
    / ``torch.t(W)`` of a 2-D ``W``; else None."""
    if not isinstance(node, Node):
        return None
    src = None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT", "H", "mH"):
        src = node.args[0]
    elif _call(node, (torch.t,), ("t",)):
        src = node.args[0]
    elif _call(node, _TRANSPOSE_FNS, _TRANSPOSE_METHODS) and len(node.args) == 3:
        if sorted(_norm_dim(d, 2) if isinstance(d, int) else -9 for d in node.args[1:]) == [0, 1]:
            src = node.args[0]
    elif _call(node, _PERMUTE_FNS, ("permute",)):
        dims = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))) \
            else tuple(node.args[1])
        if [_norm_dim(d, 2) for d in dims] == [1, 0]:
            src = node.args[0]
    if isinstance(src, Node) and len(_shape(src) or ()) == 2 and not (_dtype(src) or torch.float32).is_complex:
        return src
    return None


@dataclass
class Matmul:
    """The logits' producer: ``z = hidden @ weight.T (+ bias)``; ``weight_t`` set when only ``weight.T``
    (a [D, V] node) exists in the graph."""

    node: Node
    hidden: Node
    weight: Optional[Node]
    weight_t: Optional[Node] = None
    bias: Optional[Node] = None
    spelling: str = ""


def _weight_from_dv(b: Node) -> tuple[Optional[Node], Optional[Node]]:
    """For ``h @ B`` with B [D, V]: (W, None) when B is ``W.T``, else (None, B) (we use ``B.t()``)."""
    w = _transposed_2d(b)
    return (w, None) if w is not None else (None, b)


def match_matmul(node: Any) -> Optional[Matmul]:
    """Recognise the logits matmul. Spellings (all with h [..., D], W [V, D], B [D, V], b [V])::

        F.linear(h, W, b)       nn.Linear(D, V)(h)       h @ W.T        torch.matmul(h, W.t())
        h.matmul(B)             torch.mm(h2d, W.T)       torch.einsum("btd,vd->btv", h, W)
        torch.addmm(b, h2d, W.T)
    """
    if not isinstance(node, Node) or not isinstance(_val(node), torch.Tensor):
        return None
    if _call(node, _LINEAR):
        a = _bind(node, _LINEAR_SIG)
        if a and isinstance(a["input"], Node) and isinstance(a["weight"], Node) and len(_shape(a["weight"]) or ()) == 2:
            bias = a["bias"]
            if bias is not None and not isinstance(bias, Node):
                return None
            return Matmul(node, a["input"], a["weight"], bias=bias, spelling="F.linear")
        return None
    if _call(node, _MATMUL_FNS, _MATMUL_METHODS) and len(node.args) == 2 and not node.kwargs:
        h, b = node.args
        if isinstance(h, Node) and isinstance(b, Node) and len(_shape(b) or ()) == 2 and len(_shape(h) or ()) >= 2:
            w, wt = _weight_from_dv(b)
            return Matmul(node, h, w, wt, spelling="matmul")
        return None
    if _call(node, _ADDMM_FNS, ("addmm",)):
        a = _bind(node, _ADDMM_SIG)
        if not a or a["beta"] != 1 or a["alpha"] != 1 or a["out"] is not None:
            return None
        bias, h, b = a["input"], a["mat1"], a["mat2"]
        if all(isinstance(x, Node) for x in (bias, h, b)) and len(_shape(bias) or ()) == 1:
            w, wt = _weight_from_dv(b)
            return Matmul(node, h, w, wt, bias=bias, spelling="addmm")
        return None
    if _call(node, _EINSUM_FNS):
        eq, ops = node.args[0], node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or not all(isinstance(o, Node) for o in ops):
            return None
        eq = eq.replace(" ", "")
        if "->" not in eq:
            return None
        lhs, out = eq.split("->")
        sub = lhs.split(",")
        if len(sub) != 2 or len(sub[1]) != 2 or "." in sub[1]:
            return None
        a_sub, w_sub = sub
        if not a_sub or a_sub[-1] not in w_sub:
            return None
        d = a_sub[-1]
        v = w_sub.replace(d, "")
        if len(v) != 1 or v in a_sub or out != a_sub[:-1] + v or a_sub.count(d) != 1:
            return None
        h, w = ops
        if w_sub == v + d:
            return Matmul(node, h, w, spelling="einsum")
        return Matmul(node, h, None, w, spelling="einsum")
    return None


def _scalar_operand(node: Node, fns: tuple, methods: tuple, commutative: bool) -> Optional[tuple[Node, float]]:
    """(z, c) for ``z * c`` / ``c * z`` / ``z / c`` with c a Python number."""
    if not _call(node, fns, methods) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, Node) and _is_number(b):
        return a, float(b)
    if commutative and isinstance(b, Node) and _is_number(a):
        return b, float(a)
    return None


def _as_scale(node: Node) -> Optional[tuple[Node, float]]:
    """``z * c``, ``c * z`` → (z, c); ``z / c`` → (z, 1/c)."""
    m = _scalar_operand(node, _MUL_FNS, _MUL_METHODS, True)
    if m:
        return m
    d = _scalar_operand(node, _DIV_FNS, _DIV_METHODS, False)
    if d and d[1] != 0:
        return d[0], 1.0 / d[1]
    return None


def _as_softcap(node: Node) -> Optional[tuple[Node, float, list[Node]]]:
    """``s * torch.tanh(z / s)`` (also ``torch.tanh(z * (1/s)) * s``, ``.tanh()``) → (z, s, inner nodes)."""
    outer = _scalar_operand(node, _MUL_FNS, _MUL_METHODS, True)
    if not outer:
        return None
    t, s = outer
    if not _call(t, _TANH_FNS, ("tanh",)) or len(t.args) != 1 or t.kwargs:
        return None
    inner = _as_scale(t.args[0]) if isinstance(t.args[0], Node) else None
    if not inner or s <= 0 or not math.isclose(inner[1] * s, 1.0, rel_tol=1e-12):
        return None
    return inner[0], s, [t, t.args[0]]


def _as_cast(node: Node) -> Optional[Node]:
    """``z.float()``, ``z.double()``, ``z.half()``, ``z.bfloat16()``, ``z.to(dtype)``, ``z.to(device)``,
    ``z.type(dtype)`` to a floating dtype → z."""
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], Node):
        return None
    src = node.args[0]
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return src
    if node.target in ("to", "type"):
        rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dtype", "device")]
        if any(k not in ("dtype", "device", "non_blocking", "copy", "memory_format") for k in node.kwargs):
            return None
        if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
            return None
        for r in rest:
            if isinstance(r, (torch.dtype, torch.device, str)) or isinstance(r, bool):
                continue
            return None  # e.g. z.to(other_tensor)
        out, inp = _val(node), _val(src)
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            return None
        if isinstance(inp, torch.Tensor) and inp.device != out.device:
            return None
        return src
    return None


def _as_bias_add(node: Node) -> Optional[tuple[Node, Node]]:
    """``z + b`` / ``b + z`` with b a [V] tensor → (z, b)."""
    if not _call(node, _ADD_FNS, _ADD_METHODS) or len(node.args) != 2 or node.kwargs:
        return None
    for z, b in (node.args, node.args[::-1]):
        if isinstance(z, Node) and isinstance(b, Node) and len(_shape(b) or ()) == 1:
            if _same_size(_shape(b)[0], _last_dim(z)) and (_dtype(b) or torch.int64).is_floating_point:
                return z, b
    return None


def _getitem_keeps_last_dim(index: Any, ndim: int) -> bool:
    """True when ``z[index]`` only slices/selects leading dims: ``z[:, :-1]``, ``z[..., 1:, :]``, ``z[0]``."""
    idx = index if isinstance(index, tuple) else (index,)
    for e in idx:
        if not (isinstance(e, slice) or e is None or e is Ellipsis or
                (isinstance(e, (int, torch.SymInt, Node)) and not isinstance(e, bool))):
            return False
        if isinstance(e, Node) and not isinstance(_val(e), (int, torch.SymInt)):
            return False  # a tensor index
    full = slice(None, None, None)
    if Ellipsis in idx:
        after = idx[idx.index(Ellipsis) + 1:]
        return not after or after[-1] == full
    consuming = [e for e in idx if e is not None]
    if len(consuming) < ndim:
        return True
    return idx[-1] == full


def _as_layout(node: Node, v: Any) -> Optional[Node]:
    """A row-to-row op on the leading dims (input and output both end in V) → its input::

        z.view(-1, V)   z.reshape(B * T, V)   torch.reshape(z, s)   z.flatten(0, 1)   torch.flatten(z, 0, -2)
        z[:, :-1]       z[..., 1:, :]         z.contiguous()
    """
    if not node.args or not isinstance(node.args[0], Node):
        return None
    src = node.args[0]
    if not (_same_size(_last_dim(src), v) and _same_size(_last_dim(node), v)):
        return None
    if _call(node, (), ("contiguous",)) and len(node.args) == 1 and not node.kwargs:
        return src
    if _call(node, _RESHAPE_FNS, ("view", "reshape")) and not node.kwargs and len(node.args) >= 2:
        if any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return None  # z.view(dtype)
        return src
    if _call(node, _FLATTEN_FNS, ("flatten",)):
        a = _bind(node, _FLATTEN_SIG)
        nd = len(_shape(src))
        end = _norm_dim(a["end_dim"], nd) if a else None
        if end is None or end == nd - 1:
            return None
        return src
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        if isinstance(_val(src), torch.Tensor) and _getitem_keeps_last_dim(node.args[1], len(_shape(src))):
            return src
    return None


def _as_class_transpose(node: Node) -> Optional[Node]:
    """``z.transpose(1, 2)`` / ``z.permute(0, 2, 1)`` / ``z.movedim(-1, 1)``: (N, d…, C) → (N, C, d…)."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    src = node.args[0]
    nd = len(_shape(src) or ())
    if nd < 3:
        return None
    want = [0, nd - 1] + list(range(1, nd - 1))
    if _call(node, _TRANSPOSE_FNS, _TRANSPOSE_METHODS) and len(node.args) == 3 and not node.kwargs:
        perm = list(range(nd))
        a, b = (_norm_dim(d, nd) for d in node.args[1:])
        if a is None or b is None:
            return None
        perm[a], perm[b] = perm[b], perm[a]
    elif _call(node, _PERMUTE_FNS, ("permute",)) and not node.kwargs:
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        perm = [_norm_dim(d, nd) for d in dims]
    elif _call(node, (torch.movedim, torch.moveaxis), ("movedim", "moveaxis")) and len(node.args) == 3:
        if _norm_dim(node.args[1], nd) != nd - 1 or _norm_dim(node.args[2], nd) != 1:
            return None
        perm = want
    else:
        return None
    return src if perm == want else None


def _as_log_softmax(node: Node) -> Optional[tuple[Node, Optional[int], Any]]:
    """``F.log_softmax(z, dim)``, ``torch.log_softmax(z, dim)``, ``z.log_softmax(dim)`` → (z, dim, dtype)."""
    if not _call(node, _LOG_SOFTMAX_FNS, ("log_softmax",)):
        return None
    a = _bind(node, _LOG_SOFTMAX_SIG)
    if not a or not isinstance(a["input"], Node):
        return None
    return a["input"], a["dim"], a["dtype"]


# ---------------------------------------------------------------------------------------------
# The walk: loss node → steps → matmul
# ---------------------------------------------------------------------------------------------


class Miss(Exception):
    """Why a cross-entropy was left alone."""


@dataclass
class Step:
    kind: str  # layout | cast | scale | softcap | bias | class_dim | normalize
    node: Node
    src: Node  # the step's tensor input (one node up)
    value: Any = None
    extra: list = field(default_factory=list)


@dataclass
class Match:
    loss: Node
    kind: str  # "cross_entropy" | "nll_loss"
    target: Node
    ignore_index: Any
    reduction: str
    label_smoothing: float
    mm: Matmul
    steps: list  # from the loss upwards
    V: Any  # int, or a SymInt under dynamic shapes
    D: Any


def _loss_args(node: Node) -> dict:
    is_ce = _call(node, _CE_FNS)
    a = _bind(node, _CE_SIG if is_ce else _NLL_SIG)
    if a is None:
        raise Miss("unrecognised arguments to the loss")
    a.setdefault("label_smoothing", 0.0)
    if a["weight"] is not None:
        raise Miss("class weights (weight=...) are not supported")
    if a["size_average"] is not None or a["reduce"] is not None:
        raise Miss("legacy size_average/reduce arguments")
    if a["reduction"] not in ("mean", "sum", "none"):
        raise Miss(f"reduction {a['reduction']!r} is not a constant mean/sum/none")
    if not _is_number(a["label_smoothing"]) or not 0.0 <= a["label_smoothing"] <= 1.0:
        raise Miss("label_smoothing is not a constant number in [0, 1]")
    if not isinstance(a["ignore_index"], int) or isinstance(a["ignore_index"], bool):
        raise Miss("ignore_index is not a constant int")
    t = a["target"]
    if not isinstance(t, Node) or not isinstance(_val(t), torch.Tensor):
        raise Miss("target is not a tensor")
    tdt = _dtype(t)
    if tdt.is_floating_point or tdt.is_complex or tdt == torch.bool:
        raise Miss(f"probability (soft) targets of dtype {tdt} are not supported")
    return a


def match_loss(loss: Node) -> Match:
    """Walk from a loss node up to the matmul; raise Miss with the reason when it is not our form."""
    is_ce = _call(loss, _CE_FNS)
    a = _loss_args(loss)
    x = a["input"]
    if not isinstance(x, Node) or not isinstance(_val(x), torch.Tensor):
        raise Miss("loss input is not a tensor node")
    if not _dtype(x).is_floating_point:
        raise Miss("loss input is not floating point")
    nd = len(_shape(x))
    if nd < 2:
        raise Miss("unbatched (1-D) logits")
    class_last = nd == 2  # for (N, C, d…) inputs the class dim is 1 until a class transpose is seen
    steps: list[Step] = []
    cur = x
    mm: Optional[Matmul] = None
    v: Optional[int] = None
    for _ in range(64):
        mm = match_matmul(cur)
        if mm is not None and class_last:
            if mm.weight is not None and len(_shape(mm.weight)) != 2:
                raise Miss("weight is not 2-D")
            v = _last_dim(cur)
            break
        mm = None
        cur_nd = len(_shape(cur) or ())
        vv = _last_dim(cur)
        if class_last and vv is not None and (r := _as_layout(cur, vv)) is not None:
            steps.append(Step("layout", cur, r))
            cur = r
            continue
        if (r := _as_cast(cur)) is not None:
            steps.append(Step("cast", cur, r))
            cur = r
            continue
        if (sc := _as_softcap(cur)) is not None:
            steps.append(Step("softcap", cur, sc[0], sc[1], sc[2]))
            cur = sc[0]
            continue
        if (s := _as_scale(cur)) is not None:
            steps.append(Step("scale", cur, s[0], s[1]))
            cur = s[0]
            continue
        if class_last and (b := _as_bias_add(cur)) is not None:
            steps.append(Step("bias", cur, b[0], b[1]))
            cur = b[0]
            continue
        if not class_last and (r := _as_class_transpose(cur)) is not None:
            steps.append(Step("class_dim", cur, r))
            cur = r
            class_last = True
            continue
        if (ls := _as_log_softmax(cur)) is not None:
            z, dim, dt = ls
            want = cur_nd - 1 if class_last else 1
            if _norm_dim(dim, cur_nd) != want:
                raise Miss("log_softmax is not over the class dim")
            steps.append(Step("normalize", cur, z, dt))
            cur = z
            continue
        if not class_last and match_matmul(cur) is not None:
            raise Miss("class dim of the loss is not the vocabulary dim (no transpose to (N, C, d...))")
        raise Miss(f"unsupported op between the matmul and the loss: {_describe(cur)}")
    else:
        raise Miss("chain too long")
    if v is None:
        raise Miss("logits have no known shape")
    hs = _shape(mm.hidden)
    if hs is None or len(hs) < 1:
        raise Miss("hidden is not a tensor")
    d = hs[-1]
    if not (_dtype(mm.hidden) or torch.int64).is_floating_point:
        raise Miss("hidden is not floating point")
    _check_order(steps, is_ce, mm)
    return Match(loss, "cross_entropy" if is_ce else "nll_loss", a["target"], a["ignore_index"], a["reduction"],
                 float(a["label_smoothing"]), mm, steps, v, d)


def _describe(node: Node) -> str:
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {tgt} ({node.name})"


def _check_order(steps: list, is_ce: bool, mm: Matmul) -> None:
    """Eager order (matmul → loss) must read ``[bias] scale* [softcap] [log_softmax]``, casts and row
    layout anywhere before the class-dim transpose."""
    order = list(reversed(steps))  # matmul → loss
    seen_scale = seen_softcap = seen_norm = False
    n_bias = 1 if mm.bias is not None else 0
    for st in order:
        if st.kind == "bias":
            if seen_scale or seen_softcap or seen_norm:
                raise Miss("bias added after scaling/softcap")
            n_bias += 1
            if n_bias > 1:
                raise Miss("two biases")
        elif st.kind == "scale":
            if seen_softcap:
                raise Miss("scaling after the softcap")
            if seen_norm:
                raise Miss("scaling after log_softmax")
            seen_scale = True
        elif st.kind == "softcap":
            if seen_softcap:
                raise Miss("two softcaps")
            if seen_norm:
                raise Miss("softcap after log_softmax")
            seen_softcap = True
        elif st.kind == "normalize":
            if seen_norm:
                raise Miss("two log_softmax")
            seen_norm = True
    if not is_ce and not seen_norm:
        raise Miss("nll_loss input is not a log_softmax of the logits")


# ---------------------------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------------------------


@dataclass
class Rewrite:
    """One loss node replaced by ``linear_cross_entropy``."""

    where: str
    loss: str  # "cross_entropy" | "nll_loss"
    spelling: str
    N: Any
    D: int
    V: int
    dtype: str
    options: dict
    saved_bytes: Optional[int]
    logits_kept: bool
    lse_served: int = 0
    notes: list = field(default_factory=list)


@dataclass
class MissRecord:
    where: str
    loss: str
    reason: str


@dataclass
class PassResult:
    rewrites: list = field(default_factory=list)
    misses: list = field(default_factory=list)


def _grad_modes(graph: Graph) -> dict:
    """node → grad mode it runs under, relative to the graph's entry (``torch.no_grad()`` /
    ``torch.enable_grad()`` blocks inside a Dynamo graph become ``_set_grad_enabled`` nodes);
    None means "as on entry"."""
    state: dict = {}
    mode = None
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled and n.args:
            mode = bool(n.args[0])
        state[n] = mode
    return state


def _autocast_regions(graph: Graph) -> dict:
    """node → (device_type, dtype) of the autocast region it lies in (None outside), from the
    ``_enter_autocast`` / ``_exit_autocast`` nodes Dynamo records for ``with torch.autocast(...)``."""
    try:
        from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
    except ImportError:  # pragma: no cover
        return {}
    stack: list = []
    state: dict = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _enter_autocast:
            args = list(n.args) + [None] * 4
            dev, dt, enabled = args[0], args[1], args[2]
            enabled = True if enabled is None else enabled
            stack.append((dev, dt) if enabled else None)
        elif n.op == "call_function" and n.target is _exit_autocast:
            if stack:
                stack.pop()
        state[n] = stack[-1] if stack else None
    return state


def _fake_eval(node: Node) -> None:
    """Fill ``meta['example_value']`` of a node we inserted, by running it on its inputs' fake values."""
    from torch._guards import detect_fake_mode

    def conv(a):
        return torch.fx.node.map_arg(a, _val)

    args, kwargs = conv(node.args), conv(node.kwargs)
    flat = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mode = next((x.fake_mode for x in flat if hasattr(x, "fake_mode")), None) or detect_fake_mode(flat)
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
    from .api import linear_cross_entropy

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


def _logsumexp_users(f: Node, i: int, extra_step: Optional[Step], seen: set) -> list:
    """``torch.logsumexp(f, -1)`` / ``f.logsumexp(dim=-1, keepdim=...)`` users of ``f``."""
    out = []
    for u in list(f.users):
        if u in seen or not _call(u, _LOGSUMEXP_FNS, ("logsumexp",)):
            continue
        a = _bind(u, _LOGSUMEXP_SIG)
        if not a or a["out"] is not None or not isinstance(a["keepdim"], bool):
            continue
        dim = a["dim"]
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        nd = len(_shape(f))
        if _norm_dim(dim, nd) == nd - 1:
            seen.add(u)
            out.append((u, i, a["keepdim"], extra_step))
    return out


def _find_logsumexps(m: Match) -> list:
    """z-loss terms we can serve from the op's lse: ``torch.logsumexp(z, -1)`` of a chain node that
    already carries every scale/softcap/bias (so its rows' lse equals the op's) and is separated from
    the loss input only by reshapes and casts (no slicing), before any log_softmax / class transpose.
    Returns (logsumexp node, eager-order position of its input, keepdim)."""
    order = list(reversed(m.steps))  # matmul → loss; position -1 is the matmul output itself
    value_kinds = {"scale", "softcap", "bias"}
    first = max((i for i, st in enumerate(order) if st.kind in value_kinds), default=-1)
    served = []
    seen: set = set()
    for i in range(first, len(order)):
        if i >= 0 and order[i].kind in ("normalize", "class_dim"):
            break
        if any(s.kind == "layout" and _call(s.node, (operator.getitem,)) for s in order[i + 1:]):
            continue  # a slice between this node and the loss: its rows are not the loss's rows
        x = m.mm.node if i == -1 else order[i].node
        # logsumexp(z), or of a separate z.float() / z.view(-1, V) (a cast or a reshape of a chain node)
        feeders = [(x, None)]
        for c in x.users:
            if c.op == "call_method" and _as_cast(c) is x:
                feeders.append((c, None))
            elif not _call(c, (operator.getitem,)) and _as_layout(c, _last_dim(x)) is x:
                feeders.append((c, Step("layout", c, x)))
        for f, extra_step in feeders:
            served.extend(_logsumexp_users(f, i, extra_step, seen))
    return served


@dataclass
class _Regions:
    """Per node: the autocast region and the grad mode it runs under."""

    autocast: dict
    grad: dict


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
    call = emit("call_function", _op(), (h, w, m.target), kwargs)
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


def _fed_by_matmul(node: Node, depth: int = 24) -> bool:
    """Is a matmul spelling among the first ancestors of the loss input (for reporting misses)?"""
    frontier = [node.args[0]] if node.args else []
    seen = set()
    while frontier and depth > 0:
        depth -= 1
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if match_matmul(n) is not None:
                return True
            nxt.extend(a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor))
        frontier = nxt
    return False


def rewrite_graph(graph_or_module: Any) -> PassResult:
    """Rewrite every recognised linear + cross-entropy in a Dynamo FX graph, in place.

    Accepts a ``torch.fx.Graph`` (the custom-pass hook's argument) or a ``GraphModule`` (which is
    recompiled when anything changed). Returns what was rewritten and what was left alone, and why.
    """
    graph = graph_or_module.graph if isinstance(graph_or_module, GraphModule) else graph_or_module
    result = PassResult()
    losses = [n for n in graph.nodes if is_loss_node(n)]
    if not losses:
        return result
    regions = _Regions(_autocast_regions(graph), _grad_modes(graph))
    for loss in losses:
        kind = "cross_entropy" if _call(loss, _CE_FNS) else "nll_loss"
        where = location(loss)
        try:
            try:
                m = match_loss(loss)
            except Miss:
                raise
            except Exception as e:  # an unforeseen graph shape: report it, never fail the compile
                log.debug("cce: matcher error at %s", where, exc_info=True)
                raise Miss(f"internal error while matching: {type(e).__name__}: {e}") from e
            r = apply_match(graph, m, regions)
        except Miss as e:
            if _fed_by_matmul(loss):
                result.misses.append(MissRecord(where, kind, str(e)))
                log.info("cce: left %s at %s alone: %s", kind, where, e)
            continue
        result.rewrites.append(r)
        log.info("cce: rewrote %s at %s (N=%s D=%s V=%s %s)%s", kind, where, r.N, r.D, r.V, r.options,
                 "; " + "; ".join(r.notes) if r.notes else "")
    if result.rewrites:
        graph.lint()
        owner = getattr(graph, "owning_module", None)
        if isinstance(graph_or_module, GraphModule):
            graph_or_module.recompile()
        elif isinstance(owner, GraphModule):
            owner.recompile()
    return result
