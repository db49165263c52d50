"""One way for every distributed test to run its gloo worker processes on this CPU.

``launch(fn, world, *args)`` runs ``fn(rank, *args)`` in ``world`` processes with the env://
variables set (``dist.init_process_group("gloo", rank=rank, world_size=world)`` needs nothing
more).  A worker that raises prints its traceback (``mp`` reports whichever rank failed first,
often a peer's "connection closed") and fails the test.  A worker whose checks all passed tears
its process group down and leaves by ``os._exit(0)``: the interpreter's own teardown can still
abort it (std::terminate on a thread gloo or DeepSpeed left joinable, "terminate called without
an active exception", SIGABRT; seen in CI after every check of a worker had passed, most often
on a loaded machine).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world: int, *args, start_method: str = "spawn") -> None:
    """``fn(rank, *args)`` on ``world`` local processes; raises if any of them failed.
    ``start_method="fork"`` where a worker needs no fresh interpreter (importing torch takes
    seconds); ``fn`` must be a module-level function for ``"spawn"``."""
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True,
                       start_method=start_method)


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
