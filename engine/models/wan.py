"""``WanVideo``: Wan 2.1 (WanPipeline) on the VideoDiffusion interface."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

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
    def layers_recomputed(self, layers):
        """Each layer of the decoder's up-blocks that reads the causal cache (residual blocks, upsamplers)
        recomputed in backward on its own: backward through a recomputed chunk then holds one such layer's
        activations at a time, not the chunk's. A layer reads and replaces entries of the decoder's causal cache
        (one list, in place) from a running index: it runs on a copy of the entries it reads, which it returns, so
        that its recomputation reads what it read first."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        modules = [m for block in self.vae.decoder.up_blocks for m in
                   [*block.resnets, *(getattr(block, "upsamplers", None) or []), getattr(block, "upsampler", None)]
                   if m is not None]
        # the entries a layer reads: one per causal convolution over time that it runs with the cache
        reads = {m: sum(isinstance(c, WanCausalConv3d) and c.kernel_size[0] > 1 for c in m.modules()) for m in modules}

        def wrap(module):
            forward, count = module.forward, reads[module]

            def layer(x, entries, start):
                cache, index = [None] * start + list(entries), [start]
                out = forward(x, feat_cache=cache, feat_idx=index)
                if index[0] != start + count:
                    raise RuntimeError(f"--decode-recompute: {type(module).__name__} read {index[0] - start} causal-"
                                       f"cache entries where {count} were expected: this diffusers' Wan decoder is "
                                       "not the one it knows; run without --decode-recompute")
                return out, tuple(cache[start:])

            def recomputed(x, feat_cache=None, feat_idx=(0,)):
                if feat_cache is None:
                    return forward(x)
                start = feat_idx[0]
                out, entries = layers.checkpointed(layer, x, tuple(feat_cache[start:start + count]), start)
                feat_cache[start:start + count] = layers.left(entries)
                feat_idx[0] = start + count
                return out

            return recomputed

        with layers.replacing(modules, wrap):
            yield

    def decode_selected(self, z, graded):
        """AutoencoderKLWan's decode: one latent frame at a time, the causal convolutions' cache carried over
        (each chunk reads a copy of it, so that a chunk recomputed in backward reads what it read first)."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae

        def run(x, cache, first_chunk):
            cache = list(cache)
            return vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk), cache

        vae.clear_cache()
        frames = self.decode_chunks(run, vae.post_quant_conv(z), list(vae._feat_map), graded)
        vae.clear_cache()
        out = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)
