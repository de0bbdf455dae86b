"""Data parallelism on torch.distributed (launched by torchrun) and randomness that does not depend on it.

LoRA training wraps the UNet in DistributedDataParallel (``data_parallel``): its reducer averages the LoRA
gradients in buckets while backward still runs.

Full fine-tuning (the baseline) shards the UNet with FSDP (``fully_shard``, one unit per top-level block plus
the root): parameters, gradients and AdamW state are split over the ranks, and FSDP's reduce-scatter averages
the gradients. Its whole-model state dicts are gathered with torch.distributed.checkpoint's state-dict API.

Every random draw for a batch (source noise, DDIM eta noise, SegVR frames) is made for the *global* batch
and each rank keeps its own rows, so N processes compute what one process computes with the same global batch.
"""

from __future__ import annotations

import os
import warnings
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
        # NCCL for CUDA tensors, gloo for the small CPU ones (flags agreed on, logged means)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def data_parallel(unet: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the UNet for LoRA training. static_graph: the chain calls the UNet K times before one backward
    and the chain-memory recompute replays units inside backward, so a LoRA weight's gradient arrives several
    times per iteration; the graph is the same every iteration. No buffer broadcast: rank 0 alone also calls the
    UNet (evaluation, samples) and a collective there would wait for the other ranks forever."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, static_graph=True)


def all_ranks_agree(flag: bool, world: World) -> bool:
    """True on every rank only if ``flag`` is true on every rank (e.g. 'this step's gradient is finite')."""
    if world.size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def shard_model(model: torch.nn.Module, units: list[torch.nn.Module], world: World, device: torch.device,
                frozen_only: bool = False) -> None:
    """FSDP2 on ``units`` then on ``model`` (the rest: embeddings, conv_in/out), over all ranks. ``frozen_only``
    shards the weights that do not require grad and leaves the trainable ones (LoRA) whole on every rank, where
    their gradients are the caller's to reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # UNet3DConditionModel and the video transformers apply no in-place op to a block's output, which is what FSDP
    # warns about for the views some blocks return (tests/test_robustness.py and tests/test_context_parallel.py
    # check sharded ranks against 1 process).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world.size,))
    ignored = {p for p in model.parameters() if p.requires_grad} if frozen_only else None
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    # frozen_only: the root reshards after every forward too, not only after backward (FSDP's default for a root)
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=True if frozen_only else None)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state dicts on the CPU; collective when ``model`` is sharded, and
    then only rank 0 receives them (the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """The inverse of ``full_state``: every rank passes the whole state and keeps its shard. A forward pass
    (e.g. the "before" samples) can leave the root's parameters gathered; they are resharded first, so the
    model's parameters are the sharded ones the optimizer holds."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=True))


def total(value) -> float:
    """A scalar that may be a sharded DTensor (e.g. clip_grad_norm_'s total norm under FSDP) as a float."""
    full = getattr(value, "full_tensor", None)
    return float((full() if full is not None else value).item())


def mean_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """Per-rank scalars (a rank's loss, its mean reward) averaged over ranks: the global batch's values."""
    if world.size == 1:
        return values
    flat = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(flat)
    return dict(zip(values, (flat / world.size).tolist()))


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    """Every rank waits for the others first: a rank that tears its process group down while another still has
    collectives in flight can abort at exit (gloo's threads), failing a run that finished."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
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
