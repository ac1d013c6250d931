"""Multi-process tuning on torch.distributed (launched with ``torchrun``; gloo on CPU, NCCL on GPUs).

Two ways to share the work (see docs/operations.md):

* **data-parallel** (default): every rank holds the model and the calibration activations; each step's
  batch (the same sample indices on every rank) is split across ranks, each rank back-propagates the
  squared error of its share (divided by the whole batch's size), and the gradients are summed with
  ``all_reduce`` before the sign step, so every rank takes the single-process step on the whole batch
  (equal up to the order of floating-point sums).
* **block-parallel** (``--block-parallel``, with blocks tuned on the float model's inputs): blocks are then
  independent, so rank ``r`` tunes blocks ``i`` with ``i % world == r`` and writes them to the run folder;
  rank 0 assembles the checkpoint. The result is the single-process run's, bit for bit.

Rank 0 alone writes outputs and reports; the other ranks only compute.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` unless a process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): NCCL when
    CUDA is available, else gloo. Each rank then uses GPU ``LOCAL_RANK``. Returns ``(rank, world size)``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return world()


def finish() -> None:
    """Leave the process group (after a barrier, so rank 0's writes are done before anyone exits)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch's sample indices (contiguous, sizes differ by at most one)."""
    rank, size = world()
    return idx.tensor_split(size)[rank] if size > 1 else idx


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, with one collective (flattened into one buffer)."""
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
