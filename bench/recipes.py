"""The fine-tuning configurations compared by ``pytest bench/``, and one fine-tuning step of each.

1. full       full fine-tuning: every UNet weight trains; the chain starts from pure noise and runs all D steps
              with gradient through every step (blocks checkpointed so it fits at all); every frame decoded.
2. draft1     the full chain from pure noise with LoRA, gradient through the last step only (DRaFT-1).
3. official   the official InstructVideo recipe as its code runs it: tau 0.6, D 20, K 1, LoRA r4, all 16 frames
              decoded with gradient before SegVR picks 4, every UNet block checkpointed, and the gradient step
              itself wrapped in a non-reentrant checkpoint around that (so its UNet forward runs three times:
              forward, the step's recomputation, each block's recomputation), eager PyTorch.
4. engine     the same recipe run the way this engine runs it: only the SegVR frames are decoded, activations
              handled by the chain-memory planner (keep / spill to host / recompute within a budget), fused
              kernels where a GPU is present.
5. engine_k4, engine_kall: the engine with gradient through 4 and all 12 steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from engine.chain import EditChain
from engine.checkpointing import checkpoint_blocks
from engine.lora import add_lora
from engine.models import VideoDiffusion
from engine.rewards import Reward
from engine.video_reward import SegmentalReward, reward_loss


@dataclass(frozen=True)
class Recipe:
    key: str
    title: str
    full_finetune: bool = False
    from_noise: bool = False      # start from pure noise and run all D steps (tau = 1)
    tau: float = 0.6
    ddim_steps: int = 20
    grad_steps: int | None = 1    # None: every step run
    decode_all: bool = False      # decode every frame with gradient, then pick the SegVR frames
    memory: str = "blocks"        # "blocks": recompute every UNet block; "plan": the chain-memory planner
    step_checkpoint: bool = False  # also recompute each gradient step as a whole (the official code's outer checkpoint)
    segments: int = 4
    lora_rank: int = 4


RECIPES = [
    Recipe("full", "1. full fine-tuning, full chain", full_finetune=True, from_noise=True, tau=1.0,
           grad_steps=None, decode_all=True),
    Recipe("draft1", "2. full chain, LoRA, last step (DRaFT-1)", from_noise=True, tau=1.0, decode_all=True),
    Recipe("official", "3. official InstructVideo recipe", decode_all=True, step_checkpoint=True),
    Recipe("engine", "4. this engine, same recipe", memory="plan"),
    Recipe("engine_k4", "5. this engine, K = 4", grad_steps=4, memory="plan"),
    Recipe("engine_kall", "5. this engine, K = all (12)", grad_steps=None, memory="plan"),
]
BY_KEY = {r.key: r for r in RECIPES}


def checkpointed(guided_step):
    """``guided_step`` recomputed in backward as a whole (non-reentrant), when it runs with gradient."""

    def step(x, t, context, uncond, generator):
        if not torch.is_grad_enabled():
            return guided_step(x, t, context, uncond, generator)
        return checkpoint(guided_step, x, t, context, uncond, generator, use_reentrant=False)

    return step


def make_trainable(model: VideoDiffusion, recipe: Recipe) -> list[torch.nn.Parameter]:
    """LoRA (rank ``recipe.lora_rank``) or every UNet weight for full fine-tuning."""
    if recipe.full_finetune:
        model.unet.requires_grad_(True)
        return list(model.unet.parameters())
    return add_lora(model.unet, recipe.lora_rank)


class Step:
    """One fine-tuning step of ``recipe`` on ``model``: edit (or sample), decode, reward, backward."""

    def __init__(self, model: VideoDiffusion, reward: Reward, recipe: Recipe, latent_shape, context_shape,
                 batch: int = 1, guidance: float = 3.0, memory_budget: int | str = "auto"):
        self.model, self.recipe, self.batch = model, recipe, batch
        self.latent_shape, self.context_shape = latent_shape, context_shape
        self.params = make_trainable(model, recipe)
        self.chain = EditChain(model, recipe.ddim_steps, recipe.tau, 1, guidance)
        self.chain.grad_steps = recipe.grad_steps or self.chain.steps_run
        self.scorer = SegmentalReward(reward, recipe.segments)
        self.memory = self._memory_policy(memory_budget)
        if recipe.step_checkpoint:
            self.chain.guided_step = checkpointed(self.chain.guided_step)

    def _memory_policy(self, budget):
        if self.recipe.memory == "blocks":
            checkpoint_blocks(self.model.unet)
            return None
        if self.recipe.memory == "none":
            return None
        from engine.checkpointing import ChainMemory

        return ChainMemory(self.model.unet, self.chain.grad_steps, budget).attach(self.chain)

    def __call__(self, device) -> torch.Tensor:
        """Run forward and backward; returns the (detached) loss."""
        b, dtype = self.batch, self.model.unet.dtype
        latents = torch.randn(b, *self.latent_shape, device=device, dtype=dtype)
        context = torch.randn(b, *self.context_shape, device=device, dtype=dtype)
        uncond = torch.randn(b, *self.context_shape, device=device, dtype=dtype)
        prompts = ["a corgi running on the beach"] * b
        if self.recipe.from_noise:
            edited = self.chain.denoise(latents, context, uncond)
        else:
            edited = self.chain.edit(latents, context, uncond)
        if self.recipe.decode_all:  # the official code: decode all frames with gradient, then pick
            frames_total = edited.shape[2]
            indices = self.scorer.frame_indices(b, frames_total, train=True)
            every = self.model.decode_latents(edited.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, frames_total))
            chosen = every.gather(1, indices.to(every.device).view(b, -1, 1, 1, 1).expand(-1, -1, *every.shape[2:]))
            scores = self.scorer.reward(chosen.flatten(0, 1), [p for p in prompts for _ in range(indices.shape[1])])
            rewards = (self.scorer.weights(indices, frames_total).to(scores.device) * scores.view(b, -1)).mean(1)
        else:
            with self.memory.region(self.model.vae, self.scorer.reward) if self.memory else nullcontext():
                rewards, _ = self.scorer(self.model, edited, prompts)
        loss = reward_loss(rewards)
        loss.backward()
        return loss.detach()


def trainable_bytes(params: list[torch.nn.Parameter]) -> dict[str, int]:
    """Parameters, AdamW state (two fp32 moments) and fp32 gradients."""
    n = sum(p.numel() for p in params)
    return {"trainable_params": n, "optimizer_bytes": 8 * n, "gradient_bytes": 4 * n}

