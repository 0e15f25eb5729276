"""What the pass sees but does not serve: so that ``explain`` is never silent about a vocabulary-wide op.

The rewrite starts from losses (``F.cross_entropy`` / ``F.nll_loss``) and from the per-row reads it serves
(:mod:`.reads`: log-probabilities, entropies, logsumexps in the spellings listed there). Code that reads the
logits in other ways forms the N×V logits just the same, and the user should hear about it. After those are
handled, :func:`find_unserved` starts from each lm-head-shaped matmul still in the graph (weight
``[V, D]`` with ``V > D``: its output is larger than its input) and follows the logits forward through
ops that keep the vocabulary as the last dim (views, slices, casts, scaling, a temperature division,
``tanh`` ...) to what reads them over the vocabulary:

==========================================  ===========================================================
eager code                                  reported as
==========================================  ===========================================================
a gather of a log_softmax / softmax in a    per-token log-probabilities (e.g. ``log(softmax(z))``, whose
spelling not served                         underflow to ``-inf`` the op would not reproduce; several ids
                                            per row)
an entropy in a spelling not served         the entropy of the softmax (``Categorical(logits=z).entropy()``,
                                            ``log(p + eps)``, chunks written into a buffer in place)
``softmax`` / ``log_softmax`` alone         that op over the vocabulary (a KL or distillation term,
                                            sampling probabilities)
the logits returned from the graph          a note, not a miss (evaluation needs them; a loss computed
                                            from them outside the graph cannot be fused)
==========================================  ===========================================================

A matmul whose logits reach a loss or a read the pass recognises is left to the pass (rewritten, or
reported with its own reason). Nothing here changes the graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .fx_util import _bind, _call, _last_dim, _norm_dim, _same_size, _shape, _sig, location, short_location
from .reads import _GATHER_SIG, index_rows_match
from .records import MissRecord
from .spellings import (_LOGSUMEXP_FNS, _LOGSUMEXP_SIG, _as_class_transpose, _as_log_softmax, is_loss_node,
                        match_matmul)

_SOFTMAX_FNS = (F.softmax, torch.softmax)
_SOFTMAX_SIG = _sig("input, dim=None, _stacklevel=3, dtype=None")
# How much wider than the hidden states a matmul's output must be to be reported as returned logits: an
# MLP's up-projection is at most ~4x; an lm-head's vocabulary is tens of times the hidden size.
RETURNED_LOGITS_MIN_RATIO = 5


@dataclass
class _Reads:
    """What reads one matmul's logits over the vocabulary."""

    ops: dict = field(default_factory=dict)  # op name -> first node
    returned: bool = False
    loss: bool = False


# Tuple-valued splits of the logits' rows (TRL's and verl's chunked reads): their pieces keep the vocabulary.
_SPLIT_FNS = (torch.split, torch.chunk, torch.unbind, torch.tensor_split)
_SPLIT_METHODS = ("split", "chunk", "unbind", "tensor_split")


def _over_last_dim(node: Node, dim) -> bool:
    nd = len(_shape(node.args[0]) or ()) if node.args else 0
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return nd > 0 and _norm_dim(dim, nd) == nd - 1


def _vocab_op(u: Node) -> Optional[str]:
    """The vocabulary-wide op ``u`` is (over the last dim), or None."""
    if (ls := _as_log_softmax(u)) is not None:
        return "log_softmax" if _over_last_dim(u, ls[1]) else None
    if _call(u, _SOFTMAX_FNS, ("softmax",)):
        a = _bind(u, _SOFTMAX_SIG)
        return "softmax" if a and _over_last_dim(u, a["dim"]) else None
    if _call(u, _LOGSUMEXP_FNS, ("logsumexp",)):
        a = _bind(u, _LOGSUMEXP_SIG)
        return "logsumexp" if a and _over_last_dim(u, a["dim"]) else None
    if _call(u, (torch.gather,), ("gather",)):
        a = _bind(u, _GATHER_SIG)
        return "gather" if a and _over_last_dim(u, a["dim"]) else None
    return None


def _keeps_vocab(u: Node, v) -> bool:
    """``u`` hands the logits on with the vocabulary still last (a view, slice, cast, scale, tanh, ...)."""
    return u.op in ("call_function", "call_method") and _same_size(_last_dim(u), v)


def _reads(mm: Node, v, handled_reads: frozenset = frozenset()) -> _Reads:
    out = _Reads()
    frontier, seen = [mm], {mm}
    for _ in range(16):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.op == "output":
                    out.returned = True
                elif is_loss_node(u) or u in handled_reads:
                    out.loss = True
                elif (op := _vocab_op(u)) is not None:
                    out.ops.setdefault(op, u)
                    if op in ("log_softmax", "softmax"):  # gather(log_softmax(z)), log_softmax(z).exp()
                        for w in u.users:
                            if _vocab_op(w) == "gather":
                                out.ops.setdefault("gather", w)
                            elif _call(w, (torch.exp,), ("exp",)) or _call(w, (operator.mul, torch.mul), ("mul",)):
                                out.ops.setdefault("exp" if op == "log_softmax" else "softmax_product", w)
                            elif w.op == "output":
                                out.returned = True
                            elif is_loss_node(w) or w in handled_reads:
                                out.loss = True
                elif _keeps_vocab(u, v) or _as_class_transpose(u) is not None:  # (N, C, d...) for a loss
                    nxt.append(u)
                elif _call(u, _SPLIT_FNS, _SPLIT_METHODS):  # z.split(k) / chunk / unbind: follow the pieces
                    pieces = [g for g in u.users if g.op == "call_function" and g.target is operator.getitem
                              and _same_size(_last_dim(g), v)]
                    seen.update(pieces)
                    nxt.extend(pieces)
        frontier = nxt
    return out


def _unproven_gather_rows(gather: Optional[Node]) -> bool:
    """True for a gather over the last dim with one id per row whose rows are not provably the input's (the
    reads decline it: ``reads.index_rows_match``)."""
    a = _bind(gather, _GATHER_SIG) if gather is not None else None
    return bool(a) and index_rows_match(a["input"], a["index"]) is False


def _form(ops: dict) -> tuple[str, str]:
    """(short name, description) of the forms that the vocabulary-wide ops read together make."""
    has = set(ops)
    normalizer = bool(has & {"log_softmax", "logsumexp"})
    forms, names = [], []
    if "gather" in has and normalizer:
        names.append("log_softmax+gather")
        forms.append("per-token log-probabilities (a gather of log_softmax, or of the logits minus their logsumexp, "
                     "as RL scoring and TRL's selective_log_softmax compute)")
    if normalizer and has & {"softmax", "exp", "softmax_product"}:
        names.append("entropy")
        forms.append("the entropy of the softmax over the vocabulary")
    if not forms:
        ops_named = sorted(has - {"exp", "softmax_product"})
        names.append("+".join(ops_named))
        forms.append(" and ".join(f"a {op} over the vocabulary" for op in ops_named))
    return ", ".join(names), " and ".join(forms)


@dataclass
class Unserved:
    misses: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def find_unserved(graph: Graph, handled: frozenset = frozenset(), handled_reads: frozenset = frozenset()) -> Unserved:
    """Misses for lm-head matmuls whose logits are read over the vocabulary by something other than a loss or a
    served read, and notes for lm-head logits a graph returns with no loss of them in it. ``handled``: matmul
    nodes whose loss or read the pass already reported (rewritten, or left alone with its own reason);
    ``handled_reads``: the nodes of every read the pass recognised (reported with their own reason)."""
    found = Unserved()
    pos = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        mm = match_matmul(node)
        if mm is None or node in handled:
            continue
        v, d = _last_dim(node), _last_dim(mm.hidden)
        if not (isinstance(v, int) and isinstance(d, int) and v > d):
            continue
        reads = _reads(node, v, handled_reads)
        if reads.loss:
            continue  # the loss-driven pass reported it (rewritten, or left alone with its reason)
        if reads.ops:
            first = min(reads.ops.values(), key=pos.__getitem__)
            name, what = _form(reads.ops)
            why = "in a spelling the rewrite does not serve"
            if _unproven_gather_rows(reads.ops.get("gather")):
                why = ("with a gather whose index rows the compiler cannot prove equal to the logits' rows "
                       "(torch.gather also reads a shorter index, e.g. separate ids and hidden inputs with dynamic "
                       "sizes: derive both from one tensor, or compile with dynamic=False)")
            found.misses.append(MissRecord(
                location(first), name,
                f"not served yet: {what} of the logits of the matmul at {short_location(node)} (V={v}, D={d}), {why}, "
                "so the N×V logits are formed (served: cross-entropy, and per-token log-probabilities, entropy and "
                "logsumexp as the README's \"RL and scoring\" lists them)",
                "not_served"))
        elif reads.returned and v >= RETURNED_LOGITS_MIN_RATIO * d:
            found.notes.append(
                f"the graph returns the logits of the matmul at {short_location(node)} (V={v}, D={d}) and computes no "
                "loss from them: a loss computed outside the compiled function (e.g. a Trainer's compute_loss_func on "
                "outputs.logits) forms them in full. To fuse it, compile the loss together with the model and return "
                "only the loss.")
    return found


__all__ = ["find_unserved", "Unserved", "RETURNED_LOGITS_MIN_RATIO"]
