"""The walk: loss node (or a per-row read: ``reads``) → typed steps → matmul. Shapes and spellings only; the
plan checks the rest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .fx_util import _bind, _call, _describe, _dtype, _is_number, _last_dim, _norm_dim, _shape, _val
from .dtensor_hook import NotParallelizable, plan_parallel, value_preserving_source
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
from .mutation import written_args
from .reads import Quantity, Read, read_options
from .records import Miss
from .steps import Step, StepKind, check_order
from .low_rank import match_low_rank_sum




@dataclass
class Match:
    loss: Node  # where the op will stand: the loss node, or the node of the read (``read``) the walk started at
    kind: str  # "cross_entropy" | "nll_loss" | a read's quantity ("log_prob", "entropy", ...)
    target: Optional[Node]  # the loss's targets; a log-probability read's ids (``read.ids_unit``: [..., 1]);
    #                         None: no ids read
    ignore_index: Any
    reduction: str
    label_smoothing: float
    mm: Matmul
    steps: list  # from the loss (or the read) upwards
    V: Any  # int, or a SymInt under dynamic shapes
    D: Any
    parallel: Any = None  # a dtensor_hook.ParallelCall for a vocabulary-sharded DTensor lm-head
    read: Optional[Read] = None  # the read the walk started at (None: a loss)

    @property
    def order(self) -> list:
        """The steps in eager order, matmul → loss."""
        return list(reversed(self.steps))


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
    if tdt not in (torch.int64, torch.uint8):
        raise Miss(f"targets of dtype {tdt}: F.cross_entropy takes int64 (or uint8) class indices and raises "
                   "for others; left to raise as eager does")
    return a


def _next_step(cur: Node, class_last: bool) -> Optional[Step]:
    """The step ``cur`` is (with its input one node up), or None when it is none of ours."""
    vv = _last_dim(cur)
    if class_last and vv is not None and (r := _as_layout(cur, vv)) is not None:
        return Step(StepKind.LAYOUT, cur, r)
    if (r := _as_cast(cur)) is not None:
        return Step(StepKind.CAST, cur, r)
    if (sc := _as_softcap(cur)) is not None:
        return Step(StepKind.SOFTCAP, cur, sc[0], sc[1], sc[2])
    if (s := _as_scale(cur)) is not None:
        return Step(StepKind.SCALE, cur, s[0], s[1])
    if class_last and (b := _as_bias_add(cur)) is not None:
        return Step(StepKind.BIAS, cur, b[0], b[1])
    if not class_last and (r := _as_class_transpose(cur)) is not None:
        return Step(StepKind.CLASS_DIM, cur, r)
    if (ls := _as_log_softmax(cur)) is not None:
        z, dim, dt = ls
        nd = len(_shape(cur) or ())
        if _norm_dim(dim, nd) != (nd - 1 if class_last else 1):
            raise Miss("log_softmax is not over the class dim")
        return Step(StepKind.NORMALIZE, cur, z, dt)
    if (r := value_preserving_source(cur)) is not None:  # DTensor redistribute / to_local: same values
        return Step(StepKind.CAST, cur, r)
    return None


def _walk(x: Node, class_last: bool, what: str) -> tuple[Matmul, list]:
    """(matmul, steps from ``x`` upwards) of the chain ending at ``x``; ``what`` names the reader in reasons."""
    steps: list = []
    cur = x
    for _ in range(64):
        mm = match_matmul(cur) or match_low_rank_sum(cur)
        if mm is not None and class_last:
            break
        if not class_last and mm is not None:
            raise Miss("class dim of the loss is not the vocabulary dim (no transpose to (N, C, d...))")
        st = _next_step(cur, class_last)
        if st is None:
            if written_args(cur):  # e.g. z += b: the loss reads the result of an in-place write
                raise Miss(f"{_describe(cur)} writes to the logits in place between the matmul and the {what}")
            raise Miss(f"unsupported op between the matmul and the {what}: {_describe(cur)}")
        steps.append(st)
        if st.kind is StepKind.CLASS_DIM:
            class_last = True
        cur = st.src
    else:
        raise Miss("chain too long")
    if mm.weight is not None and len(_shape(mm.weight) or ()) != 2:
        raise Miss("weight is not 2-D")
    if _last_dim(cur) is None:
        raise Miss("logits have no known shape")
    hs = _shape(mm.hidden)
    if hs is None or len(hs) < 1:
        raise Miss("hidden is not a tensor")
    if not (_dtype(mm.hidden) or torch.int64).is_floating_point:
        raise Miss("hidden is not floating point")
    return mm, steps


def _inner_dim(mm: Matmul):
    d = _shape(mm.hidden)[-1]
    for t in mm.terms:  # the op's inner dim: the hidden states and every down-projection, concatenated
        d = d + _shape(t.hidden)[-1]
    return d


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
    # for (N, C, d…) inputs the class dim is 1 until a class transpose is seen
    mm, steps = _walk(x, nd == 2, "loss")
    parallel = _plan_parallel(mm, a["target"], steps, loss)
    if parallel is not None and mm.terms:
        raise Miss("a low-rank (LoRA) adapter on a vocabulary-sharded lm-head is not folded")
    why = check_order(list(reversed(steps)), mm.bias is not None)
    if why is not None:
        raise Miss(why)
    if not is_ce and not any(st.kind is StepKind.NORMALIZE for st in steps):
        raise Miss("nll_loss input is not a log_softmax of the logits")
    return Match(loss, "cross_entropy" if is_ce else "nll_loss", a["target"], a["ignore_index"], a["reduction"],
                 float(a["label_smoothing"]), mm, steps, _last_dim(mm.node), _inner_dim(mm), parallel)


def match_read(read: Read) -> Match:
    """Walk from a per-row read (``reads``: a log-probability, an entropy, a logsumexp) up to the matmul; raise
    Miss with the reason when it is not our form. The op then stands where the read stands."""
    if len(_shape(read.src) or ()) < 1:
        raise Miss("the read's logits have no known shape")
    mm, steps = _walk(read.src, True, "read")
    if any(st.kind is StepKind.NORMALIZE for st in steps):
        raise Miss("a log_softmax of the logits before the read: the op reads the logits themselves")
    target = read.ids if read.quantity is Quantity.LOG_PROB else None
    if _plan_parallel(mm, target, steps, read.node) is not None:
        raise Miss(f"{read.quantity.value} of a vocabulary-sharded (DTensor) lm-head: the vocabulary-parallel op "
                   "serves cross_entropy / nll_loss (and a logsumexp with them) only")
    why = check_order(list(reversed(steps)), mm.bias is not None)
    if why is not None:
        raise Miss(why)
    ignore_index, reduction = read_options(read)
    return Match(read.node, read.quantity.value, target, ignore_index, reduction, 0.0, mm, steps,
                 _last_dim(mm.node), _inner_dim(mm), None, read)


def _plan_parallel(mm: Matmul, target: Node, steps: list, loss: Node):
    """Tensor-subclass (DTensor) inputs: the vocabulary-parallel call, or a miss with the reason."""
    weight = mm.weight if mm.weight is not None else mm.weight_t
    bias = mm.bias if mm.bias is not None else next((st.value for st in steps if st.kind is StepKind.BIAS), None)
    if mm.weight is None and is_traceable_wrapper_subclass(_val(weight)):
        raise Miss("a DTensor weight given as [D, V] (h @ B) is not supported: only the [V, D] lm-head weight")
    try:
        return plan_parallel(mm.hidden, weight, bias, target, loss)
    except NotParallelizable as e:
        raise Miss(str(e)) from e
