"""``CausalVideoDiffusion``: the layout and decoding shared by the families whose VAE compresses time causally."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from engine.errors import UserError
from engine.models.base import VideoDiffusion


class CausalVideoDiffusion(VideoDiffusion):
    """A family whose VAE compresses time causally: latent frame 0 holds pixel frame 0, latent frame k >= 1 pixel
    frames 4k-3 .. 4k (ratio 4), so a clip has 4k + 1 frames. Pixel frames depend on earlier latents only: the
    SegVR frames need the latents up to the last chosen one, not the clip's tail. Subclasses set ``text_length``,
    the tokens of the prompt embedding."""

    @property
    def temporal_ratio(self) -> int:
        raise NotImplementedError

    def latent_frames(self, num_frames: int) -> int:
        r = self.temporal_ratio
        if num_frames % r != 1:
            raise UserError(f"--num-frames {num_frames}: {self.family_label}'s causal VAE encodes {r}k + 1 frames; "
                            f"use e.g. {num_frames - num_frames % r + 1}")
        return (num_frames - 1) // r + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_ratio * (latent_frames - 1)

    @property
    def family_label(self) -> str:
        return self.pipeline_class.removesuffix("Pipeline")

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] by the pipeline's own ``encode_prompt`` (its padding and truncation)."""
        embeds, _ = self.prompt_pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                       max_sequence_length=self.text_length, device=self.device)
        return embeds

    @functools.cached_property
    def prompt_pipeline(self):
        """The pipeline whose ``encode_prompt`` the prompts go through: built once (its text encoder and tokenizer
        are this model's; training calls it every step)."""
        return self.pipeline()

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the denoiser's scaled latent."""
        return z * self.latent_scale

    def from_unit(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [-1, 1] -> scaled latents [B, C, f, h, w] (posterior mean, whole clip)."""
        self.latent_frames(frames.shape[1])
        video = frames.transpose(1, 2).to(self.device, self.vae.dtype)
        return self.to_unit(self.vae.encode(video).latent_dist.mode()).float()

    def decoded_prefix(self, needed: int, total: int) -> int:
        """How many leading latent frames to decode so the first ``needed`` come out as in a whole-clip decode."""
        return needed

    def latent_index(self, frame: int) -> int:
        """The latent frame that holds pixel frame ``frame``."""
        return 0 if frame == 0 else (frame - 1) // self.temporal_ratio + 1

    def decode_prefix(self, latents: torch.Tensor, needed: int, graded: set[int] | None = None) -> torch.Tensor:
        """The first latents [B, C, :n, h, w] (n from ``decoded_prefix``) -> frames [B, F', 3, H, W] in [0, 1].

        ``graded``: the latent frames decoded with gradient, the others (the causal context) without; the values
        are the same either way. None: all of them."""
        n = self.decoded_prefix(needed, latents.shape[2])
        z = self.from_unit(latents[:, :, :n].to(self.vae.dtype))
        if graded is None and self.decode_recompute:
            graded = set(range(n))  # every chunk with gradient, through the loop that can recompute them
        if graded is None or not torch.is_grad_enabled() or getattr(self.vae, "use_tiling", False):
            video = self.vae.decode(z).sample
        else:
            video = self.decode_selected(z, graded)
        return (video.float() * 0.5 + 0.5).clamp(0, 1).transpose(1, 2)

    def chunks(self, n: int) -> list[range]:
        """The groups of latent frames the VAE decodes together (one call each, the causal cache between them)."""
        return [range(i, i + 1) for i in range(n)]

    def decoded_with_gradient(self, graded: set[int], n: int) -> int:
        """How many of ``n`` decoded latent frames run with gradient when ``graded`` are the chosen ones."""
        return sum(len(c) for c in self.chunks(n) if any(k in c for k in graded))

    def decode_selected(self, z: torch.Tensor, graded: set[int]) -> torch.Tensor:
        """The VAE's own decode loop over ``chunks``, each with gradient only if it holds a graded frame."""
        raise NotImplementedError

    # The decoder's activations of a chunk decoded with gradient are most of what a step saves at real size (a
    # latent frame is 4 pixel frames at full resolution through every up-block). With ``decode_recompute`` each
    # such chunk keeps only its input and the causal cache it read, and runs again in backward: one more decoder
    # forward of the graded chunks for their activations. Exact (the decoder draws no random numbers).
    decode_recompute = False

    def decode_chunk(self, run, *inputs):
        """``run(*inputs)``, one chunk of the decode loop (a function of its inputs alone: the causal cache it
        reads is an input, the one it leaves an output); recomputed in backward when ``decode_recompute`` is on
        and the chunk runs with gradient."""
        if self.decode_recompute and torch.is_grad_enabled():
            return checkpoint(run, *inputs, use_reentrant=False)
        return run(*inputs)

    def decode_frames(self, latents: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The chosen frames from the shortest exact prefix; with ``context_gradient`` off (the default) only the
        latent frames that hold a chosen frame decode with gradient: the decoder's activations are saved for those
        alone, and the reward's gradient does not flow through the causal context into earlier latents."""
        chosen = {self.latent_index(int(i)) for i in indices.flatten()}
        video = self.decode_prefix(latents, max(chosen) + 1, None if self.context_gradient else chosen)
        b, s = indices.shape
        index = indices.to(video.device).view(b, s, 1, 1, 1).expand(b, s, *video.shape[2:])
        return video.gather(1, index).flatten(0, 1)

    @torch.no_grad()
    def decode_video(self, latent: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """The whole clip in one decode (a causal VAE carries its cache through it; ``chunk`` does not apply)."""
        return self.decode_prefix(latent[None], latent.shape[1])[0].cpu()
