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
``addmm``). A separate check then validates the order of the steps against what the op computes
(``softcap(logit_scale * (h @ W.T + b))``). The layout steps are replayed on ``hidden`` (with ``D`` in
place of ``V``; the linear is row-wise so rows map to rows), and the loss node is replaced by::

    linear_cross_entropy(hidden', weight, target, bias=b, ignore_index=..., reduction=...,
                         label_smoothing=..., softcap=s, logit_scale=a)

A ``torch.logsumexp(z, -1)`` of the same logits (a z-loss) is served by the op's lse output. Nodes
that become dead are erased; logits that have other users (returned from the graph, printed, ...)
stay, the loss is rewritten anyway and the report says the logits were kept.

The package, one job per module:

==================  ========================================================================
``fx_util``         small helpers over FX nodes (fake values, shapes, argument binding, source lines)
``spellings``       the matched eager spellings: the logits matmul and one recognizer per step kind
``match``           the walk from a loss node up to the matmul, and the check of the steps' order
``records``         what the pass reports: ``Rewrite``, ``MissRecord``, ``PassResult``
``regions``         the autocast regions and grad modes the nodes of a graph run under
``zloss``           ``torch.logsumexp`` (z-loss) terms served by the op's lse output
``emit``            emitting the replacement, erasing dead nodes, the stable topological sort
``graph_pass``      the driver: :func:`rewrite_graph`
==================  ========================================================================
"""
from __future__ import annotations

# Every name the single-module ``cce_inductor.rewrite`` defined stays importable from here (private
# ones included: tests and the backend use them).
from ..logging_ import log  # noqa: F401
from .emit import (  # noqa: F401
    _Emitter,
    apply_match,
    _dtype_bytes,
    _emit_rewrite,
    _fake_eval,
    _hint,
    _op,
    _replay_layout,
    _size_str,
    _stable_topological_sort,
)
from .fx_util import (  # noqa: F401
    _bind,
    _call,
    _describe,
    _dtype,
    _is_number,
    _last_dim,
    location,
    _norm_dim,
    _same_size,
    _shape,
    _sig,
    _val,
)
from .graph_pass import (  # noqa: F401
    _fed_by_matmul,
    rewrite_graph,
)
from .match import (  # noqa: F401
    Match,
    Miss,
    Step,
    _check_order,
    _loss_args,
    match_loss,
)
from .records import (  # noqa: F401
    MissRecord,
    PassResult,
    Rewrite,
)
from .regions import (  # noqa: F401
    _Regions,
    _autocast_regions,
    _grad_modes,
)
from .spellings import (  # noqa: F401
    _ADD_FNS,
    _ADD_METHODS,
    _ADDMM_FNS,
    _ADDMM_SIG,
    _CAST_METHODS,
    _CE_FNS,
    _CE_SIG,
    _DIV_FNS,
    _DIV_METHODS,
    _EINSUM_FNS,
    _FLATTEN_FNS,
    _FLATTEN_SIG,
    _LINEAR,
    _LINEAR_SIG,
    _LOG_SOFTMAX_FNS,
    _LOG_SOFTMAX_SIG,
    _LOGSUMEXP_FNS,
    _LOGSUMEXP_SIG,
    _MATMUL_FNS,
    _MATMUL_METHODS,
    _MUL_FNS,
    _MUL_METHODS,
    _NLL_FNS,
    _NLL_SIG,
    _PERMUTE_FNS,
    _RESHAPE_FNS,
    _TANH_FNS,
    _TRANSPOSE_FNS,
    _TRANSPOSE_METHODS,
    Matmul,
    _as_bias_add,
    _as_cast,
    _as_class_transpose,
    _as_layout,
    _as_log_softmax,
    _as_scale,
    _as_softcap,
    _getitem_keeps_last_dim,
    is_loss_node,
    match_matmul,
    _scalar_operand,
    _transposed_2d,
    _weight_from_dv,
)
from .zloss import (  # noqa: F401
    _find_logsumexps,
    _logsumexp_users,
)
