"""The project's paths as extra rows of the shared peers table (../shared/bench/peers.py loads this file
from the project root): each entry is fn(e, c, t) -> the mean loss, as peers.py calls its methods."""
import cce_inductor

METHODS = {
    # 3 matmuls, gradients formed in the forward, token chunks (forced even where "auto" would not take it)
    "fast": lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path="fast"),
    # the same with d_weight accumulated by the Triton matmul kernel instead of cuBLAS + fold
    "fast_triton_acc": lambda e, c, t: _with(lambda: cce_inductor.linear_cross_entropy(e, c, t, path="fast"),
                                             fast_path_weight_accumulate="triton"),
    # 4 matmuls, the backward recomputes the logits per vocabulary chunk (memory ~1.1x the gradients)
    "low_memory": lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t, path="low_memory"),
}


def _with(fn, **patch):
    with cce_inductor.config.patch(**patch):
        return fn()
