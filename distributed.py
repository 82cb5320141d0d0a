"""Torchrun: joining the process group, where this process stands in it, and sums over all processes.

train_pytorch.py works the same in a plain run and under `torchrun --nproc_per_node=N train_pytorch.py ...`:
a plain run is rank 0 of 1 with nothing to join. Under torchrun (RANK in the environment) the process always
joins the group (NCCL on CUDA, Gloo on the CPU) and the model is wrapped in DistributedDataParallel, even with
one process, so that a one-process launch really exercises the distributed path. This module owns no training
and no files: it only says who this process is and moves numbers between processes.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from common import at_least, fail
from data_loader import predict_probs


def add_args(parser):
    group = parser.add_argument_group("torchrun: several processes or GPUs (distributed.py)")
    group.add_argument("--lr_scaling", default="sqrt", choices=["none", "sqrt", "linear"],
                       help="one step sees processes x --batch_size images: multiply the learning rates by the "
                            "square root of the number of processes (the usual rule for Adam), by that number, or "
                            "not at all")
    group.add_argument("--dist_timeout", type=at_least(1), default=180,
                       help="seconds a process waits for the others before giving up with an error")


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

    def say(self, *args, **kwargs):
        """print() on rank 0 only: one process talks (and writes files) for all."""
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def reseed(self, seed, epoch=0):
        """A different augmentation on every rank (the random generators are otherwise rank 0's)."""
        if self.enabled:
            torch.manual_seed(seed + 1 + self.rank + 7919 * epoch)

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


def wrap(model, dist, args):
    """(the model the training step calls, the factor on the learning rates). Under torchrun the model is
    wrapped in DistributedDataParallel, which averages the gradients over the ranks in backward, and one step
    sees world x batch_size images, so the rates are scaled by --lr_scaling."""
    if not dist.enabled:
        return model, 1.0
    dist.reseed(args.seed)
    scale = {"none": 1.0, "sqrt": dist.world ** 0.5, "linear": float(dist.world)}[args.lr_scaling]
    dist.say(f"distributed: {dist.world} process{'es' if dist.world > 1 else ''} ({dist.backend}, "
             f"DistributedDataParallel) x --batch_size {args.batch_size} = {dist.world * args.batch_size} images "
             f"per step; learning rates x {scale:.2f} (--lr_scaling {args.lr_scaling})")
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), scale


@contextmanager
def process_group(args):
    """The run's place among the processes: rank 0 of 1 for a plain run; under torchrun, the group joined (a
    failure to join is one line, exit 2), a peer lost mid-run one line, exit 1, and the group left at the end."""
    try:
        dist = setup_distributed(torch.device(args.device), args.dist_timeout)
    except Exception as err:  # a bad rendezvous address, a port in use, a peer that never came
        fail("train_pytorch.py", f"could not join the torchrun process group ({str(err).splitlines()[0][:160]})", 2)
    args.device = str(dist.device)
    try:
        yield dist
    except (RuntimeError, torch.distributed.DistError) as err:
        if not dist.enabled:
            raise
        fail("train_pytorch.py", f"rank {dist.rank}: lost contact with the other training processes: one of them "
                                 f"failed or timed out (see its output); {str(err).splitlines()[0][:160]}")
    finally:
        close(dist)


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
