"""Run functions on N local processes (gloo over loopback) and collect what each returns.

Used by the ``test_distributed_*`` tests. :class:`WorkerPool` starts the processes once (each joins a gloo
group: ``file://`` rendezvous in a fresh temp dir, sockets on the loopback interface) and then runs
``pool.run(fn, *args)`` as ``fn(rank, world_size, *args)`` on every rank, returning the list of results
(a test file pays the start-up — importing torch twice on a busy 2-core machine — once, not per test).
A task that fails on a rank raises with that rank's traceback (waiting at most 10 s more for the other
ranks, which may be stuck in a collective the failed rank never joined); a task that hangs fails after
``timeout`` seconds instead of blocking the run. A pool that saw a failure or a hang is shut down (its
processes, which are ours, terminated by their handles) and the next ``run`` starts fresh ones.
``run_workers(fn, *args)`` is the one-shot form.
"""
from __future__ import annotations

import datetime
import itertools
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback

import torch


def _worker(rank: int, world: int, init_file: str, tasks, results, threads: int, backend: str):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=90))
    except BaseException:
        results.put((None, rank, False, traceback.format_exc()))
        return
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            task_id, fn, args = task
            try:
                torch._dynamo.reset()
                out = fn(rank, world, *args)
                results.put((task_id, rank, True, out))
            except BaseException:  # report every failure, including assertion errors, to the parent
                results.put((task_id, rank, False, traceback.format_exc()))
            finally:
                torch._dynamo.reset()
    finally:
        dist.destroy_process_group()
        _shutdown_compile_workers()


def _shutdown_compile_workers() -> None:
    """Stop Inductor's compile-worker subprocesses now (at interpreter exit they take seconds)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
    except ImportError:  # pragma: no cover - older torch
        return
    shutdown_compile_workers()


class WorkerPool:
    def __init__(self, world_size: int = 2, threads: int = 1, backend: str = "gloo"):
        """``backend="nccl"``: one GPU per rank (``cuda:rank`` is each process's current device)."""
        self.world_size, self.threads, self.backend = world_size, threads, backend
        self._procs: list = []
        self._ids = itertools.count()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        init_file = os.path.join(self._tmp.name, "rdzv")
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, init_file, self._tasks[r],
                                                         self._results, self.threads, self.backend), daemon=True)
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def close(self, graceful: bool = True) -> None:
        if not self._procs:
            return
        if graceful:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._procs = []
        self._tmp.cleanup()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, fn, *args, timeout: float = 120.0) -> list:
        """``[fn(0, world_size, *args), fn(1, world_size, *args), ...]``, each on its own process."""
        if not self._procs:
            self._start()
        task_id = next(self._ids)
        for q in self._tasks:
            q.put((task_id, fn, args))
        out: dict = {}
        errors: list = []
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close(graceful=False)
                if errors:
                    break
                raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s "
                                   f"(ranks done: {sorted(out)})")
            try:
                tid, rank, ok, val = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(self._procs) if p.exitcode is not None]
                if dead:
                    self.close(graceful=False)
                    raise RuntimeError(f"worker process(es) exited without a result: {dead}") from None
                continue
            if tid is None:  # the process group could not be set up
                self.close(graceful=False)
                raise RuntimeError(f"rank {rank} failed to start:\n{val}")
            if tid != task_id:
                continue  # a late answer to a task that already failed
            if ok:
                out[rank] = val
            else:
                if not errors:  # the other ranks may be stuck in a collective the failed rank never joined
                    deadline = min(deadline, time.monotonic() + 10.0)
                errors.append(f"rank {rank}:\n{val}")
        if errors:  # the group may be left mid-collective: the next task gets fresh processes
            self.close(graceful=False)
            raise AssertionError("a distributed worker failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]


def run_workers(fn, *args, world_size: int = 2, timeout: float = 120.0, threads: int = 1) -> list:
    """One-shot: start ``world_size`` processes, run ``fn`` on them, shut them down."""
    with WorkerPool(world_size, threads) as pool:
        return pool.run(fn, *args, timeout=timeout)
