"""Test set-up: without a GPU the Triton kernels run on CPU tensors under the Triton interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, i.e. when ``cce_inductor.kernels``
is imported, so it is set here before any test imports the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo state (no cache carried between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
