"""What the pass reports: one :class:`Rewrite` per replaced loss, one :class:`MissRecord` per loss left alone
(raised inside the pass as :class:`Miss`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


class Miss(Exception):
    """Why a loss was left alone (``category``: see :class:`MissRecord`)."""

    category = "unsupported"


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
    path: str = ""  # "fast" | "low_memory": which implementation serves it (at the traced sizes)
    path_reason: str = ""


@dataclass
class MissRecord:
    where: str
    loss: str
    reason: str
    # "unsupported": a form or hazard the rewrite refuses; "logits_kept": left to Inductor because the logits
    # are needed anyway; "graph_input": the logits come from outside the graph; "not_served": a form over the
    # vocabulary the op does not compute (per-token log-probabilities, entropy, ...)
    category: str = "unsupported"


@dataclass
class PassResult:
    rewrites: list = field(default_factory=list)
    misses: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what the report should say that is neither (e.g. returned logits)
