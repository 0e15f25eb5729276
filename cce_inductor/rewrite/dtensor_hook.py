"""What the graph rewrite needs for a tensor-parallel lm-head (DTensor values in the Dynamo graph).

With torchtitan's recipe — lm_head ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)``
and the loss under ``torch.distributed.tensor.parallel.loss_parallel()`` — the Dynamo graph (torch 2.13,
gloo, 2 processes) reads::

    input_tensor = torch.distributed.tensor._api.from_local(h, mesh, (Replicate(),), run_check=False)
    linear_1 = torch._C._nn.linear(input_tensor, W, None)          # W: DTensor Shard(0) (a graph input)
    outputs = linear_1.redistribute(placements=(Shard(dim=-1),), async_op=True)
    flatten = outputs.flatten(0, 1)
    cross_entropy = torch.nn.functional.cross_entropy(flatten, labels_flat)   # DTensor Replicate

(``mesh`` is a graph input too.) The rewrite needs three things from this module:

1. :func:`value_preserving_source` — ``x.redistribute(...)`` never changes a DTensor's global value (nor do
   ``x.full_tensor()`` and ``x.to_local()`` of a ``Replicate`` DTensor), so the walk from the loss to the
   matmul treats it as a value-preserving step (like a cast to the same dtype), which is erased with the
   rest of the chain.
2. :func:`plan_parallel` — given the matched hidden / weight / bias / target nodes, either ``None`` (no
   DTensor: the single-process op), or a :class:`ParallelCall` (what to emit instead), or a
   :class:`NotParallelizable` exception whose message is the miss reason (e.g. a ``Shard(1)`` weight, a
   2-D mesh, an FSDP2-style sharded weight read next to a plain hidden).
3. Emission: the same call the single-process rewrite emits, with ``ParallelCall.target`` in place of the
   op and ``ParallelCall.kwargs`` added::

       ParallelCall.target(hidden', weight, target, bias=b, ignore_index=..., reduction=...,
                               label_smoothing=..., softcap=s, logit_scale=a[, return_lse=True],
                           group_name="<the mesh's process-group name>", dtensor_output=<bool>)

   ``hidden'`` is the matched DTensor hidden with the layout steps replayed (they work on DTensors), the
   weight and bias the matched DTensor nodes. The call returns a ``Replicate`` DTensor (and lse) when the
   loss it replaces was a DTensor (``loss_parallel``), a plain tensor when it was one (logits gathered with
   ``to_local()``). It runs on the fake DTensors Dynamo recorded (``example_value``) — under *their* fake
   mode: :func:`fake_mode_of` finds it inside the DTensors (evaluating the emitted nodes under the mode
   ``torch._guards.detect_fake_mode`` returns fails with "Mixing fake modes").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..core.checks import is_dtensor as _is_dtensor
from ..distributed.dtensor import (dtensor_vocab_parallel_linear_cross_entropy, mesh_group_name, real_mesh,
                                   unsupported_reason)


class NotParallelizable(Exception):
    """The DTensor layout is not one the vocabulary-parallel op serves; the message is the reason."""


def _val(node: Any) -> Any:
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def _replicated(v: Any) -> bool:
    from torch.distributed.tensor import Replicate

    return all(isinstance(p, Replicate) for p in v.placements)


def value_preserving_source(node: Any) -> Optional[Node]:
    """``x`` when ``node`` hands on ``x``'s values unchanged, with only the DTensor wrapping changed:

    * ``x.redistribute(...)`` — a DTensor's global value never changes with its placements;
    * ``x.full_tensor()`` — the global value as a plain tensor;
    * ``x.to_local()`` of a ``Replicate`` DTensor — the local tensor is the global value
      (``ColwiseParallel(output_layouts=Replicate())`` with ``use_local_output=True`` ends this way).

    ``to_local()`` of a sharded DTensor is not one: the loss would see one rank's vocabulary shard. Nor is
    a call whose arguments change the backward (``redistribute(backward_dtype=...)`` rounds the gradient;
    ``to_local(grad_placements=...)`` changes how it is reduced): the op's backward would skip that.
    """
    if not isinstance(node, Node) or node.op != "call_method" or not node.args:
        return None
    src = node.args[0]
    if not isinstance(src, Node):
        return None
    a, b = _val(src), _val(node)
    if not _is_dtensor(a) or not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return None
    if node.target == "redistribute" and _is_dtensor(b):
        extra = {k: v for k, v in node.kwargs.items() if k not in ("device_mesh", "placements", "async_op")}
        if len(node.args) <= 3 and all(v is None for v in extra.values()):  # no forward/backward_dtype
            return src
        return None
    if node.target == "full_tensor" and not node.kwargs and len(node.args) == 1:
        return src
    if node.target == "to_local" and _replicated(a) and len(node.args) == 1 and not any(
            v is not None for v in node.kwargs.values()):  # no grad_placements
        return src
    return None


def fake_mode_of(values) -> Any:
    """The fake mode of the first fake tensor among ``values``, looking inside tensor subclasses (a fake
    DTensor has no ``fake_mode`` of its own: its local tensor has). ``torch._guards.detect_fake_mode`` does
    not look inside them and may return another mode (``Mixing fake modes NYI`` when the node runs)."""
    for x in values:
        if is_traceable_wrapper_subclass(x):
            mode = fake_mode_of([getattr(x, attr) for attr in x.__tensor_flatten__()[0]])
            if mode is not None:
                return mode
        elif isinstance(x, torch.Tensor) and hasattr(x, "fake_mode"):
            return x.fake_mode
    return None


@dataclass
class ParallelCall:
    target: Callable
    kwargs: dict = field(default_factory=dict)
    note: str = ""


def rewrite_call(hidden, weight, targets, *, group_name: str, dtensor_output: bool, bias=None,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 softcap: Optional[float] = None, logit_scale: float = 1.0, return_lse: bool = False):
    """The callable the rewrite inserts for a vocabulary-sharded DTensor lm-head (no autocast casts: the
    rewrite has already chosen the dtypes; the group is named so nothing about it is traced)."""
    return dtensor_vocab_parallel_linear_cross_entropy(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
        group_name=group_name, apply_autocast=False, dtensor_output=dtensor_output)


def plan_parallel(hidden: Any, weight: Any, bias: Any, target: Any, loss: Any) -> Optional[ParallelCall]:
    """``None`` when none of the matched values is a DTensor; a :class:`ParallelCall` for a vocabulary-sharded
    lm-head; raises :class:`NotParallelizable` (message = the miss reason) for any other tensor subclass.
    ``loss``: the loss node replaced (its value's type, DTensor or not, is what the call returns)."""
    vals = {"hidden": _val(hidden), "weight": _val(weight), "bias": _val(bias), "target": _val(target)}
    subclassed = {k: v for k, v in vals.items() if v is not None and is_traceable_wrapper_subclass(v)}
    if not subclassed:
        return None
    others = [f"{k} ({type(v).__name__})" for k, v in subclassed.items() if not _is_dtensor(v)]
    if others:
        raise NotParallelizable(f"{', '.join(others)} is a tensor subclass other than DTensor: the op takes plain "
                                "tensors or a vocabulary-sharded DTensor lm-head")
    reason = unsupported_reason(vals["hidden"], vals["weight"], vals["bias"], vals["target"])
    if reason is not None:
        raise NotParallelizable(reason)
    mesh = real_mesh(vals["weight"].device_mesh)
    name = mesh_group_name(mesh)
    v, world = vals["weight"].shape[0], mesh.size()
    return ParallelCall(rewrite_call, {"group_name": name, "dtensor_output": _is_dtensor(_val(loss))},
                        f"vocabulary-parallel: V = {v} split over {world} ranks (process group {name!r}), "
                        f"each rank's logits at most a token chunk x {-(-v // world)} at a time")


__all__ = ["NotParallelizable", "ParallelCall", "fake_mode_of", "plan_parallel", "value_preserving_source",
           "rewrite_call"]
