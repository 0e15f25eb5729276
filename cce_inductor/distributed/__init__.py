"""Distributed training: a vocabulary-parallel (tensor-parallel) loss, and the pieces the rewrite uses.

* :func:`vocab_parallel_linear_cross_entropy`: the loss with the lm-head weight split by rows over a
  process group (plain local tensors, Megatron style, or DTensors ``Shard(0)`` on a 1-D mesh), without
  materialising the logits. ``cce_inductor.linear_cross_entropy`` forwards DTensor arguments here.
* ``torch.ops.cce.vocab_parallel_forward`` / ``..._backward``: the custom ops (collectives inside).
* :mod:`.rewrite_hook`: what the graph rewrite calls for a loss whose lm-head weight is a DTensor.
"""
from .functional import vocab_parallel_linear_cross_entropy
from .vocab_parallel import chunk_layout_start, group_name_of

__all__ = ["vocab_parallel_linear_cross_entropy", "chunk_layout_start", "group_name_of"]
