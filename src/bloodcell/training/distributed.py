"""Training on several processes or machines with PyTorch's own runtime: `torchrun ... -m bloodcell train`.

    torchrun --nproc-per-node 2 -m bloodcell train --out runs/ddp            # one machine, 2 processes
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m bloodcell train --out runs/ddp    # on each of 2 machines

torchrun starts the processes and sets RANK, WORLD_SIZE and the rendezvous; `setup` joins the
process group (gloo on CPUs, NCCL on CUDA GPUs). Each global batch of `batch_size` images is
split across the processes (the world size must divide it), DistributedDataParallel averages
the gradients, and every process ends each step with the same weights. BatchNorm normalises
each process's share of the batch with that share's statistics, and DDP broadcasts rank 0's
running statistics before every step, so all processes hold one model. Only rank 0 writes the
checkpoint and the run directory; the others wait for it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from bloodcell.errors import BloodcellError


def requested() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> None:
    """Join the process group torchrun set up (once per process)."""
    if not requested() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_batch(batch_size: int) -> None:
    if batch_size % world_size():
        raise BloodcellError(
            f"batch size {batch_size} does not divide among {world_size()} processes; "
            "choose a batch size that is a multiple of the process count"
        )


def wrap(model: nn.Module) -> nn.Module:
    """The model as every process trains it: DDP-wrapped when there are several processes."""
    if not dist.is_initialized():
        return model
    return nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)


def share(index: torch.Tensor) -> torch.Tensor:
    """This process's part of a global batch: every world_size-th image, starting at its rank."""
    return index[rank() :: world_size()]


def epoch_generators(seed: int, epoch: int) -> tuple[torch.Generator, torch.Generator]:
    """(order, augmentation) generators for one epoch of multi-process training: the order is the
    same in every process, the augmentations differ; both follow from (seed, epoch), so a resumed
    run continues exactly without any per-process state."""
    order = torch.Generator().manual_seed(seed * 100_003 + epoch)
    augmentation = torch.Generator().manual_seed(seed * 100_003 + epoch + 7919 * (rank() + 1))
    return order, augmentation


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
