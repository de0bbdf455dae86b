"""Tiny random models of each family (real diffusers/transformers classes at a small size) and their
offline tokenizers, for the tiny preset, tests and benchmarks."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from engine.models.base import VideoDiffusion
from engine.models.cogvideox import CogVideoXVideo
from engine.models.wan import WanVideo


def _tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: real CLIPTokenizer code on a 514-token vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def _tiny_t5_tokenizer(max_length: int):
    """A character-level T5 tokenizer (sentencepiece-style Unigram, built offline): real T5TokenizerFast code."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def _tiny_unet3d():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return unet, vae, text_encoder, _tiny_tokenizer(), scheduler


def _tiny_wan():
    """Wan 2.1's classes and scheduler setting (UniPC with flow sigmas, shift 3) at a tiny size."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=8,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * i - 0.35 for i in range(8)], latents_std=[1.0 + 0.2 * i for i in range(8)])
    tokenizer = _tiny_t5_tokenizer(WanVideo.text_length)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    return transformer, vae, text_encoder, tokenizer, scheduler


def _tiny_cogvideox():
    """CogVideoX-2B's classes and scheduler setting (v-prediction DDIM, SNR shift 3, zero terminal SNR)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=32, sample_height=32, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=64)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    tokenizer = _tiny_t5_tokenizer(64)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8))
    scheduler = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=3.0, timestep_spacing="trailing")
    return transformer, vae, text_encoder, tokenizer, scheduler


TINY_FAMILIES = {"unet3d": (VideoDiffusion, _tiny_unet3d), "wan": (WanVideo, _tiny_wan),
                 "cogvideox": (CogVideoXVideo, _tiny_cogvideox)}


def tiny_model(seed: int = 0, device: str | torch.device = "cpu", family: str = "unet3d") -> VideoDiffusion:
    """A family's classes at a small random size, built in a second: ModelScope's (the tiny preset, about 1.5M
    parameters), Wan 2.1's or CogVideoX's (tests of the transformer families)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    cls, build = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    name = "tiny" if family == "unet3d" else f"tiny-{family}"
    return cls(*build(), name=name).to(device)
