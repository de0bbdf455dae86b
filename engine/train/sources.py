"""The source latents a run edits: each source's clip encoded by the VAE, or generated from its prompt by the
base model (LoRA off), once per run and cached; and a batch of them with its prompts' embeddings. Also the run's
sources and its random draws (``setup_sources``, ``setup_draws``)."""

from __future__ import annotations

import torch

from engine.builtin import builtin
from engine.chain import EditChain
from engine.data import BatchSampler, Source, build_sources, split_held_out
from engine.distributed import ShardedGenerator
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


def setup_draws(run) -> None:
    """The clip's latent shape and the step's random draws (noise, SegVR frames), made for the global batch so that
    any number of processes gives one result (with --context-parallel every process draws the whole batch)."""
    cfg = run.config
    run.latent_shape = run.model.latent_shape(cfg.num_frames, cfg.height, cfg.width)  # checks the sizes
    on = run.device if run.device.type == "cuda" else "cpu"  # the meta device (--dry-run) has no generator
    run.noise_generator = ShardedGenerator(torch.Generator(on).manual_seed(cfg.seed + 1), run.data_world)
    run.frame_generator = ShardedGenerator(torch.Generator().manual_seed(cfg.seed + 2), run.data_world)


def setup_sources(run) -> None:
    """The run's sources (--videos or --prompts, or a built-in model's own), the held-out split, the batch sampler and
    the empty prompt's embedding (with --text-encoder cached every prompt of the run embedded now, once)."""
    cfg = run.config
    preset = builtin(cfg.model)
    if cfg.prompts or cfg.videos or preset is None:
        sources = build_sources(cfg.prompts, cfg.videos, cfg.num_frames, cfg.fps, cfg.height, cfg.width)
    else:
        sources = preset.sources(cfg.num_held_out, 0, cfg.num_frames, cfg.height, cfg.width)
    run.train_sources, held_out = split_held_out(sources, cfg.num_held_out)
    run.eval_sources = held_out or run.train_sources[:2]
    run.sampler = BatchSampler(len(run.train_sources), cfg.batch_size, cfg.seed)
    if cfg.text_encoder == "cached":
        run.model.cache_prompts([""] + [s.prompt for s in run.train_sources + run.eval_sources])
    run.uncond = run.model.encode_prompts([""])
