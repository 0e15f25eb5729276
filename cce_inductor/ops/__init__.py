"""The custom ops (registration, fake implementations, autograd — nothing else); importing this package
registers them:

* ``torch.ops.cce.linear_cross_entropy_forward`` / ``..._backward`` (:mod:`.low_memory`): per-token loss and
  lse; the backward recomputes the logits;
* ``torch.ops.cce.fast_linear_cross_entropy`` (:mod:`.fast`): a scalar loss with its gradients formed in the
  forward; the backward scales them in place;
* :class:`~.transformable.TransformableLinearCrossEntropy`: the low-memory op as an ``autograd.Function``
  for torch.func transforms and forward-mode AD;
* ``torch.ops.cce.fresh_copy`` (:mod:`.fresh_copy`): a copy the compiler cannot drop (the rewrite gives each
  read of one lse / entropy output its own tensor).

The vocabulary-parallel ops live with the rest of the tensor-parallel code in :mod:`cce_inductor.distributed`.
"""
from . import fast, fresh_copy, low_memory  # noqa: F401  (registers torch.ops.cce.*)
from .transformable import TransformableLinearCrossEntropy

__all__ = ["TransformableLinearCrossEntropy"]
