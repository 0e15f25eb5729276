"""cce_inductor: memory-free lm-head + cross-entropy, as an op and as a torch.compile graph rewrite."""
from .api import linear_cross_entropy
from .options import LossOptions

__all__ = ["linear_cross_entropy", "LossOptions"]
__version__ = "0.1.0"
