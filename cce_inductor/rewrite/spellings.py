"""The matched spellings: each recognizer reads one eager spelling (shown in its docstring).

The logits producer is recognised by :func:`match_matmul` (``F.linear``, ``nn.Linear``, ``@``,
``torch.matmul``, ``mm``, ``einsum``, ``addmm``). Between it and the loss, every node is one of a few
orthogonal kinds of *steps*, each read by one recognizer:

==============  =============================  ============================================================
kind            recognizer                     eager code it stands for
==============  =============================  ============================================================
``layout``      :func:`_as_layout`             ``z.view(-1, V)``, ``z.reshape(...)``, ``z.flatten(0, 1)``,
                                               ``z[:, :-1]``, ``z.contiguous()``: row-to-row ops on the
                                               leading dims (the last dim stays V)
``cast``        :func:`_as_cast`               ``z.float()``, ``z.to(torch.float32)``, ``z.bfloat16()``,
                                               ``z.to(device)``
``scale``       :func:`_as_scale`              ``z * 2.0``, ``0.5 * z``, ``z / 8``  (a Python number)
``softcap``     :func:`_as_softcap`            ``s * torch.tanh(z / s)``
``bias``        :func:`_as_bias_add`           ``z + b`` with ``b`` of shape [V] (``h @ W.T + b``)
``class_dim``   :func:`_as_class_transpose`    ``z.transpose(1, 2)`` / ``z.permute(0, 2, 1)`` right
                                               before the loss: the (N, C, d) layout of ``F.cross_entropy``
``normalize``   :func:`_as_log_softmax`        ``F.log_softmax(z, -1)`` feeding ``F.nll_loss``
==============  =============================  ============================================================

The loss itself is :func:`is_loss_node` (``F.cross_entropy`` / ``F.nll_loss``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from .fx_util import _bind, _call, _dtype, _is_number, _last_dim, _norm_dim, _same_size, _shape, _sig, _val

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
_LOGSUMEXP_FNS = (torch.logsumexp, torch.special.logsumexp)
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
class LowRankTerm:
    """``scale * (hidden @ weight.T)`` added to the logits: a LoRA adapter's ``lora_B(lora_A(x)) * scaling``
    with ``hidden`` = ``lora_A(x)`` ([..., r]) and ``weight`` = B ([V, r]; ``weight_t`` when only B.T exists)."""

    hidden: Node
    weight: Optional[Node]
    weight_t: Optional[Node]
    scale: float
    nodes: tuple  # the term's matmul (and its scaling), which die with the logits

    @property
    def weight_node(self) -> Node:
        return self.weight if self.weight is not None else self.weight_t


@dataclass
class Matmul:
    """The logits' producer: ``z = hidden @ weight.T (+ bias)``; ``weight_t`` set when only ``weight.T``
    (a [D, V] node) exists in the graph. With low-rank ``terms`` (``rewrite.low_rank``), ``node`` is the sum
    ``hidden @ weight.T + Σ scale·(u @ B.T)`` and ``parts`` the nodes it is built from."""

    node: Node
    hidden: Node
    weight: Optional[Node]
    weight_t: Optional[Node] = None
    bias: Optional[Node] = None
    spelling: str = ""
    terms: tuple = ()
    parts: tuple = ()

    @property
    def nodes(self) -> list:
        """The nodes whose values are the logits, or parts of them, as this matmul forms them."""
        return [self.node, *self.parts]

    @property
    def weight_node(self) -> Node:
        return self.weight if self.weight is not None else self.weight_t

    def operands(self) -> list:
        """(what, node) of every tensor the op reads in place of the logits."""
        ops = [("hidden states", self.hidden), ("weight", self.weight_node)]
        if self.bias is not None:
            ops.append(("bias", self.bias))
        for t in self.terms:
            ops += [("low-rank (LoRA) down-projection", t.hidden), ("low-rank (LoRA) up-projection weight",
                                                                    t.weight_node)]
        return ops


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
        if not a or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1 or node.kwargs.get("out") is not None:
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
    if d:  # z / 0 is a non-finite scale: the plan refuses it with that reason
        return d[0], (1.0 / d[1]) if d[1] != 0 else math.copysign(math.inf, d[1])
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
    if not inner or not s > 0 or not math.isfinite(s) or not math.isclose(inner[1] * s, 1.0, rel_tol=1e-12):
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
