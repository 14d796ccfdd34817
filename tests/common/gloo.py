"""Several CPU processes joined by gloo, for the DDP tests of metrics.

Workers are started with ``fork``: the children reuse the parent's imports (``spawn`` would import torch
again in each, ~10 s on a busy 2-core machine); nothing in the parent has started torch threads by then.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """Join the default process group as ``rank`` of ``world`` (one torch thread) and leave it afterwards."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable[[int, int, int, str], None], out_dir: str | Path, world: int = 2) -> None:
    """Run ``worker(rank, world, port, out_dir)`` in ``world`` forked processes and wait for all of them."""
    mp.start_processes(
        worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True, start_method="fork"
    )
