"""``WanVideo``: Wan 2.1 (WanPipeline) on the VideoDiffusion interface."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from engine.models.causal import CausalVideoDiffusion


# diffusers' WanTransformer3DModel module names -> the original Wan 2.1 checkpoint's, which ComfyUI and the Wan
# code load (diffusers' own converter of non-diffusers Wan LoRAs maps them back)
ORIGINAL_NAMES = {
    r"blocks\.(\d+)\.attn1\.to_(q|k|v)": r"blocks.\1.self_attn.\2",
    r"blocks\.(\d+)\.attn1\.to_out\.0": r"blocks.\1.self_attn.o",
    r"blocks\.(\d+)\.attn2\.to_(q|k|v)": r"blocks.\1.cross_attn.\2",
    r"blocks\.(\d+)\.attn2\.to_out\.0": r"blocks.\1.cross_attn.o",
    r"blocks\.(\d+)\.attn2\.add_(k|v)_proj": r"blocks.\1.cross_attn.\2_img",
    r"blocks\.(\d+)\.ffn\.net\.0\.proj": r"blocks.\1.ffn.0",
    r"blocks\.(\d+)\.ffn\.net\.2": r"blocks.\1.ffn.2",
    r"proj_out": "head.head",
    r"condition_embedder\.time_proj": "time_projection.1",
    r"condition_embedder\.(text|time)_embedder\.linear_1": r"\1_embedding.0",
    r"condition_embedder\.(text|time)_embedder\.linear_2": r"\1_embedding.2",
}


def original_module_name(name: str) -> str | None:
    """The original Wan 2.1 checkpoint's name of the diffusers module ``name`` (None: it has none)."""
    for pattern, original in ORIGINAL_NAMES.items():
        if re.fullmatch(pattern, name):
            return re.sub(pattern, original, name)
    return None


class WanVideo(CausalVideoDiffusion):
    """Wan 2.1: latents normalised by the VAE's per-channel mean and std; the timestep per video."""

    pipeline_class = "WanPipeline"
    denoiser_name = "transformer"
    text_length = 512
    default_size = (81, 480, 832)

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def vae_downsample(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def to_unit(self, z):
        mean, std = self._stats(z)
        return (z - mean) / std

    def from_unit(self, latents):
        mean, std = self._stats(latents)
        return latents * std + mean

    def predict(self, denoiser, x, timestep, context):
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        return denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]

    @contextmanager
    def _up_blocks_recomputed(self):
        """With ``decode_recompute``, each up-block of a chunk decoded with gradient is recomputed in backward on its
        own: backward through a recomputed chunk then holds one up-block's activations at a time, not the chunk's.
        An up-block reads and replaces entries of the decoder's causal cache (one list, in place) from a running
        index: the block runs on a copy of the entries it is given, which it returns with the index it reached, so
        that its recomputation reads what it read first."""
        if not (self.decode_recompute and torch.is_grad_enabled()):
            yield
            return
        blocks = list(self.vae.decoder.up_blocks)

        def wrap(forward):
            def block(x, start, entries, kwargs):
                cache, index = list(entries), [start]
                return forward(x, feat_cache=cache, feat_idx=index, **kwargs), tuple(cache), index[0]

            def recomputed(x, feat_cache=None, feat_idx=(0,), **kwargs):
                out, entries, end = checkpoint(block, x, feat_idx[0], tuple(feat_cache), kwargs, use_reentrant=False)
                feat_cache[:] = entries
                feat_idx[0] = end
                return out

            return recomputed

        for up_block in blocks:
            up_block.forward = wrap(up_block.forward)
        try:
            yield
        finally:
            for up_block in blocks:
                del up_block.forward

    def decode_selected(self, z, graded):
        """AutoencoderKLWan's decode: one latent frame at a time, the causal convolutions' cache carried over
        (each chunk reads a copy of it, so that a chunk recomputed in backward reads what it read first)."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae

        def run(x, cache, first_chunk):
            cache = list(cache)
            with self._up_blocks_recomputed():
                return vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk), cache

        vae.clear_cache()
        x, cache = vae.post_quant_conv(z), vae._feat_map
        frames = []
        for chunk in self.chunks(z.shape[2]):
            with torch.set_grad_enabled(any(k in chunk for k in graded)):
                out, cache = self.decode_chunk(run, x[:, :, chunk.start:chunk.stop], cache, chunk.start == 0)
            frames.append(out)
        vae.clear_cache()
        out = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)
