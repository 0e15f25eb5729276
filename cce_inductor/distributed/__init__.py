"""Distributed training: a vocabulary-parallel (tensor-parallel) loss, and the pieces the rewrite uses.

* :func:`vocab_parallel_linear_cross_entropy`: the loss with the lm-head weight split by rows over a
  process group (plain local tensors, Megatron style, or DTensors ``Shard(0)`` on a 1-D mesh), without
  materialising the logits. ``cce_inductor.linear_cross_entropy`` forwards DTensor arguments here.
* ``torch.ops.cce.vocab_parallel_forward`` / ``..._backward``: the custom ops (collectives inside).
* :mod:`.local` (the op on one rank's tensors: checks, flattening, reduction), :mod:`.dtensor` (the DTensor
  entry, also what the graph rewrite's ``rewrite/dtensor_hook.py`` emits).
"""
from .functional import vocab_parallel_linear_cross_entropy
from .vocab_parallel import chunk_layout_start, group_name_of

__all__ = ["vocab_parallel_linear_cross_entropy", "chunk_layout_start", "group_name_of"]
