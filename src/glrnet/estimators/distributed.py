"""Scale-out on torch.distributed (gloo on CPU, NCCL on GPU), launched by ``torchrun``.

The world of P ranks is a grid of D data groups × R = P/D replication groups
(``parallel="replications"``: D = 1; ``"data"``: D = P; an integer string: D).
Rank p = d·R + j trains on shard d of every batch with K/R of the replications,
from its own random stream (seeded by (seed, rank): reproducible for a given seed
and world size). The pieces are combined into exactly the single-process
K-replication estimator over the whole batch:

1. baseline only: each rank writes its per-input loss sums Sᵢ into a zero vector
   over the whole batch; one all-reduce of that vector (B numbers) gives every rank
   Sᵢ over all K replications of its inputs;
2. each rank finalises its share of Σ w s xᵀ; one all-reduce sums the gradients.

::

    torchrun --nproc_per_node=4 -m glrnet train --dataset digits --replications 4000 --out runs/d
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..utils.seeding import stream_seed
from .glr import GLR


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def data_groups(parallel: str, world: int) -> int:
    """D, the number of data groups, for a ``parallel`` setting."""
    if parallel == "replications":
        return 1
    if parallel == "data":
        return world
    try:
        d = int(parallel)
    except ValueError:
        raise ValueError(f"parallel must be 'replications', 'data' or a number of data groups, got {parallel!r}") from None
    if d < 1 or world % d:
        raise ValueError(f"{d} data groups do not divide the world of {world} ranks")
    return d


def grid_position(parallel: str) -> tuple[int, int, int, int]:
    """(data group d, D, replication rank j, R) of this rank."""
    world = world_size()
    d_count = data_groups(parallel, world)
    r_count = world // d_count
    return rank() // r_count, d_count, rank() % r_count, r_count


def shard_batch(x: Tensor, y: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """This rank's shard of a batch (the whole batch unless data-parallel)."""
    if world_size() == 1:
        return x, y
    d, d_count, _, _ = grid_position(cfg.parallel)
    return torch.tensor_split(x, d_count)[d], torch.tensor_split(y, d_count)[d]


def rank_generator(seed: int, device="cpu") -> torch.Generator:
    """This rank's own noise stream: seeded by (seed, rank); distinct ranks get independent streams."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, 0x52414E4B, rank()))


def gather_generator_states(gen: torch.Generator) -> list[list[int]]:
    states = [None] * world_size()
    dist.all_gather_object(states, gen.get_state().tolist())
    return states


def broadcast_parameters(model: torch.nn.Module) -> None:
    for p in model.parameters():
        dist.broadcast(p.data, src=0)


class DistributedGLR(GLR):
    """GLR with its K replications and/or its batch split across ranks (see the module docstring).

    Every rank calls ``backward(model, x_shard, y_shard)`` with its own shard (the whole
    batch when ``parallel="replications"``); every rank ends with the same ``.grad``.
    """

    def __init__(self, parallel: str = "replications", **kwargs):
        self.parallel = parallel
        _, self.d_count, _, self.r_count = grid_position(parallel)
        replications = kwargs.get("replications", 1000)
        counts = replications if isinstance(replications, (list, tuple)) else [replications]
        if any(isinstance(k, int) and k % self.r_count for k in counts):
            raise ValueError(f"replications ({replications}) must divide evenly over {self.r_count} "
                             "replication ranks")
        super().__init__(**kwargs)

    def estimate(self, model, x: Tensor, y: Tensor):
        # the whole batch's size and this shard's offset in it: one all-gather per call
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
        dist.all_gather(sizes, n)
        per_group = [int(sizes[d * self.r_count]) for d in range(self.d_count)]
        self._offset, self._total = sum(per_group[: rank() // self.r_count]), sum(per_group)
        return super().estimate(model, x, y)

    def _ranks(self) -> int:
        return self.r_count

    def _global_batch(self, x: Tensor) -> int:
        return self._total

    def _all_reduce(self, tensors: list[Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def _combine_loss_sums(self, S: Tensor, x: Tensor) -> Tensor:
        """Sᵢ over every replication rank: scatter into a whole-batch vector, one all-reduce."""
        full = torch.zeros(self._total, dtype=x.dtype, device=x.device)
        full[self._offset:self._offset + x.shape[0]] = S
        dist.all_reduce(full)
        return full[self._offset:self._offset + x.shape[0]]


class DataParallelBackprop:
    """Back-propagation on this rank's shard, gradients averaged over the data groups (weighted by shard size)."""

    def __init__(self, inner):
        self.inner = inner

    def backward(self, model, x, y):
        stats = self.inner.backward(model, x, y)
        n = torch.tensor([float(x.shape[0])], device=x.device)
        total = n.clone()
        dist.all_reduce(total)
        for p in model.parameters():
            p.grad.mul_(n / total)
            dist.all_reduce(p.grad)
        return stats
