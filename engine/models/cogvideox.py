"""``CogVideoXVideo``: CogVideoX 1.0 (CogVideoXPipeline, 2B / 5B) on the VideoDiffusion interface."""

from __future__ import annotations

import functools

import torch

from engine.errors import UserError
from engine.models.causal import CausalVideoDiffusion, checkpoint_tensors


class CogVideoXVideo(CausalVideoDiffusion):
    """CogVideoX 1.0 (2B / 5B): the transformer takes [B, f, C, h, w]; 3-D rotary embeddings when configured."""

    pipeline_class = "CogVideoXPipeline"
    denoiser_name = "transformer"
    default_size = (49, 480, 720)

    def __post_init__(self):
        super().__post_init__()
        self.text_length = int(self.denoiser.config.max_text_seq_length)
        self._rotary: dict[tuple, object] = {}

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    def decoded_prefix(self, needed: int, total: int) -> int:
        """The VAE decodes latent frames in pairs, the odd one out joining the first pair: a prefix decodes
        alike only with the clip's parity and its first group whole."""
        n = max(needed, min(total, 2 + total % 2))
        return min(total, n + (total - n) % 2)

    def decode_selected(self, z, graded):
        """AutoencoderKLCogVideoX's decode: latent frames in pairs (the odd one in the first), the causal
        convolutions' cache carried over."""
        vae = self.vae

        def run(frames, conv_cache, first):
            if vae.post_quant_conv is not None:
                frames = vae.post_quant_conv(frames)
            return vae.decoder(frames, conv_cache=conv_cache)

        decoded = self.decode_chunks(run, z, None, graded)
        return torch.cat(decoded, 2)

    def layers_recomputed(self, layers):
        """Each residual block and upsampler of the decoder's up-blocks recomputed in backward on its own (a block
        takes the causal cache it reads and returns the one it leaves; an upsampler has none: no state between
        them), and within a block each of its norms and convolutions recomputed in the block's backward on its
        own: at full resolution a block's saved activations are GBs (a dozen tensors of 128 channels x 8 frames x
        480x720), its parts' inputs a third of that."""
        recomputed = [layer for block in self.vae.decoder.up_blocks for layer in [*block.resnets, *(block.upsamplers or [])]]

        def wrap(layer):
            forward = layer.forward
            parts = [getattr(layer, name) for name in ("norm1", "conv1", "norm2", "conv2") if hasattr(layer, name)]

            def run(*args, **kwargs):  # also when backward recomputes the layer, after the chunk's decode
                with layers.replacing(parts, lambda part: functools.partial(checkpoint_tensors, part.forward)):
                    return forward(*args, **kwargs)

            def recomputed(*args, **kwargs):
                out = layers.checkpointed(run, *args, **kwargs)
                return (out[0], layers.left(out[1])) if isinstance(out, tuple) else out  # a block: (frames, cache)

            return recomputed

        return layers.replacing(recomputed, wrap)

    def chunks(self, n: int) -> list[range]:
        size = self.vae.num_latent_frames_batch_size
        extra = n % size
        return [range(size * i + (extra if i else 0), min(n, size * (i + 1) + extra)) for i in range(max(n // size, 1))]

    @classmethod
    def check_denoiser(cls, config: dict, where: str) -> None:
        if config.get("patch_size_t"):
            raise UserError(f"{where}: CogVideoX 1.5 (a transformer with patch_size_t) is not supported; use "
                            "CogVideoX-2b or -5b")

    def rotary_embedding(self, latent_shape: torch.Size, device: torch.device):
        if not self.denoiser.config.use_rotary_positional_embeddings:
            return None
        key = (tuple(latent_shape[2:]), str(device))
        if key not in self._rotary:
            f, h, w = latent_shape[2:]
            down = self.vae_downsample
            self._rotary[key] = self.pipeline()._prepare_rotary_positional_embeddings(h * down, w * down, f, device)
        return self._rotary[key]

    def predict(self, denoiser, x, timestep, context):
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        out = denoiser(hidden_states=x.transpose(1, 2), encoder_hidden_states=context, timestep=timestep,
                       image_rotary_emb=self.rotary_embedding(x.shape, x.device), return_dict=False)[0]
        return out.transpose(1, 2)
