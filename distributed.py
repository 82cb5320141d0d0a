"""Torchrun: joining the process group, where this process stands in it, and sums over all processes.

train_pytorch.py works the same in a plain run and under `torchrun --nproc_per_node=N train_pytorch.py ...`:
a plain run is rank 0 of 1 with nothing to join. Under torchrun (RANK in the environment) the process always
joins the group (NCCL on CUDA, Gloo on the CPU) and the model is wrapped in DistributedDataParallel, even with
one process, so that a one-process launch really exercises the distributed path. This module owns no training
and no files: it only says who this process is and moves numbers between processes.
"""
import os
from datetime import timedelta

import torch

from data_loader import predict_probs


class Dist:
    """Where this process stands: rank `rank` of `world`; `enabled` when it is part of a torchrun process group."""

    def __init__(self, device, rank=0, world=1, local_rank=0, enabled=False, backend=None):
        self.device, self.rank, self.world, self.local_rank = device, rank, world, local_rank
        self.is_main = rank == 0
        self.enabled, self.backend = enabled, backend

    def sum(self, *values):
        """Sum numbers or 0-dim tensors over all ranks (one all_reduce); returns floats.

        float32, never float64: Apple's MPS has no float64, and counts up to 2**24 are exact in float32.
        """
        t = torch.stack([torch.as_tensor(v, device=self.device).float() for v in values])
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def agree(self, flag):
        """Rank 0 decides, every rank follows (early stopping must stop everyone at the same epoch)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())


def under_torchrun():
    """torchrun (and any launcher that follows its convention) sets RANK for every process it starts."""
    return "RANK" in os.environ


def setup_distributed(device, timeout_seconds=180):
    """A plain run: Dist(device). Under torchrun: join the process group and return this process's Dist, whose
    device is the process's own GPU on CUDA (one process per GPU)."""
    if not under_torchrun():
        return Dist(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A finite timeout: if a rank dies, the others give up with a message instead of waiting forever.
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return Dist(device, rank, world, local_rank, enabled=True, backend=backend)


def wrap(model, dist):
    """The model the training step calls: DistributedDataParallel under torchrun (it averages the gradients
    over the ranks in backward), the model itself otherwise."""
    if not dist.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def lr_scale(lr_scaling, world):
    """One step under torchrun sees world x batch_size images: the factor on the learning rates for that."""
    return {"none": 1.0, "sqrt": world ** 0.5, "linear": float(world)}[lr_scaling]


def gather_probs(model, images, ctx, dist, batch_size=None):
    """predict_probs over all ranks: each scores every world-th image, then all gather the whole (N, 10).
    batch_size: as predict_probs's (None: eval_batch_size of the images' device)."""
    if not dist.enabled:
        return predict_probs(model, images, ctx, batch_size=batch_size)
    n, world = len(images), dist.world
    per_rank = -(-n // world)
    mine = predict_probs(model, images[dist.rank::world], ctx, batch_size=batch_size)
    padded = torch.zeros(per_rank, mine.shape[1], device=mine.device)
    padded[:len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    probs = torch.empty(n, mine.shape[1], device=mine.device)
    for r, part in enumerate(parts):
        probs[r::world] = part[:len(range(r, n, world))]
    return probs


def close(dist):
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
