"""The typed "a Triton kernel does not fit this device" condition that sends a call to the PyTorch path."""
from __future__ import annotations


class KernelDoesNotFit(RuntimeError):
    """No tile configuration fits this device's shared memory (the op then uses its PyTorch path)."""


def is_triton_out_of_resources(ex: BaseException) -> bool:
    """Triton's ``OutOfResources``: a launch needs more shared memory or registers than the device has."""
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # no triton: nothing can have raised it
        return False
    return isinstance(ex, OutOfResources)


def kernel_does_not_fit(ex: BaseException) -> bool:
    """True when ``ex`` says the Triton kernels cannot run on this device (then the PyTorch path runs)."""
    return isinstance(ex, KernelDoesNotFit) or is_triton_out_of_resources(ex)
