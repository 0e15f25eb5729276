"""Graph breaks that cost the rewrite, named with their fixes (for ``explain``).

A graph break splits the compiled code: where it falls between the lm-head and the loss, or inside a
layer loop (Dynamo then runs the whole frame eagerly and the lm-head's graph receives or returns the
logits), the loss cannot be fused. Dynamo counts each break's message in
``torch._dynamo.utils.counters["graph_break"]``; :func:`advice` turns the messages a run added into one
line each: the known ones with what to set, the others with their first line.

Known breaks (transformers >= 5 with activation checkpointing, both found on a CPU with transformers 5.25):

* ``HOP: Unsafe side effect`` — a Python side effect inside a checkpointed region (transformers' attention
  layers set and restore a module-level context variable, ``kernels``' ``CompileableContextVar``). Eager
  checkpointing replays Python side effects when it recomputes the region in the backward; Dynamo refuses
  to compile a region whose replay it would skip unless
  ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`` is set.
* HF's ``use_cache=True is incompatible with gradient checkpointing`` warning — a ``logger.warning_once``
  call, which Dynamo does not trace; ``use_cache=False`` avoids it.
"""
from __future__ import annotations

from typing import Optional

CHECKPOINT_SIDE_EFFECT_FIX = (
    "set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True before the first call. Eager "
    "checkpointing runs a region's Python side effects again when it recomputes the region in the backward; compiled "
    "code then runs them once: no difference for a context variable set and restored (transformers' attention "
    "layers), a visible one for a counter or a list a region appends to. Or use "
    "cce_inductor.integrations.transformers, which sets it for its own compiled step")
USE_CACHE_FIX = "set model.config.use_cache = False (or pass use_cache=False)"


def break_counts() -> dict:
    """Dynamo's graph-break messages and their counts so far (process-wide): the breaks it took
    (``graph_break``) and those that made it skip a frame instead (``unimplemented``: a break inside a loop
    restarts the frame as skipped, and only this counter sees it)."""
    from torch._dynamo.utils import counters

    out: dict = {}
    for key in ("graph_break", "unimplemented"):
        for msg, count in counters.get(key, {}).items():
            out[(key, msg)] = count
    return out


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0].strip() if msg.strip() else "?"


def _debug_context(msg: str) -> str:
    for line in msg.splitlines():
        if "Developer debug context:" in line:
            return line.split("Developer debug context:", 1)[1].strip()
    return ""


def explain_break(msg: str) -> Optional[str]:
    """One line for a known break (what it is and the fix), or None."""
    head = _first_line(msg)
    if head.startswith("HOP: Unsafe side effect") and "checkpoint" in msg:
        what = _debug_context(msg) or "a mutation"
        return ("activation checkpointing: a Python side effect inside a checkpointed region "
                f"({what}) stops Dynamo from compiling it; the code around it (a layer loop: the whole frame) runs "
                "eagerly, so the lm-head and the loss after it are not compiled with the layers, or their graph "
                f"returns the logits. Fix: {CHECKPOINT_SIDE_EFFECT_FIX}")
    if "warning_once" in msg and "use_cache" in msg:
        return ("Hugging Face's `use_cache=True is incompatible with gradient checkpointing` warning (a logger call "
                f"Dynamo does not trace) breaks the graph. Fix: {USE_CACHE_FIX}")
    if "warning_once" in msg and "loss_type" in msg:
        return ("Hugging Face's `loss_type=None` warning (a logger call) breaks the graph between the lm-head and "
                "the loss. Fix: set model.loss_type = \"ForCausalLM\"")
    if head.startswith("logging.Logger method not supported"):
        return ("a logging call breaks the graph: remove it from the compiled code or add the logging function to "
                "torch._dynamo.config.ignore_logging_functions")
    return None


def advice(before: Optional[dict] = None) -> list:
    """One line per graph break whose count grew since ``before`` (a :func:`break_counts`): the known ones
    with their fix, first; the others with their first line."""
    before = before or {}
    grown: dict = {}
    for (key, msg), count in break_counts().items():
        added = count - before.get((key, msg), 0)
        if added <= 0:
            continue
        known = explain_break(msg)
        context = _debug_context(msg)
        line = known or (_first_line(msg) + (f": {context[:160]}" if context else ""))
        grown[line] = max(grown.get(line, 0), added)
    lines = [f"{line} ({n}x)" for line, n in grown.items()]
    return sorted(lines, key=lambda line: "Fix:" not in line)  # the known ones first


__all__ = ["advice", "explain_break", "break_counts", "CHECKPOINT_SIDE_EFFECT_FIX", "USE_CACHE_FIX"]
