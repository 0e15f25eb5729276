"""One loss head measured the way every script measures it: errors, peak memory, time of fwd+bwd."""
from __future__ import annotations

from .errors import errors
from .memory import PeakMemory
from .timing import bench_ms, free, sync


def measure_loss_head(fn, e, c, t, ref=None, *, warmup=25, rep=100, device="cuda", keys=("peak_MiB", "fwdbwd_ms")):
    """``loss = fn(e, c, t)`` (``e``, ``c`` leaves that require grad) and its backward: a first call (it
    compiles, where there is something to compile) whose loss and gradients are compared with the float64
    ``ref`` when given; the peak of one more call over what was allocated before it (inputs excluded, the
    gradients included); the median ms of ``bench_ms``. Returns the errors and ``keys`` = (peak MiB name,
    ms name); exceptions (out of memory...) are the caller's. The gradients are cleared on the way out."""
    r = {}
    try:
        e.grad = c.grad = None
        loss = fn(e, c, t)
        loss.backward()
        sync(device)
        if ref is not None:
            r.update(errors(ref, loss.item(), e.grad, c.grad))
        del loss
        e.grad = c.grad = None
        free(device)
        with PeakMemory(device) as mem:
            fn(e, c, t).backward()
        r[keys[0]] = mem.above_mib
        e.grad = c.grad = None
        free(device)
        r[keys[1]] = bench_ms(lambda: fn(e, c, t).backward(), warmup=warmup, rep=rep, grad_to_none=[e, c],
                              device=device)
    finally:
        e.grad = c.grad = None
    return r


def measure_forward(fn, e, c, t, *, warmup=25, rep=100, device="cuda", keys=("peak_MB", "ms")):
    """``fn(e, c, t)`` under ``torch.no_grad()`` (scoring: a forward only): the first call's output (it compiles,
    where there is something to compile), the peak of one more call over what was allocated before it (the
    output included) and the median ms of ``bench_ms``. Returns ``(output, {peak, ms})``."""
    import torch

    with torch.no_grad():
        out = fn(e, c, t)
        sync(device)
        with PeakMemory(device) as mem:
            fn(e, c, t)
        r = {keys[0]: mem.above_mib}
        free(device)
        r[keys[1]] = bench_ms(lambda: fn(e, c, t), warmup=warmup, rep=rep, device=device)
    return out, r
