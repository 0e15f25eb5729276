"""The graph rewrite: ``cross_entropy(epilogue(hidden @ weight.T))`` → one ``linear_cross_entropy`` call.

It works on the Dynamo (torch-level) FX graph, where ``F.linear`` and ``F.cross_entropy`` are still
single nodes. Starting from each loss node it walks up towards the logits, classifying every node on
the way into one of a few orthogonal kinds of *steps*:

==============  ============================================================================
kind            eager code it stands for
==============  ============================================================================
``layout``      ``z.view(-1, V)``, ``z.reshape(...)``, ``z.flatten(0, 1)``, ``z[:, :-1]``,
                ``z.contiguous()``: row-to-row ops on the leading dims (the last dim stays V)
``cast``        ``z.float()``, ``z.to(torch.float32)``, ``z.bfloat16()``, ``z.to(device)``
``scale``       ``z * 2.0``, ``0.5 * z``, ``z / 8``  (a Python number)
``softcap``     ``s * torch.tanh(z / s)``
``bias``        ``z + b`` with ``b`` of shape [V] (``h @ W.T + b``)
``class_dim``   ``z.transpose(1, 2)`` / ``z.permute(0, 2, 1)`` right before the loss: the (N, C, d)
                layout of ``F.cross_entropy``
``normalize``   ``F.log_softmax(z, -1)`` feeding ``F.nll_loss``
==============  ============================================================================

until it reaches a matmul spelling (``F.linear``, ``@``, ``torch.matmul``, ``mm``, ``einsum``,
``addmm``). The *plan* then decides everything the replacement needs and refuses (a miss, with the
reason) whatever it cannot prove equivalent: steps out of the op's order
(``softcap(logit_scale * (h @ W.T + b))``), options the op refuses, dtypes eager would round or reject,
writes to the logits, hidden states, weight or bias between the matmul and the loss, other grad modes
or torch.func transforms. Emitting the plan replays the layout steps on ``hidden`` (with ``D`` in place
of ``V``; the linear is row-wise so rows map to rows) and replaces the loss node by::

    dispatch.linear_cross_entropy(hidden', weight, target, bias=b, ignore_index=..., reduction=...,
                                  label_smoothing=..., softcap=s, logit_scale=a, path=...)

(the public ``linear_cross_entropy`` without its autocast casts: the plan chose the dtypes).
Besides losses, the pass starts from what a program reads from the logits per row (``reads``): per-token
log-probabilities (``gather(log_softmax(z), -1, t[..., None])``, TRL's / verl's gather minus logsumexp, their
row-by-row loops), the entropy (``-(softmax(z) * log_softmax(z)).sum(-1)``, verl's ``logsumexp(z) -
(softmax(z) * z).sum(-1)``) and ``torch.logsumexp(z, -1)``: the walk goes up from the read the same way,
and the op stands where the read stands (``reduction="none"``; a log-probability is minus its per-token
loss). Every other read of the same logits rows — a z-loss's logsumexp next to a loss, an entropy next to
log-probabilities — is served by the same op call's lse and entropy outputs (``served``). Nodes that become
dead are erased. Logits that anything else needs (returned from the graph, a metric, a second loss) would
be formed anyway and the op would compute them again: such a loss is left to Inductor, and the report names
the other users. A LoRA adapter on the lm-head (``h @ W.T + s·(u @ B.T)``) is one matmul over concatenated
operands. Lm-head logits read over the vocabulary in ways none of this serves (a KL term, a lone softmax,
other spellings) are reported as not served, so ``explain`` is never silent about them.

The package, one job per module:

==================  ========================================================================
``fx_util``         small helpers over FX nodes (fake values, shapes, argument binding, source lines)
``steps``           the typed step kinds and the order table the op's formula allows
``spellings``       the matched eager spellings: the logits matmul and one recognizer per step kind
``low_rank``        a sum of matmuls (a LoRA adapter on the lm-head) as one matmul
``reads``           the per-row reads served besides losses: log-probabilities, entropy, logsumexp
``match``           the walk from a loss node (or a read) up to the matmul
``regions``         the grad modes, autocast regions and torch.func transforms nodes run under
``mutation``        which tensors a node writes (from op schemas) and which nodes share memory
``served``          the other reads of the same logits served by the op's lse / entropy outputs
``dtensor_hook``    a vocabulary-sharded DTensor lm-head: the vocabulary-parallel call instead
``plan``            every decision and every check that can refuse, before the graph is touched
``kept_logits``     logits needed anyway (returned, other users): the loss is left to Inductor
``emit``            carrying out a plan as one transaction (undone on failure)
``records``         what the pass reports: ``Rewrite``, ``MissRecord``, ``PassResult`` (and ``Miss``, raised)
``graph_pass``      the driver: :func:`rewrite_graph`
``unserved``        vocabulary-wide reads of lm-head logits none of this serves, for the report
==================  ========================================================================
"""
from __future__ import annotations

from .graph_pass import rewrite_graph
from .match import Match, Miss, match_loss, match_read
from .plan import Plan, plan_rewrite
from .reads import Quantity, Read, find_reads
from .records import MissRecord, PassResult, Rewrite
from .spellings import is_loss_node, match_matmul

__all__ = ["rewrite_graph", "PassResult", "Rewrite", "MissRecord", "Match", "Miss", "match_loss", "match_read",
           "Plan", "plan_rewrite", "match_matmul", "is_loss_node", "Quantity", "Read", "find_reads"]
