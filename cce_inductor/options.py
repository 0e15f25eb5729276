"""The loss options shared by every implementation of the op (one small object, not a flag soup)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# The ``ignore_index`` of a call that ignores no row (per-token log-probabilities read with ``torch.gather``,
# which takes every index as a class index): int64's smallest value, which no class index equals, so a
# target outside [0, V) gives NaN (and raises eagerly) as it does for any other ignore_index.
NO_IGNORE_INDEX = -(2 ** 63)

@dataclass(frozen=True)
class LossOptions:
    """What turns logits ``z = softcap(logit_scale * (hidden @ weight.T + bias))`` into a per-token loss.

    ``softcap=None`` means no capping. Per token ``i`` with target ``t_i`` (eager PyTorch semantics):

        loss_i = (1 - label_smoothing) * (lse_i - z[i, t_i]) + label_smoothing * (lse_i - mean_j z[i, j])

    and ``loss_i = 0`` where ``t_i == ignore_index``.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:  # also refuses nan
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        # abs(x) < inf rather than math.isfinite: Dynamo folds the comparison, not the math call
        if self.softcap is not None and not (0 < self.softcap < math.inf):
            raise ValueError(f"softcap must be a finite positive number or None, got {self.softcap}")
        if not abs(self.logit_scale) < math.inf or self.logit_scale == 0:
            raise ValueError(f"logit_scale must be a finite non-zero number, got {self.logit_scale}")
