"""Data parallelism across processes, for training and sweeps, on ``torch.distributed``.

Launch any command with several processes (``torchrun`` or ``accelerate launch``; both
set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``) and :func:`init_from_env` joins them into
one group: NCCL on GPUs, gloo on CPUs. Then

* :func:`~piggyback_interp.training.finetune` gives each process a share of every
  gradient-accumulation group and sums the gradients, so N processes end with the
  same weights as one process over the same global batch; the TReFT / KL references
  are computed once, on rank 0, and broadcast; with ``fsdp=True`` the weights,
  gradients and optimizer state are sharded too
  (:mod:`piggyback_interp.training.sharding`);
* :func:`~piggyback_interp.analysis.sweep.sweep` gives each process a share of the
  layers and every process gets the whole result.

With one process every function here is a no-op, so single-process code is unchanged.

Example:
    >>> world()
    (0, 1)
    >>> shard(list(range(5)))          # rank 0 of 1 keeps everything
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return world()[0] == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1); True if joined.

    The backend is NCCL for a CUDA ``device`` and gloo otherwise. On CUDA each process
    uses GPU ``LOCAL_RANK``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:<LOCAL_RANK>`` under a launcher; anything else unchanged."""
    if device == "cuda" and active():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from its rank."""
    rank, size = world()
    return list(items)[rank::size]


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable object; tensors come back on CPU)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Add up each parameter's gradient over the ranks (missing gradients count as zero)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``t`` over the ranks (in place; returned)."""
    if active():
        device = t.device
        # gloo reduces CPU tensors, NCCL CUDA ones
        work = t if dist.get_backend() != "gloo" or device.type == "cpu" else t.cpu()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not t:
            t.copy_(work.to(device))
    return t


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. to build a cache); the others wait, then run it."""
    if is_main():
        yield True
        barrier()
    else:
        barrier()
        yield False


__all__ = [
    "active",
    "barrier",
    "broadcast",
    "gather",
    "init_from_env",
    "is_main",
    "local_device",
    "main_first",
    "shard",
    "sum_gradients",
    "sum_tensor",
    "world",
]
