"""Full-size ModelScope components (1.4B UNet3D, SD KL-f8 VAE, ViT-H-14 HPSv2) for cost counts, and a mid-size
variant that a CPU can run (time per phase, bench/test_phases.py).

On the meta device they cost no memory and no time, and torch's FlopCounterMode and saved-tensor hooks give
exact, machine-independent FLOPs and activation bytes. On CUDA the same builders give random-weight models
for wall-time measurements. Configurations: ../shared/REFERENCE.md, "Full-size configurations".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.models import VideoDiffusion
from engine.models.tiny import _tiny_tokenizer
from engine.rewards import HPSv2Reward

UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    cross_attention_dim=1024, attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    scaling_factor=0.18215,
)
TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1024)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

FRAMES, HEIGHT, WIDTH = 16, 256, 256
LATENT = (4, FRAMES, HEIGHT // 8, WIDTH // 8)
CONTEXT = (77, 1024)


def modelscope(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> VideoDiffusion:
    """ModelScope text-to-video at full size with random weights (instant on the meta device)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet, vae = UNet3DConditionModel(**UNET), AutoencoderKL(**VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    if dtype != torch.float32:
        unet, vae, text_encoder = (m.to(dtype) for m in (unet, vae, text_encoder))
    return VideoDiffusion(unet, vae, text_encoder, _tiny_tokenizer(), DDIMScheduler(**SCHEDULER), name="modelscope")


def hpsv2(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> HPSv2Reward:
    """The HPSv2 reward architecture (OpenCLIP ViT-H-14) with random weights."""
    return HPSv2Reward(None, device=device).to(dtype)


# Mid size: the ModelScope UNet at 2/5 width (246 M parameters), the VAE at half width, 16 frames of 128 x 128, and
# HPSv2's loss on OpenCLIP ViT-B-16: the same architecture families, small enough to time a step on a CPU.
MID_UNET = dict(UNET, block_out_channels=(128, 256, 512, 512), sample_size=16)
MID_VAE = dict(VAE, block_out_channels=(64, 128, 256, 256), sample_size=128)
MID_REWARD_ARCH = "ViT-B-16"
MID_LATENT = (4, FRAMES, 16, 16)


def midsize(device: str | torch.device = "cpu", seed: int = 0) -> tuple[VideoDiffusion, HPSv2Reward]:
    """The mid-size model and reward with random weights (the same ones for every ``seed``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = UNet3DConditionModel(**MID_UNET), AutoencoderKL(**MID_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**dict(TEXT, num_hidden_layers=1)))  # prompts come as random contexts
    model = VideoDiffusion(unet, vae, text_encoder, _tiny_tokenizer(), DDIMScheduler(**SCHEDULER), name="modelscope-mid")
    return model, HPSv2Reward(None, arch=MID_REWARD_ARCH, device=device)


# Video transformers at their published configurations (diffusers' Wan2.1-T2V-1.3B-Diffusers and CogVideoX-2b
# folders; CogVideoX-2B's are the class defaults), each at its own default clip: Wan 81 frames of 480 x 832,
# CogVideoX 49 frames of 480 x 720. The text encoders (UMT5-XXL, T5-XXL) are not part of a step: prompts enter as
# random embeddings of the pipelines' lengths (512 and 226 tokens of 4096).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
TRANSFORMER_CLIPS = {"wan2.1-1.3b": (81, 480, 832), "cogvideox-2b": (49, 480, 720)}
TRANSFORMER_FPS = {"wan2.1-1.3b": 16.0, "cogvideox-2b": 8.0}  # their pipelines' export frame rates
VIDEOALIGN_DATA = {"fps": 2.0, "num_frames": None, "max_frame_pixels": 200_704}  # VideoReward's released data config


def video_transformer(name: str, device: str | torch.device = "meta",
                      dtype: torch.dtype = torch.float32) -> tuple[VideoDiffusion, tuple, tuple]:
    """(model, latent shape, context shape) of ``name`` in TRANSFORMER_CLIPS, random weights."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from transformers import T5Config, T5EncoderModel

    from engine.models import CogVideoXVideo, WanVideo
    from engine.models.tiny import _tiny_t5_tokenizer

    wan = name == "wan2.1-1.3b"
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32": a meta count has no values
    try:
        with torch.device(device):
            if wan:
                denoiser, vae = diffusers.WanTransformer3DModel(**WAN_1_3B), diffusers.AutoencoderKLWan()
            else:
                denoiser, vae = diffusers.CogVideoXTransformer3DModel(), diffusers.AutoencoderKLCogVideoX()
            text_encoder = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=4))
        denoiser, vae = denoiser.to(dtype), vae.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    if wan:
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
        model = WanVideo(denoiser, vae, text_encoder, _tiny_t5_tokenizer(512), scheduler, name=name)
    else:
        scheduler = diffusers.CogVideoXDDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
            steps_offset=0, prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
            timestep_spacing="trailing")
        model = CogVideoXVideo(denoiser, vae, text_encoder, _tiny_t5_tokenizer(226), scheduler, name=name)
    return model, model.latent_shape(*TRANSFORMER_CLIPS[name]), (model.text_length, 4096)


# The released folders' text encoders (UMT5-XXL for Wan 2.1, T5-XXL for CogVideoX; their config.json files) and Wan
# 2.1's 14B transformer (Wan2.1-T2V-14B-Diffusers), for ``config_folder``. 14B's default clip: 81 frames of 720 x 1280.
XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
           feed_forward_proj="gated-gelu", is_encoder_decoder=False)
TEXT_ENCODERS = {"wan": ("UMT5EncoderModel", "UMT5Config", dict(XXL, vocab_size=256384)),
                 "cogvideox": ("T5EncoderModel", "T5Config", dict(XXL, vocab_size=32128))}
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
FOLDER_CLIPS = {**TRANSFORMER_CLIPS, "wan2.1-14b": (81, 720, 1280)}


def config_folder(name: str, folder: Path) -> Path:
    """A diffusers folder of ``name`` (a key of FOLDER_CLIPS) holding every component's configuration and no weights:
    what ``python -m engine.train --model FOLDER --dry-run`` needs to forecast a run of the released model."""
    import diffusers
    import transformers

    from engine.models.tiny import _tiny_t5_tokenizer

    family = "cogvideox" if name.startswith("cogvideox") else "wan"
    folder = Path(folder)
    with torch.device("meta"):
        if family == "wan":
            pipeline, text_length = "WanPipeline", 512
            denoiser = diffusers.WanTransformer3DModel(**(WAN_14B if name == "wan2.1-14b" else WAN_1_3B))
            vae = diffusers.AutoencoderKLWan()
        else:
            pipeline, text_length = "CogVideoXPipeline", 226
            denoiser, vae = diffusers.CogVideoXTransformer3DModel(), diffusers.AutoencoderKLCogVideoX()
    if family == "wan":
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=5.0 if name == "wan2.1-14b" else 3.0)
    else:
        scheduler = diffusers.CogVideoXDDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
            steps_offset=0, prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
            timestep_spacing="trailing")
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    for component, part in (("transformer", denoiser), ("vae", vae), ("scheduler", scheduler)):
        part.save_config(str(folder / component))
        index[component] = ["diffusers", type(part).__name__]
    encoder_class, config_class, encoder = TEXT_ENCODERS[family]
    getattr(transformers, config_class)(**encoder).save_pretrained(str(folder / "text_encoder"))
    _tiny_t5_tokenizer(text_length).save_pretrained(str(folder / "tokenizer"))  # its vocabulary changes no count
    index |= {"text_encoder": ["transformers", encoder_class], "tokenizer": ["transformers", "T5TokenizerFast"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
