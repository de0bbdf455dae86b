"""Context parallelism: one clip's tokens split across the processes of a group, for video transformers whose
activations at full length do not fit one GPU (Wan 2.1 14B at 81 x 720 x 1280: 75,600 tokens a frame stack).

It is diffusers' own Ulysses implementation (``enable_parallelism`` with ``ContextParallelConfig(ulysses_degree=N)``
over the model's ``_cp_plan``): the token sequence is split after the patch embedding, every attention exchanges
shards with an all-to-all so that each process attends over all tokens for 1/N of the heads, and the output is
gathered before the projection out. Every process of the group then holds the whole prediction, so the chain, the
decoder and the reward run on each as they would on one process, and each process's weight gradients are its
tokens' share of the whole: ``ContextParallel.reduce_gradients`` sums them over the group (not a mean, as data
parallelism takes), after which every process holds one process's gradient. Wan 2.1 has a plan; CogVideoX (its
text and video tokens joined in one sequence) has none in diffusers and is refused.

The frozen weights are sharded across the same processes (FSDP2, one unit per block plus the rest): a process
holds 1/N of the blocks' weights and gathers a block's whole while it runs (FSDP prefetches the next), in forward
and again in backward, so a 14B denoiser's 28.6 GB (bf16) become 5.4 GB per process at 8 (its shard, two blocks
gathered, the embeddings and head whole). The trainable weights (LoRA) stay whole on every process, outside FSDP.

    parallel = ContextParallel(model.denoiser)      # inside torchrun; every process of the group, the same clip
    ... loss.backward(); parallel.reduce_gradients(lora_parameters); optimizer.step()
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from engine.errors import UserError


def supports_context_parallel(denoiser: torch.nn.Module) -> bool:
    """Whether diffusers has a context-parallel plan for this denoiser's class (Wan 2.1: yes; CogVideoX, UNet3D: no)."""
    return bool(getattr(type(denoiser), "_cp_plan", None))


def sharded_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP's units under context parallelism: the blocks of the transformer's block lists (Wan 2.1: ``blocks``);
    the rest of the denoiser (embeddings, head) is one more unit, gathered for every call."""
    return [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]


@contextmanager
def _device_index_without_accelerator():
    """diffusers picks each process's device as ``rank % torch.accelerator.device_count()``, which divides by zero on
    a machine with no accelerator (gloo processes on CPUs); there every process's device is the CPU."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


class ContextParallel:
    """Ulysses context parallelism of ``denoiser`` over all processes of the default group, its frozen weights
    sharded across them; see the module docstring. Call it after LoRA is added (what requires grad then stays
    whole). Every process must call it, and every process of the group must then run the same clip."""

    def __init__(self, denoiser: torch.nn.Module):
        if not dist.is_available() or not dist.is_initialized():
            raise UserError("context parallelism splits one clip across processes: launch with torchrun "
                            "(torchrun --nproc_per_node N -m engine.train ...)")
        if not supports_context_parallel(denoiser):
            raise UserError(f"{type(denoiser).__name__} has no context-parallel plan in diffusers (Wan 2.1 has one); "
                            "run it with one process per clip (data parallel)")
        self.size = dist.get_world_size()
        heads = int(getattr(denoiser.config, "num_attention_heads", 0))
        if heads % self.size:
            raise UserError(f"context parallelism over {self.size} processes needs the {heads} attention heads to "
                            f"divide among them; use a process count that divides {heads}")
        from diffusers import ContextParallelConfig

        with _device_index_without_accelerator():
            denoiser.enable_parallelism(config=ContextParallelConfig(ulysses_degree=self.size))
        device = next(denoiser.parameters()).device
        if device.type != "meta":  # FSDP runs no step on meta tensors: the dry run counts the shards itself
            from engine.distributed import World, shard_model

            shard_model(denoiser, sharded_blocks(denoiser), World(dist.get_rank(), self.size), device, frozen_only=True)
        self.denoiser = denoiser

    def reduce_gradients(self, parameters) -> None:
        """Sum each parameter's gradient over the group: afterwards every process holds the whole clip's gradient."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
