"""Run a function on N local processes (gloo over loopback) and collect what each returns.

Used by the ``test_distributed_*`` tests: ``run_workers(fn, *args)`` spawns the processes, each joins a
gloo group (``file://`` rendezvous in a fresh temp dir, sockets bound to the loopback interface), calls
``fn(rank, world_size, *args)`` and sends back its (picklable) result or its traceback. A process that
hangs (e.g. a collective one rank never joins) fails the test after ``timeout`` seconds instead of
blocking the run; the processes are ours and are terminated by their handles.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback

import torch


def _worker(rank: int, world: int, init_file: str, fn, args, results, threads: int):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # report every failure, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_workers(fn, *args, world_size: int = 2, timeout: float = 120.0, threads: int = 1) -> list:
    """``[fn(0, world_size, *args), fn(1, world_size, *args), ...]``, each run in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world_size, os.path.join(tmp, "rdzv"), fn, args, results,
                                                   threads), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out: dict = {}
        errors = []
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        try:
            while len(out) + len(errors) < world_size:
                left = (deadline - datetime.datetime.now()).total_seconds()
                if left <= 0:
                    raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s "
                                       f"(finished: {sorted(out)}; errors: {len(errors)})")
                try:
                    rank, ok, val = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                        dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                        raise RuntimeError(f"worker process(es) died without a result: {dead}") from None
                    continue
                if ok:
                    out[rank] = val
                else:
                    errors.append(f"rank {rank}:\n{val}")
                    break  # the other ranks may be stuck in a collective: do not wait for them
        finally:
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
    if errors:
        raise AssertionError("a distributed worker failed:\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
