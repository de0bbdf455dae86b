"""Data parallelism on torch.distributed (launched by torchrun) and randomness that does not depend on it.

LoRA gradients are averaged with one all-reduce of a flat buffer after backward. DDP's reducer is not used:
the chain calls the UNet once per DDIM step, several times before one backward, and the LoRA parameters
(about 1.6M at ModelScope size) make a single flat all-reduce the cheapest exchange.

Every random draw for a batch (source noise, DDIM eta noise, SegVR frames) is made for the *global* batch
and each rank keeps its own rows, so N processes compute what one process computes with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global batch."""
        per_rank = len(items) // self.size
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes (env RANK/WORLD_SIZE); a single process otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Mean of each parameter's gradient over ranks, in one collective."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def all_ranks_agree(flag: bool, world: World) -> bool:
    """True on every rank only if ``flag`` is true on every rank (e.g. 'this step's gradient is finite')."""
    if world.size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class ShardedGenerator:
    """A generator that draws for the global batch and returns this rank's rows.

    Shapes passed in are local (dim 0 = the rank's batch); the draw is made at global size from one seeded
    torch.Generator shared in value by all ranks."""

    def __init__(self, generator: torch.Generator, world: World):
        self.generator = generator
        self.world = world

    def _draw(self, fn, shape, device):
        local = shape[0]
        full = fn((local * self.world.size, *shape[1:]), generator=self.generator, device=device)
        return full[self.world.rank * local:(self.world.rank + 1) * local]

    def randn(self, shape, device=None) -> torch.Tensor:
        return self._draw(torch.randn, tuple(shape), device)

    def rand(self, shape, device=None) -> torch.Tensor:
        return self._draw(torch.rand, tuple(shape), device)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def randn(shape, generator, device=None) -> torch.Tensor:
    """torch.randn that also accepts a ShardedGenerator."""
    if isinstance(generator, ShardedGenerator):
        return generator.randn(shape, device)
    return torch.randn(shape, generator=generator, device=device)


def rand(shape, generator, device=None) -> torch.Tensor:
    if isinstance(generator, ShardedGenerator):
        return generator.rand(shape, device)
    return torch.rand(shape, generator=generator, device=device)
