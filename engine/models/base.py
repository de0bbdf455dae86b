"""The model interface, ``VideoDiffusion``: a family's diffusers components and the operations the engine uses.

Its default methods are the UNet3D family's (ModelScope, zeroscope) per-frame VAE path: one latent per frame,
each frame encoded and decoded independently by the 2-D VAE. Latents are [B, C, f, h, w]; ``gather_frames``
picks chosen frames' latents out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError
from engine.schedule import editing_scheduler


def gather_frames(latents: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, F, h, w] and indices [B, S] -> the chosen frames' latents [B*S, C, h, w]."""
    b, c, _, h, w = latents.shape
    index = indices.to(latents.device).view(b, 1, -1, 1, 1).expand(b, c, -1, h, w)
    return latents.gather(2, index).transpose(1, 2).flatten(0, 1)


@dataclass
class VideoDiffusion:
    """The components and the operations the chain needs. The default methods here are the UNet3D family's
    per-frame VAE path (one VAE latent per pixel frame, encoded and decoded independently); the causal transformer
    families (``CausalVideoDiffusion`` and its subclasses) override them."""

    denoiser: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    name: str = "model"
    pipeline_class = "TextToVideoSDPipeline"
    denoiser_name = "unet"  # the pipeline's attribute and folder
    default_size = (16, 256, 256)  # frames, height, width its pipeline generates by default (ModelScope's training size)
    context_gradient = False  # causal VAEs: the SegVR frames' gradient flows through the causal context too
    prompt_cache = None  # prompt -> embedding [L, D] on the device, once cache_prompts has run

    def __post_init__(self):
        for module in (self.denoiser, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        editing_scheduler(self.scheduler)  # a clear error now for a scheduler the chain cannot run
        self.check_denoiser(dict(self.denoiser.config), self.name)

    @classmethod
    def check_denoiser(cls, config: dict, where: str) -> None:
        """A clear error for a variant of the family that the engine does not run (read before loading weights)."""

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "VideoDiffusion":
        for module in (self.denoiser, self.vae, self.text_encoder):
            module.to(device)
        return self

    def pipeline(self):
        """The stock diffusers pipeline over these very components (no copy)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, scheduler=self.scheduler,
            **{self.denoiser_name: self.denoiser})

    def save(self, path: str | Path) -> Path:
        """Write the diffusers pipeline layout (model_index.json and one folder per component)."""
        self.pipeline().save_pretrained(str(path))
        return Path(path)

    # -- layout ----------------------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return num_frames

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames of the clip that ``latent_frames`` latent frames decode to (SegVR and TAR count these)."""
        return latent_frames

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[C, f, h, w] of a clip of ``num_frames`` frames of height x width pixels; a clear error otherwise."""
        down, multiple = self.vae_downsample, self.spatial_multiple
        if height % multiple or width % multiple:
            raise UserError(f"--height/--width {height}x{width} must be multiples of {multiple} (the VAE's factor "
                            f"{down}{' times the patch size' if multiple != down else ''})")
        return self.denoiser.config.in_channels, self.latent_frames(num_frames), height // down, width // down

    @property
    def spatial_multiple(self) -> int:
        """What height and width must be multiples of: the VAE's factor, times a transformer's patch size."""
        patch = getattr(self.denoiser.config, "patch_size", 1)
        return self.vae_downsample * (patch[-1] if isinstance(patch, (list, tuple)) else patch or 1)

    # -- text and denoiser -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D]: read from the prompt cache once ``cache_prompts`` has filled it (a prompt not
        in it is embedded then, the text encoder brought to the device for that call), else embedded now."""
        cache = self.prompt_cache
        if cache is None:
            return self.embed_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            self._cache(missing)
        return torch.stack([cache[p] for p in prompts])

    def cache_prompts(self, prompts: list[str], batch: int = 8) -> None:
        """Embed ``prompts`` once, keep the embeddings on the device and the text encoder in host memory: what a
        run that knows its prompts needs of the encoder (T5-XXL for Wan: 11 GB in bf16) leaves the device."""
        self.prompt_cache = {}
        unique = list(dict.fromkeys(prompts))
        for i in range(0, len(unique), batch):
            self._cache(unique[i:i + batch])
        self.text_encoder.to("cpu")

    def _cache(self, prompts: list[str]) -> None:
        offloaded = next(self.text_encoder.parameters()).device != self.device
        if offloaded:
            self.text_encoder.to(self.device)
        with torch.no_grad():
            self.prompt_cache.update(zip(prompts, self.embed_prompts(prompts)))
        if offloaded:
            self.text_encoder.to("cpu")

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] as the pipeline computes them (last hidden state)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def predict(self, denoiser: nn.Module, x: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        """One denoiser call on latents [B, C, f, h, w]: its prediction (noise, v or velocity), same layout.
        ``denoiser`` is this model's or a wrapper of it (DDP, torch.compile)."""
        return denoiser(x, timestep, encoder_hidden_states=context).sample

    # -- pixels ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [-1, 1] -> scaled latents [B, C, F, h, w] (posterior mean, per frame)."""
        b, f = frames.shape[:2]
        posterior = self.vae.encode(frames.flatten(0, 1).to(self.device, self.vae.dtype)).latent_dist
        z = posterior.mode() * self.latent_scale
        return z.unflatten(0, (b, f)).transpose(1, 2).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-frame latents [N, C, h, w] -> images [N, 3, H, W] in [0, 1]; differentiable."""
        images = self.vae.decode(latents / self.latent_scale).sample
        return (images.float() * 0.5 + 0.5).clamp(0, 1)

    def decode_frames(self, latents: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, f, h, w] and pixel-frame indices [B, S] -> those frames [B*S, 3, H, W] in [0, 1],
        decoding no more than they need; differentiable."""
        return self.decode_latents(gather_frames(latents, indices))

    @torch.no_grad()
    def decode_video(self, latent: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """One video's latent [C, f, h, w] -> frames [F, 3, H, W] in [0, 1] on the CPU."""
        frames = latent.transpose(0, 1).to(self.vae.dtype)
        return torch.cat([self.decode_latents(frames[i:i + chunk]) for i in range(0, frames.shape[0], chunk)]).float().cpu()
