"""Run a function on N real processes (gloo, one per rank) and collect what each returns."""
from __future__ import annotations

import io
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from conftest import free_port


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        buffer = io.BytesIO()
        # Serialized: tensors sent as-is would live in shared memory that dies with this process.
        torch.save(fn(rank, world, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent reports the child's traceback
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 240, allow_missing: bool = False) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; returns the results by rank.

    Raises with the child's traceback if a rank failed, or if a rank exited without a result
    (unless ``allow_missing``: its entry is then None) or the deadline passed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        # Drain while waiting: a child cannot exit before the parent has read what it put.
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    missing = [r for r in range(world) if r not in out]
    if missing and (not allow_missing or time.monotonic() >= deadline):
        codes = {r: procs[r].exitcode for r in missing}
        raise AssertionError(f"ranks {missing} returned nothing (exit codes {codes}, timeout {timeout}s)")
    return [out.get(r) for r in range(world)]
