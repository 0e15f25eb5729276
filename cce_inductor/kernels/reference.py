"""Kept for imports that predate ``cce_inductor.reference`` (the one shared reference)."""
from ..reference import reference_loss_and_grads, rel_err  # noqa: F401
