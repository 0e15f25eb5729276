"""cce_inductor: memory-free lm-head + cross-entropy, as an op and as a torch.compile graph rewrite.

* ``linear_cross_entropy(hidden, weight, targets, ...)``: the op, called directly.
* ``linear_log_probs(hidden, weight, targets, ...)``: the same op read as per-token log-probabilities (and
  entropy / lse on request): RL scoring.
* ``vocab_parallel_linear_cross_entropy(...)``: the same with the weight split by vocabulary rows over a
  process group (tensor parallel; DTensor ``Shard(0)`` weights reach it through ``linear_cross_entropy``).
* ``torch.compile(fn, backend="cce")`` / ``make_backend(inner=...)``: the rewrite as a backend
  (registered on import and through the ``torch_dynamo_backends`` entry point).
* ``install()`` / ``uninstall()``: the rewrite inside plain ``torch.compile`` (Inductor's pre-grad hook).
* ``explain(fn, *args)``: what was rewritten, what was not and why.
"""
from . import config
from .api import linear_cross_entropy, linear_log_probs
from .distributed import vocab_parallel_linear_cross_entropy
from .backend import cce_backend, install, is_installed, make_backend, uninstall
from .explain import ExplainReport, explain
from .options import LossOptions
from .paths import choose_path

__all__ = ["linear_cross_entropy", "linear_log_probs", "vocab_parallel_linear_cross_entropy", "config", "choose_path", "LossOptions",
           "make_backend", "cce_backend", "install", "uninstall",
           "is_installed", "explain", "ExplainReport"]
__version__ = "0.1.0"
