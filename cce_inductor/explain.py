"""``cce_inductor.explain(fn, *args, **kwargs)``: which cross-entropies the rewrite would serve, and why not.

It compiles ``fn`` with a recording backend (the rewrite, then the rewritten graph run as is), calls it
once on the given arguments, and resets Dynamo before and after, so no compiled code or global state
is left behind.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .backend import make_backend
from .rewrite import MissRecord, PassResult, Rewrite


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"  # pragma: no cover


@dataclass
class ExplainReport:
    """``rewrites``: one :class:`~cce_inductor.rewrite.Rewrite` per replaced loss; ``misses``: one
    :class:`~cce_inductor.rewrite.MissRecord` per cross-entropy fed by a matmul that was left alone."""

    rewrites: list = field(default_factory=list)
    misses: list = field(default_factory=list)
    graphs: int = 0
    notes: list = field(default_factory=list)  # code Dynamo ran eagerly (the rewrite never saw it), and why

    @property
    def saved_bytes(self) -> int:
        return sum(r.saved_bytes or 0 for r in self.rewrites)

    def __str__(self) -> str:
        lines = [f"cce_inductor.explain: {len(self.rewrites)} rewrite(s), {len(self.misses)} miss(es) "
                 f"in {self.graphs} graph(s); estimated activation memory saved vs eager {_fmt_bytes(self.saved_bytes)}"]
        if self.rewrites:
            lines += ["", "Rewritten:"]
            rows = [("where", "code", "loss", "matmul", "N", "D", "V", "dtype", "path", "saved", "options")]
            for r in self.rewrites:
                opts = ", ".join(f"{k}={v}" for k, v in r.options.items())
                rows.append((*_split_where(r.where), r.loss, r.spelling, str(r.N), str(r.D), str(r.V), r.dtype,
                             r.path, _fmt_bytes(r.saved_bytes), opts))
            lines.extend(_table(rows))
            for r in self.rewrites:
                if r.path_reason:
                    lines.append(f"  path ({_split_where(r.where)[0]}): {r.path} — {r.path_reason}")
                for note in r.notes:
                    lines.append(f"  note ({_split_where(r.where)[0]}): {note}")
        if self.misses:
            lines += ["", "Left alone:"]
            rows = [("where", "code", "loss", "reason")]
            rows += [(*_split_where(m.where), m.loss, m.reason) for m in self.misses]
            lines.extend(_table(rows))
        if self.notes:
            lines += ["", "Not compiled (so not seen by the rewrite):"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _split_where(where: str) -> tuple:
    """``/long/path/file.py:42  code`` → (``file.py:42``, ``code``)."""
    loc, _, code = where.partition("  ")
    path, sep, line = loc.rpartition(":")
    if sep and line.isdigit():
        loc = f"{os.path.basename(path)}:{line}"
    return loc, code.strip()


def _table(rows: list) -> list:
    n = len(rows[0])  # the last column (options / reason) is never cut
    widths = [max(len(str(r[i])) for r in rows) if i == n - 1 else min(max(len(str(r[i])) for r in rows), 60)
              for i in range(n)]

    def fmt(r):
        cells = []
        for c, w in zip(r, widths):
            c = str(c)
            if len(c) > w:
                c = c[: w - 1] + "…"
            cells.append(c.ljust(w))
        return "  " + " | ".join(cells).rstrip()

    out = [fmt(rows[0]), "  " + "-+-".join("-" * w for w in widths)]
    out.extend(fmt(r) for r in rows[1:])
    return out


def explain(fn: Callable, *args: Any, **kwargs: Any) -> ExplainReport:
    """Compile ``fn`` with the rewrite (recording what it did), run it once on ``args``/``kwargs``,
    and return an :class:`ExplainReport`; ``print(report)`` shows a table."""
    report = ExplainReport()

    def record(result: PassResult) -> None:
        report.graphs += 1
        report.rewrites.extend(result.rewrites)
        report.misses.extend(result.misses)

    def run_graph(gm: torch.fx.GraphModule, example_inputs: list, **_: Any):
        return gm.forward

    torch._dynamo.reset()
    before = _graph_break_counts()  # the counters are process-wide: report what this run added
    try:
        compiled = torch.compile(fn, backend=make_backend(run_graph, on_result=record))
        compiled(*args, **kwargs)
        report.notes.extend(_skipped_frames(before))
    finally:
        torch._dynamo.reset()
    return report


_SKIPPED = re.compile(r"frame skipped: (\S+) \((.+?) line (\d+)\)")


def _graph_break_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters.get("unimplemented", {}))


def _skipped_frames(before: Optional[dict] = None) -> list:
    """Frames Dynamo gave up on and ran eagerly (a graph break inside a loop, ...): a loss there is never
    compiled, so neither rewritten nor reported as a miss. Read from Dynamo's graph-break counters: the
    messages whose count grew since ``before`` (a frame skipped again in this run counts again)."""
    before = before or {}
    notes = []
    for msg, count in _graph_break_counts().items():
        if count <= before.get(msg, 0):
            continue
        for name, path, line in _SKIPPED.findall(msg):
            why = "a graph break inside a for/while loop" if "graph break in loop" in msg else "a graph break"
            note = (f"{name} ({os.path.basename(path)}:{line}) ran eagerly: {why} made Dynamo skip the whole frame. "
                    "A loss in it is not compiled.")
            if "`disable`" in msg and why.endswith("loop"):
                note += (" (A call torch marks as not traceable, inside the loop: e.g. the hooks of FSDP2's "
                         "fully_shard on each layer.) Move the layer loop into a submodule of its own, as Hugging "
                         "Face models do, so the lm-head + loss after it are compiled, or call "
                         "cce_inductor.linear_cross_entropy(hidden, lm_head.weight, labels) there.")
            if note not in notes:
                notes.append(note)
    return notes


__all__ = ["explain", "ExplainReport", "Rewrite", "MissRecord"]
