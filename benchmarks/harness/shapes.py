"""The loss-head shapes measured by the benchmarks and the CUDA tests: tokens N, hidden D, vocabulary V."""
from __future__ import annotations

from typing import NamedTuple


class Shape(NamedTuple):
    N: int  # tokens of one forward + backward (sweep.py varies it; the other scripts and the tests use it)
    D: int  # hidden size
    V: int  # vocabulary size


SHAPES = {
    "gemma2": Shape(8192, 2304, 256000),       # Gemma 2 2B (the README's headline numbers)
    "llama3": Shape(8192, 4096, 128256),       # Llama 3 8B
    "llama3.2-1b": Shape(8192, 2048, 128256),  # Llama 3.2 1B (the step benchmark's Llama architecture)
    "llama3-8b": Shape(8192, 4096, 128256),    # "llama3" under the name the training-speed work uses
    "tiny": Shape(96, 32, 700),                # CPU dry runs (Triton interpreter): checks scripts, not speed
}

# The pair every script runs by default and the CUDA tests check.
MODEL_SHAPES = ("gemma2", "llama3")


def shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None
