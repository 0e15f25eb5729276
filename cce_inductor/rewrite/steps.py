"""The kinds of steps between the logits matmul and the loss, and the order eager code may apply them in.

Every node on the way from the matmul to the loss is one typed :class:`Step`. The op computes
``softcap(logit_scale * (hidden @ weight.T + bias))`` and then the cross-entropy, so the steps that
change values must come in that order; layout steps and casts may come anywhere before the class-dim
transpose (the walk in ``match`` enforces where the class-dim transpose may stand). :data:`STAGE` is
the order of the value-changing kinds as a table and :data:`AT_MOST_ONCE` the kinds that may appear
once; :func:`check_order` reads both.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from torch.fx import Node


class StepKind(enum.Enum):
    LAYOUT = "layout"          # z.view(-1, V), z.reshape(...), z.flatten(0, 1), z[:, :-1], z.contiguous()
    CAST = "cast"              # z.float(), z.to(torch.float32), z.bfloat16()
    SCALE = "scale"            # z * a, a * z, z / a   (a Python number)
    SOFTCAP = "softcap"        # s * torch.tanh(z / s)
    BIAS = "bias"              # z + b with b of shape [V]
    CLASS_DIM = "class_dim"    # z.transpose(1, 2) / z.permute(0, 2, 1): the (N, C, d...) layout
    NORMALIZE = "normalize"    # F.log_softmax(z, -1) feeding F.nll_loss


# Stage of each value-changing kind in the op's formula, matmul → loss. Kinds absent from the table
# (layout, cast, class_dim) keep values and may come at any stage.
STAGE = {StepKind.BIAS: 0, StepKind.SCALE: 1, StepKind.SOFTCAP: 2, StepKind.NORMALIZE: 3}
AT_MOST_ONCE = (StepKind.BIAS, StepKind.SOFTCAP, StepKind.NORMALIZE, StepKind.CLASS_DIM)

_OUT_OF_ORDER = {  # (later kind, earlier-seen kind) -> why eager's order differs from the op's
    (StepKind.BIAS, StepKind.SCALE): "a bias added after scaling",
    (StepKind.BIAS, StepKind.SOFTCAP): "a bias added after the softcap",
    (StepKind.SCALE, StepKind.SOFTCAP): "scaling after the softcap",
    (StepKind.SCALE, StepKind.NORMALIZE): "scaling after log_softmax",
    (StepKind.SOFTCAP, StepKind.NORMALIZE): "a softcap after log_softmax",
    (StepKind.BIAS, StepKind.NORMALIZE): "a bias added after log_softmax",
}


@dataclass
class Step:
    kind: StepKind
    node: Node
    src: Node  # the step's tensor input (one node up)
    value: Any = None  # scale factor, softcap, bias node, or log_softmax dtype
    extra: list = field(default_factory=list)  # inner nodes that die with the step (softcap's tanh, z / s)


def check_order(steps_matmul_to_loss: list, matmul_has_bias: bool) -> Optional[str]:
    """None when the steps (eager order) fit the op's formula; else why not."""
    max_stage = -1
    max_kind: Optional[StepKind] = StepKind.BIAS if matmul_has_bias else None
    if matmul_has_bias:
        max_stage = STAGE[StepKind.BIAS]
    counts = {k: 0 for k in AT_MOST_ONCE}
    if matmul_has_bias:
        counts[StepKind.BIAS] = 1
    for st in steps_matmul_to_loss:
        if st.kind in counts:
            counts[st.kind] += 1
            if counts[st.kind] > 1:
                return f"two {st.kind.value} steps"
        if st.kind not in STAGE:
            continue
        stage = STAGE[st.kind]
        if stage < max_stage:
            return _OUT_OF_ORDER.get((st.kind, max_kind), f"{st.kind.value} after {max_kind.value}")
        if stage > max_stage:
            max_stage, max_kind = stage, st.kind
    return None
