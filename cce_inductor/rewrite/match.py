"""The walk: loss node → steps → matmul, and the check that the steps' order is what the op computes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .fx_util import _bind, _call, _describe, _dtype, _is_number, _last_dim, _norm_dim, _shape, _val
from ..distributed.rewrite_hook import value_preserving_source
from .spellings import (
    _CE_FNS,
    _CE_SIG,
    _NLL_SIG,
    Matmul,
    _as_bias_add,
    _as_cast,
    _as_class_transpose,
    _as_layout,
    _as_log_softmax,
    _as_scale,
    _as_softcap,
    match_matmul,
)


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
    parallel: Any = None  # a distributed.rewrite_hook.ParallelCall for a vocabulary-sharded DTensor lm-head


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
        if (r := value_preserving_source(cur)) is not None:  # DTensor redistribute / to_local: same values
            steps.append(Step("cast", cur, r))
            cur = r
            continue
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
    parallel = _plan_parallel(mm, a["target"], steps, loss)
    _check_order(steps, is_ce, mm)
    return Match(loss, "cross_entropy" if is_ce else "nll_loss", a["target"], a["ignore_index"], a["reduction"],
                 float(a["label_smoothing"]), mm, steps, v, d, parallel)


def _plan_parallel(mm: Matmul, target: Node, steps: list, loss: Node):
    """Tensor-subclass (DTensor) inputs: the vocabulary-parallel call, or a miss with the reason."""
    from ..distributed.rewrite_hook import NotParallelizable, plan_parallel

    weight = mm.weight if mm.weight is not None else mm.weight_t
    bias = mm.bias if mm.bias is not None else next((st.value for st in steps if st.kind == "bias"), None)
    if mm.weight is None and is_traceable_wrapper_subclass(_val(weight)):
        raise Miss("a DTensor weight given as [D, V] (h @ B) is not supported: only the [V, D] lm-head weight")
    try:
        return plan_parallel(mm.hidden, weight, bias, target, loss)
    except NotParallelizable as e:
        raise Miss(str(e)) from e


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
