"""Timing: one median-of-many GPU timer for a loss head, one per-step timer for training steps."""
from __future__ import annotations

import gc
import time

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device="cuda"):
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free(device="cuda"):
    """Drop what Python still holds and give the caching allocator's free blocks back."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def bench_ms(fn, *, warmup=25, rep=100, grad_to_none=None, device="cuda") -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` (``warmup`` and ``rep`` in ms of GPU
    time, as it takes them; it clears ``grad_to_none``'s gradients before each call) on CUDA. Off CUDA one
    timed call: a dry run's check that the script runs, not a number to keep."""
    if not is_cuda(device):
        t0 = time.perf_counter()
        fn()
        for x in grad_to_none or ():
            x.grad = None
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


@torch.no_grad()
def matmul_ms(e, c, *, warmup=25, rep=100, device="cuda") -> float:
    """One ``e @ c.T`` in the inputs' dtype: the unit a loss head's time is compared with (fwd+bwd needs 3-4)."""
    x, w = e.detach(), c.detach()
    return bench_ms(lambda: x @ w.T, warmup=warmup, rep=rep, device=device)


def wall_s(fn, *args, device="cuda"):
    """``(seconds, fn(*args))``: wall time of one call between two device synchronisations (host work
    included)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


class StepTimer:
    """Times of a sequence of calls: on CUDA an event pair around each (read after the last, so the host
    runs ahead as it does in training), elsewhere ``perf_counter``."""

    def __init__(self, device="cuda"):
        self.cuda = is_cuda(device)
        self.device = device
        self._events, self._seconds = [], []

    def __call__(self, fn, *args):
        if self.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn(*args)
            e1.record()
            self._events.append((e0, e1))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            self._seconds.append(time.perf_counter() - t0)
        return out

    def last_s(self) -> float:
        """Seconds of the last call (synchronises on CUDA)."""
        if self.cuda:
            sync(self.device)
            e0, e1 = self._events[-1]
            return e0.elapsed_time(e1) / 1e3
        return self._seconds[-1]

    def ms(self) -> list:
        """Milliseconds of every call so far (synchronises on CUDA)."""
        if self.cuda:
            sync(self.device)
            return [e0.elapsed_time(e1) for e0, e1 in self._events]
        return [s * 1e3 for s in self._seconds]
