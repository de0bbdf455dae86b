"""The text-to-video model: diffusers components loaded from a folder, or the built-in tiny preset.

The folder layout is diffusers' (ModelScope ``text-to-video-ms-1.7b``, ``zeroscope_v2``):
``unet/`` UNet3DConditionModel, ``vae/`` AutoencoderKL, ``text_encoder/`` + ``tokenizer/`` CLIP, ``scheduler/``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class VideoDiffusion:
    """The five components, with the few operations the chain needs."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    name: str = "model"

    def __post_init__(self):
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        from engine.chain import is_flow_matching

        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if not is_flow_matching(self.scheduler) and prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"scheduler predicts {prediction!r}; this engine supports epsilon- and v-prediction DDIM "
                            "models (ModelScope, zeroscope, CogVideoX) and flow matching (Wan)")

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "VideoDiffusion":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] as the pipeline computes them (last hidden state)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

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

    def save(self, path: str | Path) -> Path:
        """Write the diffusers pipeline layout (model_index.json and one folder per component)."""
        from diffusers import TextToVideoSDPipeline

        pipe = TextToVideoSDPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                     unet=self.unet, scheduler=self.scheduler)
        pipe.save_pretrained(str(path))
        return Path(path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> VideoDiffusion:
    """Load every component from a diffusers text-to-video folder; one clear error for anything missing."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    root = Path(path)
    if not root.exists():
        raise UserError(f"model folder {root} does not exist; pass --model a diffusers text-to-video folder "
                        "(e.g. text-to-video-ms-1.7b), 'world' or 'tiny'")
    if not root.is_dir():
        raise UserError(f"--model {root} is a file; pass the folder that holds unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise UserError(f"model folder {root} lacks {', '.join(m + '/' for m in missing)}; it needs the diffusers "
                        "layout unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    loaders = {
        "unet": lambda p: UNet3DConditionModel.from_pretrained(p),
        "vae": lambda p: AutoencoderKL.from_pretrained(p),
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(p),
        "tokenizer": lambda p: CLIPTokenizer.from_pretrained(p),
        "scheduler": lambda p: DDIMScheduler.from_pretrained(p),
    }
    parts = {}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-file "Loading weights" bar: noise before every run's own
    try:
        for name, load in loaders.items():
            try:
                parts[name] = load(str(root / name))
            except Exception as err:  # diffusers/transformers raise many types; the user needs the component and reason
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"cannot load {name}/ from {root} ({reason}); re-download or re-save that "
                                "component") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return VideoDiffusion(**parts, name=root.name).to(device)


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


def tiny_model(seed: int = 0, device: str | torch.device = "cpu") -> VideoDiffusion:
    """The same classes as ModelScope at a small random size (about 1.5M parameters), built in a second."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
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
    return VideoDiffusion(unet, vae, text_encoder, _tiny_tokenizer(), scheduler, name="tiny").to(device)


BUILTIN_MODELS = ("world", "tiny")


def build_model(spec: str, seed: int = 0, device: str | torch.device = "cpu") -> VideoDiffusion:
    """'world': the built-in model trained on engine.world (shipped in engine/assets); 'tiny': random weights;
    anything else: a diffusers folder."""
    if spec == "tiny":
        return tiny_model(seed, device)
    if spec == "world":
        from engine.world_assets import MODEL_DIR

        model = load_model(MODEL_DIR, device)
        model.name = "world"
        return model
    return load_model(spec, device)
