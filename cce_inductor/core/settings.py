"""The knobs of :mod:`cce_inductor.config`, read once per call into one frozen object and passed down.

Only the dispatch layer (which path), the implementation selection (which kernels, how they chunk) and
the public path arithmetic (:func:`cce_inductor.paths.choose_path`) read the config, through
:meth:`Settings.from_config`; implementations and kernels receive what they need as arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .. import config

PATHS = ("auto", "fast", "low_memory")
REMAINDERS = ("auto", "fp32", "int8", "int4")
WEIGHT_ACCUMULATE = ("auto", "triton", "cublas_fold")
FORWARD_KERNELS = ("auto", "fused", "chunked")
LOW_MEMORY_DHIDDEN = ("triton", "cublas_fold", "cublas_fp32")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """What :mod:`cce_inductor.config` says (see there for each knob's meaning and measured defaults);
    the choices are checked once, here."""

    path: str
    fast_path_memory_fraction: float
    fast_path_min_tokens_per_chunk: int
    fast_path_max_tokens_per_chunk: int
    fast_path_tokens_per_chunk: Optional[int]
    fast_path_remainder: str
    fast_path_weight_accumulate: str
    fold_slab_bytes: int
    forward_kernel: str
    forward_chunk_bytes: int
    low_memory_dhidden: str

    def __post_init__(self):
        check_choice("path", self.path, PATHS)
        check_choice("fast_path_remainder", self.fast_path_remainder, REMAINDERS)
        check_choice("fast_path_weight_accumulate", self.fast_path_weight_accumulate, WEIGHT_ACCUMULATE)
        check_choice("config.forward_kernel", self.forward_kernel, FORWARD_KERNELS)
        check_choice("config.low_memory_dhidden", self.low_memory_dhidden, LOW_MEMORY_DHIDDEN)

    @classmethod
    def from_config(cls, **overrides) -> "Settings":
        """The current config (``config.patch`` included), with ``overrides`` on top."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        values.update(overrides)
        return cls(**values)
