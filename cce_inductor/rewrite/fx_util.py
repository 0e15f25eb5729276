"""Small helpers over FX nodes: the recorded fake values, shapes, argument binding, source lines."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch.fx import Node


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


def _bind(node: Node, signature: Optional[inspect.Signature] = None) -> Optional[dict]:
    """The node's arguments by parameter name, defaults filled in, or None when they do not bind.

    Normalised by ``torch.fx.operator_schemas.normalize_function`` (a method call ``x.m(...)`` as the
    function ``torch.m(x, ...)``), the overload chosen from the example values' types; ``signature`` is the
    fallback for callables torch has no signature for.
    """
    from torch.fx.operator_schemas import normalize_function

    target, args = node.target, tuple(node.args)
    if node.op == "call_method":
        target = getattr(torch, node.target, None)
    if target is not None and node.op in ("call_function", "call_method"):
        types = tuple(torch.Tensor if isinstance(_val(a), torch.Tensor) else type(_val(a)) for a in args)
        kw_types = {k: torch.Tensor if isinstance(_val(v), torch.Tensor) else type(_val(v))
                    for k, v in node.kwargs.items()}
        try:
            bound = normalize_function(target, args, dict(node.kwargs), arg_types=types, kwarg_types=kw_types,
                                       normalize_to_only_use_kwargs=True)
        except Exception:
            bound = None
        if bound is not None:
            return dict(bound.kwargs)
    if signature is None:
        return None
    try:
        b = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    b.apply_defaults()
    return dict(b.arguments)


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


def short_location(node: Node) -> str:
    """``file.py:42 (`code`)``: :func:`location` with the file's base name, for use inside a sentence."""
    import os

    where, _, code = location(node).partition("  ")
    path, sep, line = where.rpartition(":")
    short = f"{os.path.basename(path)}:{line}" if sep and line.isdigit() else where
    return short + (f" (`{code}`)" if code else "")


def _describe(node: Node) -> str:
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {tgt} ({node.name})"
