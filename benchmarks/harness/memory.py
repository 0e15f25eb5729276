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
        mem.peak_mib    # the peak itself (weights, optimizer state... included); also base_mib, reserved_mib

    ``start()`` / ``stop()`` open and close a window that is not one block. ``empty_cache=True`` gives the
    caching allocator's free blocks back before the window opens. A block that raises reads no peak.
    """

    def __init__(self, device="cuda", empty_cache=False):
        self.device, self.empty_cache = device, empty_cache
        self.base_mib = self.peak_mib = self.reserved_mib = self.above_mib = None

    def start(self):
        if is_cuda(self.device):
            sync(self.device)
            if self.empty_cache:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mib = torch.cuda.memory_allocated(self.device) / MiB
        return self

    def stop(self):
        if is_cuda(self.device):
            sync(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MiB
            self.reserved_mib = torch.cuda.max_memory_reserved(self.device) / MiB
            self.above_mib = self.peak_mib - self.base_mib
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.stop()
        return False
