"""One peak-memory measurement: ``torch.cuda.max_memory_allocated`` over a window."""
from __future__ import annotations

import torch

from .timing import is_cuda, sync

MiB = 1 << 20


class PeakMemory:
    """The allocator's peak over a window, in MiB; every number is None off CUDA.

        with PeakMemory(device) as mem:
            fn(e, c, t).backward()
        mem.above_mib   # the peak minus what was allocated when the window opened (inputs excluded)
        mem.peak_mib    # the peak itself (weights, optimizer state... included)

    ``start()`` / ``stop()`` open and close a window that is not one block. ``empty_cache=True`` gives the
    caching allocator's free blocks back before the window opens (then ``reserved`` starts low too).
    """

    def __init__(self, device="cuda", empty_cache=False):
        self.device, self.empty_cache = device, empty_cache
        self.cuda = is_cuda(device)
        self.base = self.peak = self.reserved = None

    def start(self):
        if self.cuda:
            sync(self.device)
            if self.empty_cache:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def stop(self):
        if self.cuda:
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, *exc):
        if exc_type is None:  # after a failure (an out-of-memory error...) there is no peak to read
            self.stop()
        return False

    @staticmethod
    def _mib(x):
        return None if x is None else x / MiB

    @property
    def base_mib(self):
        return self._mib(self.base)

    @property
    def peak_mib(self):
        return self._mib(self.peak)

    @property
    def reserved_mib(self):
        return self._mib(self.reserved)

    @property
    def above_mib(self):
        return None if self.peak is None else (self.peak - self.base) / MiB
