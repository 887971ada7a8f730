"""The process group of a ``torchrun`` launch: who this process is, and what the ranks share.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
(https://pytorch.org/docs/stable/elastic/run.html). ``process_group`` joins the group those variables
describe, with the backend the device asks for (NCCL on CUDA, gloo elsewhere); without them it does
nothing and every function here answers for one process (rank 0 of 1), with no collective call, so a
single-process run is unchanged.

The training loops use DistributedDataParallel (pretraining) or ``average_gradients`` (meta-training,
whose inner loops differentiate outside a module's forward), ``share`` to take this rank's slice of a
global batch, and ``broadcast`` so that what rank 0 alone computes (validation, its decisions) reaches
every rank. The evaluation embeds its pools in ``share``s, one per rank, that ``gather_rows`` joins.
Rank 0 alone logs to MLflow and writes checkpoints (``is_main``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fewshot_med.errors import FewshotMedError
from fewshot_med.runtime import resolve_device

#: seconds a rank waits in one collective call before it fails (``$FEWSHOT_MED_DIST_TIMEOUT`` overrides)
DEFAULT_TIMEOUT_SECONDS = 1800
#: what torchrun sets in every process it starts
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: the backend for each device type; gloo for any other (https://pytorch.org/docs/stable/distributed.html)
BACKENDS = {"cuda": "nccl"}

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the group.

    Attributes:
        rank: 0 … size - 1 over all nodes; rank 0 logs and checkpoints.
        size: processes in the group (1 without ``torchrun``).
        local_rank: index among the processes of this node (which GPU it drives).
        backend: ``nccl``, ``gloo``, or ``None`` for a single process.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None


def launched() -> bool:
    """Whether ``torchrun`` started this process (its rank variables are set)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def world() -> World:
    """This process's rank, group size, local rank and backend (``World()`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        backend=str(dist.get_backend()),
    )


def is_main() -> bool:
    """Whether this process is rank 0 (always, for a single process)."""
    return world().rank == 0


def is_distributed() -> bool:
    """Whether more than one process trains together."""
    return world().size > 1


def timeout() -> timedelta:
    """How long a collective call waits for the slowest rank: ``$FEWSHOT_MED_DIST_TIMEOUT`` seconds, else
    ``DEFAULT_TIMEOUT_SECONDS`` (rank 0's validations and MLflow logging are waited for within it)."""
    value = os.environ.get("FEWSHOT_MED_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        return timedelta(seconds=float(value))
    except ValueError:
        raise FewshotMedError(f"FEWSHOT_MED_DIST_TIMEOUT={value!r}: give a number of seconds") from None


@contextmanager
def process_group(device_name: str = "auto") -> Iterator[torch.device]:
    """Join the ``torchrun`` process group for the block, if launched by it; leave it afterwards.

    Args:
        device_name: ``runtime.device`` (``auto``, ``cpu``, ``cuda``, …).

    Yields:
        This process's device: ``cuda:LOCAL_RANK`` for a CUDA device under ``torchrun``, else the
        resolved ``device_name``.
    """
    device = resolve_device(device_name)
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield local_device(device)
        return
    if not dist.is_available():
        raise FewshotMedError("torchrun: this torch build has no torch.distributed; run one process")
    backend = BACKENDS.get(device.type, "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=timeout())
    try:
        yield local_device(device)
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """The device this rank drives: ``cuda:LOCAL_RANK`` for CUDA under ``torchrun``, else ``device``."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def check_divisible(total: int, what: str) -> None:
    """Refuse a global count (a batch, episodes per step) that the ranks cannot share equally.

    Raises:
        FewshotMedError: ``total`` is not a multiple of the group size; names ``what`` (a config key).
    """
    size = world().size
    if total % size:
        raise FewshotMedError(
            f"{what}={total} cannot be shared equally by {size} processes: set it to a multiple of {size} "
            "(it is the global count, summed over the processes)"
        )


def share(rows: np.ndarray) -> np.ndarray:
    """This rank's contiguous share of ``rows`` ``(N, …)`` for work done once per row (embedding an
    evaluation pool): ``np.array_split`` into one part per rank, so ``N`` need not be a multiple of the
    group size (the first ``N mod n`` ranks take one row more; a rank may get none). ``rows`` itself
    for one process. ``gather_rows`` puts the results back together."""
    if not is_distributed():
        return rows
    return np.array_split(rows, world().size)[world().rank]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The ``(n_r, …)`` rows every rank computed from its ``share``, concatenated in rank order on every
    rank: ``(N, …)`` on the CPU, row ``i`` the result for row ``i`` of what was shared. ``local`` itself
    for one process (no collective call)."""
    if not is_distributed():
        return local
    return torch.cat(gather(local.cpu()))


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` (gradients averaged over the ranks in the backward
    pass; buffers broadcast from rank 0 at every forward) when distributed; ``module`` itself otherwise."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` over the ranks, in one all-reduce (what DDP does in the
    backward pass, for loops that differentiate outside a forward); nothing for one process.

    Every rank must pass the same parameters, each with a gradient (``None`` counts as zeros).
    """
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world().size
    offset = 0
    for param, grad in zip(parameters, grads, strict=True):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (``tensor`` itself for one process)."""
    if not is_distributed():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics), as DDP does before a forward."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_state(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place (nothing for one process): the ranks
    then compute with the weights rank 0 logged, whatever their local steps left behind."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            dist.broadcast(tensor, src=0)


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself for one process."""
    if not is_distributed():
        return value
    holder: list[Any] = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` for one process)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world().size
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait until every rank gets here (nothing for one process)."""
    if is_distributed():
        dist.barrier()
