"""The op in plain PyTorch, on any device (the CPU implementations; the references of the Triton ones).

* :mod:`.low_memory` — per-token forward, vocabulary-recomputing backward, and the forward-mode (jvp) formula;
* :mod:`.fast` — the fast path: loss and gradients together, 3 matmuls per token chunk;
* :mod:`.common` — what they share (a logits chunk with the op's epilogue and its derivative, row masks).
"""
