"""Which tensors a node of a Dynamo graph writes, and which nodes share memory.

The replacement reads the hidden states, the weight and the bias where the loss stands, and it never
computes the logits; eager code reads them at the matmul and hands the logits on. So a write, between
the matmul and the loss, to any of them (or to any tensor sharing their memory: a view, a base, an alias)
changes what eager computes and not what the op computes. This module answers the two questions that
check needs, from what torch already records:

* :func:`written_args` — the arguments a node writes, from the op's schema (``Tensor(a!)`` arguments:
  in-place methods, ``out=``, ``copy_``, custom ops declared with ``mutates_args``), Python's in-place
  operators (``z[...] = x``, ``z += 1``), or None when nothing tells (then every tensor argument counts).
* :func:`storages` — the storages a node's value lives in. Dynamo's fake values keep eager's aliasing
  (a view shares its base's fake storage, ``reshape`` of a contiguous tensor too, ``z.float()`` of a
  float32 ``z`` is ``z``), so two values alias exactly when they share a storage. A tensor subclass that
  wraps others (a DTensor and its ``to_local()``) lives in its own storage and in each inner tensor's.
  A tensor whose storage cannot be read (sparse, nested, an opaque subclass) is :data:`UNKNOWN_STORAGE`:
  it may alias anything.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Optional

import torch
from torch.fx import Node
from torch.multiprocessing.reductions import StorageWeakRef

from .fx_util import _val

_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul,
})
_INPLACE_DUNDERS = frozenset(f"__{f.__name__.strip('_')}__" for f in _INPLACE_OPERATORS)
# Methods that change what autograd does with a tensor without writing its values: the logits' gradient
# would no longer include the loss's part once the loss reads hidden/weight instead.
GRAD_OBSERVERS = frozenset({"register_hook", "retain_grad", "register_post_accumulate_grad_hook",
                            "requires_grad_"})


def observed_for_grad(node: Node) -> Optional[Node]:
    """The tensor whose gradient ``node`` observes or changes (a hook, ``retain_grad``, ...), else None.
    Dynamo records ``z.register_hook(fn)`` as a method call or as the ``register_hook`` higher-order op."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    if node.op in ("call_method", "call_function") and callee_name(node) in GRAD_OBSERVERS:
        return node.args[0]
    return None


def callee_name(n: Node) -> str:
    """What a call node calls: the method name, the higher-order op's name, or the function's name."""
    if n.op == "call_method":
        return n.target
    if isinstance(n.target, torch._ops.HigherOrderOperator):
        return n.target.name()
    return getattr(n.target, "__name__", str(n.target))
# Python-level callables Dynamo leaves in graphs that write nothing (no schema to read); the rewrite adds
# its own op target here.
PURE_CALLABLES = {getattr, operator.getitem, len, isinstance, type}


class _UnknownStorage:
    """The storage set of a tensor whose memory cannot be told: treated as sharing memory with every tensor."""

    def __repr__(self) -> str:
        return "UNKNOWN_STORAGE"


UNKNOWN_STORAGE = _UnknownStorage()


def _tensor_storages(v: torch.Tensor, depth: int = 0):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    keys = set()
    try:
        keys.add(StorageWeakRef(v.untyped_storage()))
    except Exception:  # sparse, nested, or a subclass without a storage of its own
        pass
    if is_traceable_wrapper_subclass(v) and depth < 8:
        names, _ = v.__tensor_flatten__()
        for name in names:
            inner = getattr(v, name)
            if not isinstance(inner, torch.Tensor):  # e.g. a DTensor's device mesh
                continue
            inner = _tensor_storages(inner, depth + 1)
            if inner is UNKNOWN_STORAGE:
                return UNKNOWN_STORAGE
            keys |= inner
    return frozenset(keys) if keys else UNKNOWN_STORAGE


def storages(node: Any):
    """The storages a node's (fake) tensor value lives in: a frozenset (empty for non-tensors), or
    :data:`UNKNOWN_STORAGE` for a tensor whose memory cannot be told."""
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return frozenset()
    return _tensor_storages(v)


def may_share_memory(a, b) -> bool:
    """Whether two :func:`storages` results may be the same memory."""
    if a is UNKNOWN_STORAGE:
        return b is UNKNOWN_STORAGE or bool(b)
    if b is UNKNOWN_STORAGE:
        return bool(a)
    return not a.isdisjoint(b)


@functools.lru_cache(maxsize=None)
def _aten_method_schemas(name: str) -> tuple:
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return ()
    return tuple(getattr(packet, o)._schema for o in packet.overloads())


def _function_schemas(target: Any) -> Optional[tuple]:
    if isinstance(target, torch._ops.OpOverload):
        return (target._schema,)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return tuple(getattr(target, o)._schema for o in target.overloads())
    try:
        from torch.fx.operator_schemas import get_signature_for_torch_op

        _, schemas = get_signature_for_torch_op(target, return_schemas=True)
    except Exception:
        return None
    return tuple(schemas) if schemas else None


def _written_by_schemas(node: Node, schemas: tuple) -> list:
    """Arguments of ``node`` that any of the schemas marks as written (``Tensor(a!)``)."""
    out = []
    for schema in schemas:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            if arg.name in node.kwargs:
                out.append(node.kwargs[arg.name])
            elif not arg.kwarg_only and i < len(node.args):
                out.append(node.args[i])
    return out


def _tensor_args(node: Node) -> list:
    return [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]


def _nodes(written: list) -> list:
    """The nodes in a list of written arguments, lists and tuples flattened (``_foreach_mul_([z], 3)``,
    ``out=(a, b)``)."""
    out: list = []
    for w in written:
        if isinstance(w, Node):
            out.append(w)
        elif isinstance(w, (list, tuple)):
            out += _nodes(list(w))
    return out


def _body_graphs(node: Node) -> Optional[list]:
    """The subgraphs a higher-order op runs (``get_attr`` arguments naming GraphModules); None when an
    argument names one that cannot be found."""
    root = node.graph.owning_module
    bodies = []
    for a in node.all_input_nodes:
        if a.op != "get_attr":
            continue
        body = getattr(root, a.target, None) if root is not None else None
        if not isinstance(body, torch.fx.GraphModule):
            return None
        bodies.append(body.graph)
    return bodies


def _higher_order_writes(node: Node) -> Optional[list]:
    """``[]`` when every body the op runs provably writes nothing, else None (every tensor argument may be
    written: Dynamo does put input-mutating bodies into checkpoint regions, and user Triton kernels'
    wrappers write their arguments)."""
    bodies = _body_graphs(node)
    if not bodies:
        return None
    for g in bodies:
        for n in g.nodes:
            if n.op in ("placeholder", "output", "get_attr"):
                continue
            if written_args(n) != []:
                return None
    return []


def written_args(node: Node) -> Optional[list]:
    """The argument nodes ``node`` writes to; ``[]`` when it writes none; None when unknown."""
    written: list = []
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    if node.op == "call_module":
        return None
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    if node.op == "call_method":
        name = node.target
        if name in _INPLACE_DUNDERS:
            return written + [node.args[0]]
        schemas = _aten_method_schemas(name)
        if schemas:
            written += _written_by_schemas(node, schemas)
        elif name.endswith("_") and not name.endswith("__"):  # Tensor's in-place naming rule
            written.append(node.args[0])
        return _nodes(written)
    # call_function
    target = node.target
    if target in _INPLACE_OPERATORS:
        return _nodes([node.args[0]])
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _higher_order_writes(node)
    if target in PURE_CALLABLES:
        return _nodes(written)
    if getattr(target, "__module__", None) == "_operator":  # operator.add, operator.neg, ...
        return _nodes(written)
    if getattr(target, "__objclass__", None) is torch._C.TensorBase:  # torch.Tensor.add_ called as a function
        name = target.__name__
        schemas = _aten_method_schemas(name)
        if schemas:
            return _nodes(written + _written_by_schemas(node, schemas))
        return [node.args[0]] if name.endswith("_") and not name.endswith("__") and node.args else []
    schemas = _function_schemas(target)
    if schemas is not None:
        return _nodes(written + _written_by_schemas(node, schemas))
    if getattr(target, "__module__", "") == "torch.nn.functional":
        # Python functionals write only with inplace=True (F.relu(x, inplace=True), F.dropout(...)).
        from torch.fx.operator_schemas import normalize_function

        bound = normalize_function(target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
        if bound is None:
            return None
        if bound.kwargs.get("inplace") is True:
            first = next(iter(bound.kwargs.values()), None)
            return [first] if isinstance(first, Node) else None
        return _nodes(written)
    if getattr(target, "__module__", "") in ("math", "builtins"):
        return _nodes(written)
    return None


def writes(node: Node) -> list:
    """The tensor nodes ``node`` may write: its written arguments, or every tensor argument when unknown."""
    w = written_args(node)
    return _tensor_args(node) if w is None else [x for x in w if isinstance(_val(x), torch.Tensor)]
