"""The source latents a run edits: each source's clip encoded by the VAE, or generated from its prompt by the
base model (LoRA off), once per run and cached; and a batch of them with its prompts' embeddings."""

from __future__ import annotations

import torch

from engine.chain import EditChain
from engine.data import Source
from engine.lora import adapters_disabled
from engine.models import VideoDiffusion


class SourceLatents:
    """Latents of the run's sources by identity (the training and held-out lists share the cache)."""

    def __init__(self, model: VideoDiffusion, chain: EditChain, uncond: torch.Tensor, latent_shape, seed: int,
                 device: torch.device, autocast):
        self.model, self.chain, self.uncond, self.latent_shape = model, chain, uncond, latent_shape
        self.seed, self.device, self.autocast = seed, device, autocast
        self.cache: dict[int, torch.Tensor] = {}

    def get(self, sources: list[Source], index: int) -> torch.Tensor:
        """Encode a clip, or let the base model (LoRA off) generate one from the prompt; cached."""
        key = id(sources[index])
        if key not in self.cache:
            source = sources[index]
            with torch.no_grad(), self.autocast():
                if source.frames is not None:
                    latent = self.model.encode_video(source.frames()[None])[0]
                else:
                    generator = torch.Generator(self.device).manual_seed(self.seed * 100_003 + index)
                    context = self.model.encode_prompts([source.prompt])
                    with adapters_disabled(self.model.denoiser):
                        latent = self.chain.sample((1, *self.latent_shape), context, self.uncond, generator)[0]
            self.cache[key] = latent.float()
        return self.cache[key]

    def batch(self, sources: list[Source], indices: list[int]):
        """(latents [B, C, f, h, w], prompts, text embeddings) of ``sources[i]`` for i in ``indices``."""
        latents = torch.stack([self.get(sources, i) for i in indices])
        prompts = [sources[i].prompt for i in indices]
        return latents, prompts, self.model.encode_prompts(prompts)
