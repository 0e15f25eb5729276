"""``cce_inductor.explain(fn, *args, **kwargs)``: which cross-entropies the rewrite would serve, and why not.

It compiles ``fn`` with a recording backend (the rewrite, then the rewritten graph run as is), calls it
once on the given arguments, and resets Dynamo before and after, so no compiled code or global state
is left behind. :class:`Recorder` is the same bookkeeping for code compiled by someone else (the
transformers integration fills a report from the Trainer's own compiled step): the pass's results, the
frames Dynamo skipped and the graph breaks (with their fixes, ``graph_breaks``) that happened meanwhile.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .backend import make_backend
from .graph_breaks import advice, break_counts
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
    breaks: list = field(default_factory=list)  # graph breaks of this run, the known ones with their fix
    findings: list = field(default_factory=list)  # the pass's and integrations' notes (e.g. logits returned, no loss)

    @property
    def saved_bytes(self) -> int:
        return sum(r.saved_bytes or 0 for r in self.rewrites)

    def misses_of(self, category: str) -> list:
        return [m for m in self.misses if m.category == category]

    def __str__(self) -> str:
        kinds = {"logits_kept": "left to Inductor (logits needed anyway)", "not_served": "not served yet",
                 "graph_input": "logits from outside the graph"}
        split = [f"{len(self.misses_of(c))} {what}" for c, what in kinds.items() if self.misses_of(c)]
        lines = [f"cce_inductor.explain: {len(self.rewrites)} rewrite(s), {len(self.misses)} miss(es)"
                 + (f" ({', '.join(split)})" if split else "")
                 + f" in {self.graphs} graph(s); estimated activation memory saved vs eager {_fmt_bytes(self.saved_bytes)}"]
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
            rows += [(*_split_where(m.where), m.loss, _headline(m)) for m in self.misses]
            lines.extend(_table(rows))
            for m in self.misses:
                if _headline(m) != m.reason:
                    lines.append(f"  why ({_split_where(m.where)[0]}): {m.reason}")
        if self.findings:
            lines += ["", "Notes:"] + [f"  {n}" for n in self.findings]
        if self.notes:
            lines += ["", "Not compiled (so not seen by the rewrite):"] + [f"  {n}" for n in self.notes]
        if self.breaks:
            lines += ["", "Graph breaks (compiled code split; where one falls between the lm-head and the loss, the "
                      "loss cannot be fused):"] + [f"  {b}" for b in self.breaks]
        if not self.rewrites and not self.misses:
            lines += ["", "No cross-entropy of a matmul was seen in the compiled code"
                      + (" (nothing was compiled)." if not self.graphs else
                         ": the loss is computed outside it, by code Dynamo ran eagerly, or by a library's own fused "
                         "lm-head (e.g. TRL's SFTTrainer computes per-token log-probabilities in chunks itself).")]
        return "\n".join(lines)

    __repr__ = __str__


_HEADLINES = {"logits_kept": "left to Inductor: the logits are needed anyway (why: below)",
              "not_served": "not served yet (why: below)",
              "graph_input": "the logits are an input of this graph (why: below)"}


def _headline(m: MissRecord) -> str:
    """The reason, or for a long one its headline (the whole reason then follows the table)."""
    if len(m.reason) <= 110:
        return m.reason
    return _HEADLINES.get(m.category, m.reason[:100].rsplit(" ", 1)[0] + " … (why: below)")


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


class Recorder:
    """Fills an :class:`ExplainReport` from the pass's results (``on_result``, for ``make_backend``) and,
    around the calls that may compile (``with recorder.watch(): ...``), from Dynamo's counters: the frames it
    skipped and the graph breaks that happened meanwhile (the counters are process-wide; only what grew
    during the watched calls counts)."""

    def __init__(self) -> None:
        self.report = ExplainReport()

    def on_result(self, result: PassResult) -> None:
        self.report.graphs += 1
        self.report.rewrites.extend(result.rewrites)
        self.report.misses.extend(result.misses)
        self.report.findings.extend(n for n in result.notes if n not in self.report.findings)

    def watch(self) -> "_Watch":
        return _Watch(self.report)


class _Watch:
    def __init__(self, report: ExplainReport) -> None:
        self.report = report

    def __enter__(self) -> "_Watch":
        self.skipped_before, self.breaks_before = _graph_break_counts(), break_counts()
        return self

    def __exit__(self, *exc: Any) -> None:
        for notes, new in ((self.report.notes, _skipped_frames(self.skipped_before)),
                           (self.report.breaks, advice(self.breaks_before))):
            notes.extend(n for n in new if n not in notes)


def explain(fn: Callable, *args: Any, **kwargs: Any) -> ExplainReport:
    """Compile ``fn`` with the rewrite (recording what it did), run it once on ``args``/``kwargs``,
    and return an :class:`ExplainReport`; ``print(report)`` shows a table."""
    recorder = Recorder()

    def run_graph(gm: torch.fx.GraphModule, example_inputs: list, **_: Any):
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend=make_backend(run_graph, on_result=recorder.on_result))
        with recorder.watch():
            compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return recorder.report


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
            if f"{os.sep}trl{os.sep}" in path:
                note += (" (TRL's own fused lm-head: it computes per-token log-probabilities in chunks and never forms "
                         "the N×V logits, so there is nothing for the rewrite to do.)")
            if "`disable`" in msg and why.endswith("loop"):
                note += (" (A call torch marks as not traceable, inside the loop: e.g. the hooks of FSDP2's "
                         "fully_shard on each layer.) Move the layer loop into a submodule of its own, as Hugging "
                         "Face models do, so the lm-head + loss after it are compiled, or call "
                         "cce_inductor.linear_cross_entropy(hidden, lm_head.weight, labels) there.")
            if note not in notes:
                notes.append(note)
    return notes


__all__ = ["explain", "ExplainReport", "Recorder", "Rewrite", "MissRecord"]
