"""The autocast region and grad mode each node of a Dynamo graph runs under."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph


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


@dataclass
class _Regions:
    """Per node: the autocast region and the grad mode it runs under."""

    autocast: dict
    grad: dict
