"""The modes each node of a Dynamo graph runs under: grad mode, autocast region, torch.func transforms.

Dynamo records context managers entered inside the compiled function as plain call nodes
(``_set_grad_enabled``, ``_enter_autocast``/``_exit_autocast``, functorch's ``_grad_increment_nesting``
...); one pass in graph order gives the state at every node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Graph, Node


def _grad_modes(graph: Graph) -> dict:
    """node → the grad mode it runs under (``torch.no_grad()`` / ``torch.enable_grad()`` blocks inside a
    Dynamo graph become ``_set_grad_enabled`` nodes). Before the first such node: the mode the graph is
    entered with, which Dynamo guards on and which is current while the backend compiles it (so a node
    after a ``no_grad`` block, where the mode is set back, compares equal to one before it)."""
    state: dict = {}
    mode = torch.is_grad_enabled()
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled and n.args:
            mode = bool(n.args[0])
        state[n] = mode
    return state


def _autocast_regions(graph: Graph) -> dict:
    """node → the autocast regions around it, innermost last, as (device_type, dtype or None, enabled)
    from the ``_enter_autocast`` / ``_exit_autocast`` nodes Dynamo records for ``with torch.autocast(...)``.
    A dtype of None means the device's default autocast dtype."""
    try:
        from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
    except ImportError:  # pragma: no cover
        return {}
    stack: list = []
    state: dict = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _enter_autocast:
            args = list(n.args) + [None] * 4
            dev, dt, enabled = args[0], n.kwargs.get("dtype", args[1]), n.kwargs.get("enabled", args[2])
            stack.append((dev, dt, True if enabled is None else bool(enabled)))
        elif n.op == "call_function" and n.target is _exit_autocast:
            if stack:
                stack.pop()
        state[n] = tuple(stack)
    return state


def _transform_targets() -> tuple[set, set]:
    """(enter, exit) callables that open / close a torch.func transform level or a forward-AD level."""
    enter, leave = set(), set()
    fc = getattr(torch._C, "_functorch", None)
    for name in ("_grad_increment_nesting", "_vmap_increment_nesting", "_jvp_increment_nesting",
                 "_func_increment_nesting"):
        if fc is not None and hasattr(fc, name):
            enter.add(getattr(fc, name))
    for name in ("_grad_decrement_nesting", "_vmap_decrement_nesting", "_jvp_decrement_nesting",
                 "_func_decrement_nesting"):
        if fc is not None and hasattr(fc, name):
            leave.add(getattr(fc, name))
    try:
        from torch._functorch import predispatch

        if hasattr(predispatch, "_enter_dual_level"):
            enter.add(predispatch._enter_dual_level)
        if hasattr(predispatch, "_exit_dual_level"):
            leave.add(predispatch._exit_dual_level)
    except ImportError:  # pragma: no cover
        pass
    for name, target_set in (("_enter_dual_level", enter), ("_exit_dual_level", leave)):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            target_set.add(fn)
    return enter, leave


def _transform_depths(graph: Graph) -> dict:
    """node → how many torch.func transforms (grad, vmap, jvp, ...) and forward-AD dual levels are open
    around it. The op is not rewritten inside them: their tensors are wrapped per level."""
    enter, leave = _transform_targets()
    depth = 0
    state: dict = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in leave:
            depth = max(0, depth - 1)
        state[n] = depth
        if n.op == "call_function" and n.target in enter:
            depth += 1
    return state


@dataclass
class Regions:
    """Per node: the grad mode, the autocast region and the torch.func transform depth it runs under."""

    grad: dict
    autocast: dict
    transforms: dict

    @classmethod
    def of(cls, graph: Graph) -> "Regions":
        return cls(_grad_modes(graph), _autocast_regions(graph), _transform_depths(graph))

    def autocast_dtype(self, node: Node, device_type: str) -> Optional[torch.dtype]:
        """The dtype autocast casts eligible inputs of ``node`` to, or None where autocast is off for that
        device. Autocast entered outside the compiled function shows as the ambient state at compile time."""
        for dev, dt, enabled in reversed(self.autocast.get(node, ())):
            if dev == device_type:
                return (dt if dt is not None else torch.get_autocast_dtype(device_type)) if enabled else None
        if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
